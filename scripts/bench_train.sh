#!/usr/bin/env bash
# Training throughput of AndyLLM against PyTorch on the same model and settings, in one run:
#   andyllm bench train (mpirun, RANKS ranks x 1 intra-op thread, MPI all-reduce)
#   scripts/bench_pytorch.py (Debian python3-torch 1.13, RANKS gloo DDP processes x 1 thread)
# for fp32 and bf16. Model: configs/tiny.toml's shapes (dim 128, 4 layers, vocab 4096, seq 128,
# micro-batch 8 per rank) unless CONFIG / overrides say otherwise.
#
# AndyLLM runs three times per mode: as shipped, with its malloc tuning off and with its fused
# CPU kernels off (the ratio each buys); with several ranks once more with the gradients
# all-reduced instead of the distributed optimizer; in fp32 once more with OpenBLAS's sgemm
# instead of oneDNN's for the linears.
#   scripts/bench_train.sh [RANKS] [STEPS]        # default 2 ranks, 20 steps (3 untimed)
#   CONFIG=configs/bench_medium_cpu.toml scripts/bench_train.sh 2 10   # a 25 M parameter model
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS="${1:-2}"
STEPS="${2:-20}"
BIN="${ANDYLLM_BIN:-build/andyllm}"
CONFIG="${CONFIG:-configs/tiny.toml}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# One thread per rank everywhere: torch intra-op and OpenBLAS pools contend otherwise (DEPENDENCIES).
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
[ -x "$BIN" ] || { echo "bench_train: $BIN not built" >&2; exit 1; }
[ -f data/demo/processed/tokenizer.model ] || { echo "bench_train: run the demo preprocess first (docs/TRAINING.md)" >&2; exit 1; }
echo "# $(date -u +%FT%TZ) $(nproc --all) cores, $(lscpu | sed -n 's/^Model name: *//p')"
for mode in fp32 bf16; do
  echo "## $mode"
  mpirun -np "$RANKS" --oversubscribe "$BIN" bench train --config "$CONFIG" --steps "$STEPS" --warmup 3 \
    --set precision.mode=$mode --set train.intra_op_threads=1 2>&1 | grep -v "^\s*$"
  echo "# the same without AndyLLM's malloc tuning (ANDYLLM_MALLOC_TUNING=0, launch/main.cpp):"
  mpirun -np "$RANKS" --oversubscribe -x ANDYLLM_MALLOC_TUNING=0 "$BIN" bench train --config "$CONFIG" \
    --steps "$STEPS" --warmup 3 --set precision.mode=$mode --set train.intra_op_threads=1 2>&1 |
    grep -E "^(step time|tokens/s)"
  echo "# the same without the fused CPU kernels (ANDYLLM_FUSED_OPS=0, core/model/fused_ops.h):"
  mpirun -np "$RANKS" --oversubscribe -x ANDYLLM_FUSED_OPS=0 "$BIN" bench train --config "$CONFIG" \
    --steps "$STEPS" --warmup 3 --set precision.mode=$mode --set train.intra_op_threads=1 2>&1 |
    grep -E "^(step time|tokens/s)"
  if [ "$RANKS" -gt 1 ]; then
    echo "# the same with the gradients all-reduced (parallel.distributed_optimizer=false, docs/TRAINING.md):"
    mpirun -np "$RANKS" --oversubscribe "$BIN" bench train --config "$CONFIG" --steps "$STEPS" --warmup 3 \
      --set precision.mode=$mode --set train.intra_op_threads=1 --set parallel.distributed_optimizer=false 2>&1 |
      grep -E "^(step time|tokens/s|comm wait share)"
  fi
  if [ "$mode" = fp32 ]; then
    echo "# the same with OpenBLAS's sgemm for the linears (ANDYLLM_CPU_GEMM=blas, parallel/cpu_gemm.h):"
    mpirun -np "$RANKS" --oversubscribe -x ANDYLLM_CPU_GEMM=blas "$BIN" bench train --config "$CONFIG" \
      --steps "$STEPS" --warmup 3 --set precision.mode=$mode --set train.intra_op_threads=1 2>&1 |
      grep -E "^(step time|tokens/s)"
  fi
  extra=""; [ "$mode" = bf16 ] && extra="--bf16"
  # PyTorch with the malloc settings AndyLLM applies to itself (launch/main.cpp's mallopt).
  MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \
  /usr/bin/python3 scripts/bench_pytorch.py --config "$CONFIG" --ranks "$RANKS" --threads 1 --steps "$STEPS" --warmup 3 $extra
done
