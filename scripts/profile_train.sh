#!/usr/bin/env bash
# Where a training step's CPU time goes: `perf record` (call stacks through DWARF, CLOCK_MONOTONIC
# timestamps) around `andyllm bench train`, then scripts/perf_categories.py sorts the samples of
# the timed steps (the "timed window" line bench train prints) into matmul, attention, norms,
# rope + swiglu, cross-entropy, embedding, optimizer, communication, data, allocator and the rest.
#   scripts/profile_train.sh [RANKS] [STEPS]          # tiny model (configs/tiny.toml), fp32 and bf16
#   CONFIG=configs/bench_medium_cpu.toml FREQ=100 scripts/profile_train.sh 2 6
# Needs perf (Debian: linux-perf) and the right to use it (root, or kernel.perf_event_paranoid <= 1).
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS="${1:-2}"
STEPS="${2:-30}"
WARMUP="${WARMUP:-3}"
BIN="${ANDYLLM_BIN:-build/andyllm}"
CONFIG="${CONFIG:-configs/tiny.toml}"
FREQ="${FREQ:-200}"
MODES="${MODES:-fp32 bf16}"
DETAIL="${DETAIL:-3}"
OUT="${OUT:-$(mktemp -d /tmp/andyllm-profile.XXXXXX)}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
# oneDNN builds with JIT profiling name their kernels (the bf16 matmuls) in /tmp/perf-PID.map
# for perf; Debian's LibTorch 1.13 ignores this, and perf_categories.py files them as JIT code.
export DNNL_JIT_PROFILE=1 ONEDNN_JIT_PROFILE=1
command -v perf >/dev/null || { echo "profile_train: perf not found (Debian: apt-get install linux-perf)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "profile_train: $BIN not built" >&2; exit 1; }
[ -f data/demo/processed/tokenizer.model ] || { echo "profile_train: run the demo preprocess first (docs/TRAINING.md)" >&2; exit 1; }
mkdir -p "$OUT"
echo "# $(date -u +%FT%TZ) $(nproc --all) cores, $(lscpu | sed -n 's/^Model name: *//p'); $CONFIG, $RANKS ranks x 1 thread; perf data in $OUT"
for mode in $MODES; do
  echo "## $mode"
  perf record -q -k CLOCK_MONOTONIC --call-graph dwarf,16384 -F "$FREQ" -o "$OUT/perf_$mode.data" -- \
    mpirun -np "$RANKS" --oversubscribe "$BIN" bench train --config "$CONFIG" --steps "$STEPS" --warmup "$WARMUP" \
    --set precision.mode="$mode" --set train.intra_op_threads=1 > "$OUT/bench_$mode.txt" 2>&1 ||
    { cat "$OUT/bench_$mode.txt" >&2; exit 1; }
  grep -E "^(step time|tokens/s|comm wait share)" "$OUT/bench_$mode.txt"
  read -r t0 t1 < <(sed -n 's/^timed window *\([0-9.]*\) \([0-9.]*\).*/\1 \2/p' "$OUT/bench_$mode.txt")
  [ -n "${t1:-}" ] || { echo "profile_train: no 'timed window' line in $OUT/bench_$mode.txt" >&2; exit 1; }
  perf script -i "$OUT/perf_$mode.data" -F comm,pid,tid,time,ip,sym,dso 2>/dev/null |
    /usr/bin/python3 scripts/perf_categories.py --from "$t0" --to "$t1" --detail "$DETAIL" --title "$mode"
done
