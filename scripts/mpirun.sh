#!/usr/bin/env bash
# Runs andyllm on N ranks of this machine with sensible defaults:
#   scripts/mpirun.sh N SUBCOMMAND [flags]
# e.g. scripts/mpirun.sh 4 train --config configs/tiny.toml --set parallel.tensor_parallel_size=2
# Each rank gets cores / N LibTorch threads (at least 1); ranks are bound to nothing so that
# oversubscribed runs still progress.
#
# Stopping: SIGTERM or SIGINT (Ctrl-C) to this script makes every rank write a checkpoint and
# the job exit 0. Plain mpirun cannot do that: on SIGTERM/SIGINT it gives the ranks SIGTERM and,
# one second later (odls_base_sigkill_timeout), SIGKILL. It forwards SIGUSR1 at once, though,
# and andyllm treats SIGUSR1 like SIGTERM; so this script runs mpirun in its own session (Ctrl-C
# reaches only the script) and turns SIGTERM/SIGINT into SIGUSR1 to mpirun. A second
# SIGTERM/SIGINT aborts at once (SIGTERM to mpirun: no checkpoint).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -lt 2 ]; then
  echo "usage: scripts/mpirun.sh N SUBCOMMAND [flags]" >&2
  exit 2
fi
n=$1
shift
setsid mpirun -np "$n" --bind-to none --stdin none "$ANDYLLM_BIN" "$@" &
job=$!
stops=0
stop() {
  stops=$((stops + 1))
  if [ "$stops" = 1 ]; then
    echo "[mpirun.sh] $1: asking every rank to checkpoint and stop (SIGUSR1 to mpirun);" \
         "send it again to abort without a checkpoint" >&2
    kill -USR1 "$job" 2>/dev/null || true
  else
    echo "[mpirun.sh] $1 again: aborting the job (SIGTERM to mpirun, no checkpoint)" >&2
    kill -TERM "$job" 2>/dev/null || true
  fi
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
# `wait` returns early when a trapped signal arrives: wait again until mpirun has exited.
set +e
while true; do
  wait "$job"
  rc=$?
  kill -0 "$job" 2>/dev/null || exit "$rc"
done
