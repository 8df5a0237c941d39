#!/usr/bin/env bash
# Sets up (packages + build) and runs every test: unit, multi-rank (mpirun -np 2/3/4) and
# end-to-end. Extra arguments go to ctest, e.g. scripts/test.sh -L mpi
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ANDYLLM_ROOT/scripts/setup.sh"
cd "$ANDYLLM_ROOT"
# Tests run one at a time: the multi-rank tests already fill the cores.
ctest --preset default "$@"
