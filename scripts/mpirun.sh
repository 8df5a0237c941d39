#!/usr/bin/env bash
# Runs andyllm on N ranks of this machine with sensible defaults:
#   scripts/mpirun.sh N SUBCOMMAND [flags]
# e.g. scripts/mpirun.sh 4 train --config configs/tiny.toml --set parallel.tensor_parallel_size=2
# Each rank gets cores / N LibTorch threads (at least 1); ranks are bound to nothing so that
# oversubscribed runs still progress.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -lt 2 ]; then
  echo "usage: scripts/mpirun.sh N SUBCOMMAND [flags]" >&2
  exit 2
fi
n=$1
shift
exec mpirun -np "$n" --bind-to none "$ANDYLLM_BIN" "$@"
