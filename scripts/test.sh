#!/usr/bin/env bash
# Sets up (packages + build) and runs every test: unit, multi-rank (mpirun -np 2/3/4) and
# end-to-end; checks the include graph keeps the layer order (scripts/include_graph.py); then
# compiles every source against LibTorch 2.x headers, with and without CUDA
# (scripts/check_torch2.py; ANDYLLM_SKIP_TORCH2_CHECK=1 skips it). Extra arguments go to ctest,
# e.g. scripts/test.sh -L mpi
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ANDYLLM_ROOT/scripts/setup.sh"
cd "$ANDYLLM_ROOT"
# Tests run one at a time: the multi-rank tests already fill the cores.
ctest --preset default "$@"
echo
echo "== layers stay one-way (docs/ARCHITECTURE.md)"
if ! graph=$(/usr/bin/python3 scripts/include_graph.py); then echo "$graph"; exit 1; fi
echo "$graph" | tail -1
if [ "${ANDYLLM_SKIP_TORCH2_CHECK:-0}" != 1 ]; then
  echo
  echo "== compile check against LibTorch 2.6 (Debian trixie headers; CPU and CUDA)"
  /usr/bin/python3 scripts/check_torch2.py
fi
