#!/usr/bin/env bash
# AndyLLM's engine against llama.cpp (node-llama-cpp's prebuilt CPU build) on the same weights,
# one thread each, back to back in one run (docs/PERFORMANCE.md, "AndyLLM vs llama.cpp").
#   scripts/bench_vs_llama_cpp.sh MODEL_DIR [CONCURRENCY (1,32)] [INPUT_LEN (128)] [OUTPUT_LEN (128)]
# Exports MODEL_DIR to GGUF f32 and q8_0 and quantizes it to int8 under $WORK (default a temp
# dir), then runs: andyllm bench generate (fp32), llama.cpp (f32), andyllm bench generate (int8),
# llama.cpp (q8_0). Needs build/formats-node (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/bench_vs_llama_cpp.sh MODEL_DIR [CONCURRENCY] [INPUT_LEN] [OUTPUT_LEN]}
CONC=${2:-1,32}
IN=${3:-128}
OUT=${4:-128}
BIN=${ANDYLLM_BIN:-build/andyllm}
WORK=${WORK:-$(mktemp -d /tmp/andyllm-vs-llama-XXXXXX)}
mkdir -p "$WORK"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
echo "== exporting $MODEL to $WORK"
"$BIN" export --format gguf --model_path "$MODEL" --output "$WORK/f32.gguf" --dtype f32 --overwrite
"$BIN" export --format gguf --model_path "$MODEL" --output "$WORK/q8_0.gguf" --dtype q8_0 --overwrite
"$BIN" quantize --model_path "$MODEL" --output_path "$WORK/int8" --overwrite
run_ours() {
  "$BIN" bench generate --model "$1" --concurrency "$CONC" --input_len "$IN" --output_len "$OUT" \
      --set train.intra_op_threads=1 2>&1 | grep -v " info: \| warn: "
}
echo "== AndyLLM fp32"; run_ours "$MODEL"
echo "== llama.cpp f32"; node scripts/bench_llama_cpp.mjs "$WORK/f32.gguf" --concurrency "$CONC" --input_len "$IN" --output_len "$OUT" --threads 1
echo "== AndyLLM int8"; run_ours "$WORK/int8"
echo "== llama.cpp q8_0"; node scripts/bench_llama_cpp.mjs "$WORK/q8_0.gguf" --concurrency "$CONC" --input_len "$IN" --output_len "$OUT" --threads 1
