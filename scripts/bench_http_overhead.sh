#!/usr/bin/env bash
# The HTTP server's overhead: `andyllm serve` + `andyllm bench serve` against `andyllm bench
# generate` (the engine alone) at the same concurrency, prompt count, lengths and threads, back to
# back, ROUNDS times. Prints serve output tokens/s, bench generate's, and their ratio per cell.
#   scripts/bench_http_overhead.sh MODEL_DIR [RANKS] [CONCURRENCY] [ROUNDS]
#   scripts/bench_http_overhead.sh outputs/tiny/best_model 1 1,8,32 3
#   NUM_PROMPTS=32 OUTPUT_LEN=64 scripts/bench_http_overhead.sh outputs/bench_medium_cpu/best_model 2 1,32
# Env: NUM_PROMPTS (default 128), INPUT_LEN (128), OUTPUT_LEN (128), THREADS (intra-op threads
# per rank, default 1). The server listens on 127.0.0.1 on a free port and is stopped here.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ANDYLLM_ROOT"
MODEL="${1:?usage: scripts/bench_http_overhead.sh MODEL_DIR [RANKS] [CONCURRENCY] [ROUNDS]}"
RANKS="${2:-1}"
LEVELS="${3:-1,8,32}"
ROUNDS="${4:-1}"
NUM_PROMPTS="${NUM_PROMPTS:-128}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
THREADS="${THREADS:-1}"
[ -x "$ANDYLLM_BIN" ] || { echo "bench_http_overhead: $ANDYLLM_BIN not built" >&2; exit 1; }
[ -d "$MODEL" ] || { echo "bench_http_overhead: no model directory $MODEL" >&2; exit 1; }
LAUNCH=()
[ "$RANKS" -gt 1 ] && LAUNCH=(mpirun -np "$RANKS")
WORK="$(mktemp -d)"
SERVER=""
stop_server() {
  [ -n "$SERVER" ] || return 0
  # SIGUSR1 reaches every rank through mpirun and drains; a single process takes SIGTERM.
  if [ "$RANKS" -gt 1 ]; then kill -USR1 "$SERVER" 2>/dev/null || true; else kill "$SERVER" 2>/dev/null || true; fi
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}
trap 'stop_server; rm -rf "$WORK"' EXIT
FLAGS=(--concurrency "$LEVELS" --num_prompts "$NUM_PROMPTS" --input_len "$INPUT_LEN" --output_len "$OUTPUT_LEN")
echo "# $(date -u +%FT%TZ) $(nproc --all) cores; $MODEL, $RANKS rank(s) x $THREADS thread(s); $NUM_PROMPTS prompts, $INPUT_LEN in / $OUTPUT_LEN out"
printf "%-6s %-5s %12s %12s %8s\n" round conc serve_tok/s engine_tok/s ratio
for round in $(seq "$ROUNDS"); do
  "${LAUNCH[@]}" "$ANDYLLM_BIN" serve --model "$MODEL" --port 0 --set train.intra_op_threads="$THREADS" \
    > "$WORK/serve.log" 2>&1 &
  SERVER=$!
  port=""
  for _ in $(seq 600); do
    port="$(sed -n 's/.*ready at .*(port \([0-9]*\)).*/\1/p' "$WORK/serve.log" | head -1)"
    [ -n "$port" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/serve.log" >&2; echo "bench_http_overhead: the server did not start" >&2; exit 1; }
    sleep 0.2
  done
  [ -n "$port" ] || { echo "bench_http_overhead: the server was not ready within 120 s" >&2; exit 1; }
  "$ANDYLLM_BIN" bench serve --url "http://127.0.0.1:$port" "${FLAGS[@]}" > "$WORK/serve_bench.txt"
  stop_server
  "${LAUNCH[@]}" "$ANDYLLM_BIN" bench generate --model "$MODEL" "${FLAGS[@]}" --set train.intra_op_threads="$THREADS" \
    > "$WORK/generate_bench.txt" 2>&1
  # bench serve: "conc req/s out_tok/s ..."; bench generate: "conc reqs seconds prefill/s decode/s output/s ...".
  IFS=, read -ra levels <<< "$LEVELS"
  for c in "${levels[@]}"; do
    s="$(awk -v c="$c" '$1 == c {print $3}' "$WORK/serve_bench.txt" | tail -1)"
    g="$(awk -v c="$c" '$1 == c {print $6}' "$WORK/generate_bench.txt" | tail -1)"
    if [ -z "$s" ] || [ -z "$g" ]; then
      cat "$WORK/serve_bench.txt" "$WORK/generate_bench.txt" >&2
      echo "bench_http_overhead: no figures for concurrency $c" >&2
      exit 1
    fi
    awk -v r="$round" -v c="$c" -v s="$s" -v g="$g" 'BEGIN { printf "%-6s %-5s %12.1f %12.1f %8.3f\n", r, c, s, g, s / g }'
  done
done
