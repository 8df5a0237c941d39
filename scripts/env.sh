# Sourced by the other scripts: the environment AndyLLM's scripts run in.
# - OpenMPI refuses to run as root unless told (containers and CI run as root).
# - OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE set by the machine are left alone.
ANDYLLM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ANDYLLM_ROOT
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# More ranks than cores on one machine: let mpirun oversubscribe instead of refusing.
export OMPI_MCA_rmaps_base_oversubscribe=1
ANDYLLM_BIN="${ANDYLLM_BIN:-$ANDYLLM_ROOT/build/andyllm}"  # a test may point at its own build
export ANDYLLM_BIN
