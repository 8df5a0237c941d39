#!/usr/bin/env bash
# Every command of docs/WORKFLOW.md (the Python workflow, in AndyLLM) on the demo data, on CPU:
#    1. demo corpus (scripts/make_demo_corpus.sh)     6. generate, greedy (fp32 and int8)
#    2. preprocess: tokenizer + HDF5 shards           7. serve on 127.0.0.1, query it with curl
#    3. train configs/tiny.toml on 2 MPI ranks        8. export: Hugging Face and GGUF (f16, q8_0)
#    4. eval (loss, perplexity)                       9. the HF directory: same greedy tokens
#    5. quantize (int8 dynamic), eval the int8 model 10. the GGUF files in llama.cpp
# Steps 9 and 10 also run the independent readers where they are installed: llama.cpp
# (node-llama-cpp in build/formats-node, scripts/setup.sh) and tests/formats/hf_reference.py
# (Debian's python3-torch); without them those comparisons are skipped, and said so.
#
#   scripts/workflow_demo.sh                         # everything under outputs/workflow_demo/
#   ANDYLLM_WORKFLOW_STEPS=300 scripts/workflow_demo.sh
# Environment (all optional):
#   ANDYLLM_WORKFLOW_DIR         work directory (default outputs/workflow_demo); a previous run of
#                                this script there is replaced, any other non-empty one refused
#   ANDYLLM_WORKFLOW_CORPUS      raw text (default data/demo/raw, made when missing)
#   ANDYLLM_WORKFLOW_STEPS       training steps (default 60)
#   ANDYLLM_WORKFLOW_MAX_TOKENS  tokens per greedy continuation in the comparisons (default 16)
#   ANDYLLM_WORKFLOW_LLAMA_TOKENS  of which llama.cpp computes (default 8: it is slow on busy cores)
#   ANDYLLM_BIN                  the andyllm executable (default build/andyllm)
# Exits non-zero, naming the step, on any failure; the server is stopped on every exit.
set -eEuo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
START_DIR="$PWD"
cd "$ANDYLLM_ROOT"

abs() { case "$1" in /*) echo "$1" ;; *) echo "$START_DIR/$1" ;; esac; }
WORK=outputs/workflow_demo
[ -n "${ANDYLLM_WORKFLOW_DIR:-}" ] && WORK="$(abs "$ANDYLLM_WORKFLOW_DIR")"
CORPUS=data/demo/raw
[ -n "${ANDYLLM_WORKFLOW_CORPUS:-}" ] && CORPUS="$(abs "$ANDYLLM_WORKFLOW_CORPUS")"
STEPS=${ANDYLLM_WORKFLOW_STEPS:-60}
MAX_TOKENS=${ANDYLLM_WORKFLOW_MAX_TOKENS:-16}
LLAMA_TOKENS=${ANDYLLM_WORKFLOW_LLAMA_TOKENS:-8}
[ "$LLAMA_TOKENS" -le "$MAX_TOKENS" ] || LLAMA_TOKENS=$MAX_TOKENS
MPIRUN=${ANDYLLM_MPIEXEC:-mpirun}
FORMATS_NODE=${ANDYLLM_FORMATS_NODE:-$ANDYLLM_ROOT/build/formats-node}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
RANKS=2
TOTAL=10
PROMPTS=("The meaning of life is" "A fool and his money" "Q: What do you call")

DATA=$WORK/processed
RUN=$WORK/my_model
BEST=$RUN/best_model
INT8=$WORK/my_model_int8
HF=$WORK/my_model_hf
HF_BF16=$WORK/my_model_hf_bf16
GGUF_F16=$WORK/my_model-f16.gguf
GGUF_Q8=$WORK/my_model-q8_0.gguf
LOGS=$WORK/logs
GEN=$WORK/generate

# ---- progress, failure, commands ------------------------------------------------------------
T0=$(date +%s.%N)
STEP_NO=0
STEP_NAME="setup"
STEP_T0=$T0
SERVER_PID=""

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
step() {
  [ "$STEP_NO" = 0 ] || echo "      done in $(since "$STEP_T0") s"
  STEP_NO=$((STEP_NO + 1))
  STEP_NAME=$1
  STEP_T0=$(date +%s.%N)
  echo
  echo "[workflow $STEP_NO/$TOTAL] $STEP_NAME (elapsed $(since "$T0") s)"
}
fail() {
  trap - ERR
  echo >&2
  echo "workflow_demo: FAILED at step $STEP_NO/$TOTAL ($STEP_NAME): $*" >&2
  [ "$STEP_NO" = 0 ] || echo "workflow_demo: logs in $LOGS/, outputs in $WORK/" >&2
  exit 1
}
trap 'fail "a command failed (scripts/workflow_demo.sh line $LINENO, exit $?)"' ERR
# A command as the page writes it: andyllm for the executable, arguments quoted only when needed.
show() {
  local out="" a
  for a in "$@"; do
    [ "$a" = "$ANDYLLM_BIN" ] && a=andyllm
    [ "$a" = "$MPIRUN" ] && a=mpirun
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+=" $a"; else out+=" '$a'"; fi
  done
  echo "  \$${out}"
}
# run LOG CMD...: shows CMD, runs it with its output in LOGS/LOG.log; on failure shows the log's tail.
run() {
  local log="$LOGS/$1.log" rc=0
  shift
  show "$@"
  "$@" > "$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 20 "$log" | sed 's/^/    | /' >&2
    fail "exit $rc from: $(show "$@" | sed 's/^  \$ //') (log: $log)"
  fi
}
py() { "$PY" - "$@"; }

# The server, if one runs, is asked to drain (SIGUSR1 to mpirun, which forwards it to every rank),
# then ended harder if it has not exited within 20 s.
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  local pid=$SERVER_PID rc=0 i
  SERVER_PID=""
  kill -USR1 "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "  (the server did not stop on SIGUSR1 within 20 s: SIGTERM, then SIGKILL)" >&2
    kill -TERM "$pid" 2>/dev/null || true
    sleep 3
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}
on_exit() {
  local rc=$?
  trap - ERR
  stop_server || true
  exit "$rc"
}
trap on_exit EXIT
trap 'fail "interrupted (SIGINT)"' INT
trap 'fail "terminated (SIGTERM)"' TERM

# ---- 0. where things go ---------------------------------------------------------------------
[ -x "$ANDYLLM_BIN" ] || fail "$ANDYLLM_BIN not found: build it first (scripts/setup.sh)"
if [ -d "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
  [ -f "$WORK/.andyllm_workflow_demo" ] ||
    fail "$WORK is not empty and was not written by this script: choose another ANDYLLM_WORKFLOW_DIR"
  echo "workflow_demo: replacing the previous run in $WORK"
  rm -rf "$WORK"
fi
mkdir -p "$WORK" "$LOGS" "$GEN"
touch "$WORK/.andyllm_workflow_demo"
echo "workflow_demo: $("$ANDYLLM_BIN" version | head -n 1); work directory $WORK; $STEPS training steps on $RANKS ranks"

# ---- 1. corpus ------------------------------------------------------------------------------
step "demo corpus"
if [ -d "$CORPUS" ] && [ -n "$(ls -A "$CORPUS")" ]; then
  echo "  $CORPUS already present ($(find "$CORPUS" -name '*.txt' | wc -l) documents)"
else
  run corpus scripts/make_demo_corpus.sh "$CORPUS"
  tail -n 1 "$LOGS/corpus.log" | sed 's/^/  /'
fi

# ---- 2. preprocess (python preprocess_data.py) -----------------------------------------------
step "preprocess: sentencepiece tokenizer + sharded HDF5 tokens"
run preprocess "$ANDYLLM_BIN" preprocess --input_dir "$CORPUS" --output_dir "$DATA" --vocab_size 4096
[ -f "$DATA/manifest.json" ] || fail "no $DATA/manifest.json"
grep -o 'train [0-9]* docs.*vocab [0-9]*' "$LOGS/preprocess.log" | sed 's/^/  /'

# ---- 3. train (torchrun train.py) -----------------------------------------------------------
step "train configs/tiny.toml on $RANKS MPI ranks, $STEPS steps"
run train "$MPIRUN" -np "$RANKS" "$ANDYLLM_BIN" train --config configs/tiny.toml \
  --train_file "$DATA/train.h5" --val_file "$DATA/validation.h5" --tokenizer_path "$DATA/tokenizer.model" \
  --output_dir "$RUN" --batch_size 8 --gradient_accumulation_steps 1 --learning_rate 2e-3 \
  --set "train.max_steps=$STEPS"
[ -f "$BEST/model.pt" ] || fail "no $BEST/model.pt"
grep -o 'training finished.*' "$LOGS/train.log" | sed 's/^/  /'

# ---- 4. eval --------------------------------------------------------------------------------
# The JSON line of `andyllm eval` (stdout) -> "loss L, perplexity P".
eval_summary() {
  py "$1" "$2" <<'EOF'
import json, sys
line = [l for l in open(sys.argv[2]) if l.startswith("{")][-1]
r = json.loads(line)
print(f"  {sys.argv[1]}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} over {r['tokens']} tokens")
EOF
}
step "eval best_model on the validation split"
run eval_fp32 "$MPIRUN" -np "$RANKS" "$ANDYLLM_BIN" eval --model_path "$BEST" --val_file "$DATA/validation"
eval_summary fp32 "$LOGS/eval_fp32.log"

# ---- 5. quantize (python quantize.py) -------------------------------------------------------
step "quantize: int8 dynamic, then eval the int8 model"
run quantize "$ANDYLLM_BIN" quantize --model_path "$BEST/model.pt" --output_path "$INT8" --quantization_type dynamic
grep -o 'linear weights.*' "$LOGS/quantize.log" | sed 's/^/  /'
run eval_int8 "$MPIRUN" -np "$RANKS" "$ANDYLLM_BIN" eval --model_path "$INT8" --val_file "$DATA/validation"
eval_summary int8 "$LOGS/eval_int8.log"

# ---- 6. generate ----------------------------------------------------------------------------
# generate MODEL OUT.jsonl RANKS: greedy continuations of PROMPTS.
generate() {
  local args=() p
  for p in "${PROMPTS[@]}"; do args+=(--prompt "$p"); done
  run "generate_$(basename "$2" .jsonl)" "$MPIRUN" -np "$3" "$ANDYLLM_BIN" generate --model "$1" "${args[@]}" \
    --max_tokens "$MAX_TOKENS" --temperature 0 --output "$2"
}
# compare_ids NAME A B [prefix]: how many greedy tokens A and B share (position by position, eos
# dropped); exit 1 when they differ. A and B: JSON lines of `andyllm generate`, or a JSON array of
# id lists. With `prefix`, A may be shorter: B's continuations are cut to A's lengths, and A may
# hold the first prompts only.
compare_ids() {
  py "$@" <<'EOF'
import json, sys
def ids(path):
    text = open(path).read().strip()
    if text.startswith("["):
        rows = json.loads(text)
        rows = [r["ids"] if isinstance(r, dict) else r for r in rows]
    else:
        rows = [json.loads(l)["token_ids"] for l in text.splitlines() if l.strip()]
    return [r[:-1] if r and r[-1] == 3 else r for r in rows]
name, a, b = sys.argv[1], ids(sys.argv[2]), ids(sys.argv[3])
if len(sys.argv) > 4 and sys.argv[4] == "prefix":
    b = [y[:max(len(x), 1)] for x, y in zip(a, b)]
assert len(a) == len(b), f"{len(a)} vs {len(b)} continuations"
n = len(a)
same = total = 0
for x, y in zip(a, b):
    same += sum(p == q for p, q in zip(x, y))
    total += max(len(x), len(y))
exact = all(x == y for x, y in zip(a, b))
print(f"  {name}: {'identical' if exact else 'differ'}: {same}/{total} greedy tokens equal "
      f"({100 * same / max(total, 1):.1f} %, {n} prompt{'s' if n > 1 else ''})")
sys.exit(0 if exact else 1)
EOF
}
show_texts() {
  py "$1" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  {r['prompt']!r} -> {r['text']!r}")
EOF
}
step "generate: greedy continuations on $RANKS tensor-parallel ranks"
generate "$BEST" "$GEN/best_model.jsonl" "$RANKS"
show_texts "$GEN/best_model.jsonl"
generate "$INT8" "$GEN/int8.jsonl" "$RANKS"
compare_ids "int8 vs fp32" "$GEN/int8.jsonl" "$GEN/best_model.jsonl" || true

# ---- 7. serve (python serve_model.py / vLLM's api_server) -----------------------------------
step "serve on 127.0.0.1 (OpenAI API) and query it with curl"
show "$MPIRUN" -np "$RANKS" "$ANDYLLM_BIN" serve --model "$BEST" --host 127.0.0.1 --port 0 \
  --tensor-parallel-size "$RANKS" --max-num-batched-tokens 8192 --block-size 16 --swap-space 1
"$MPIRUN" -np "$RANKS" "$ANDYLLM_BIN" serve --model "$BEST" --host 127.0.0.1 --port 0 \
  --tensor-parallel-size "$RANKS" --max-num-batched-tokens 8192 --block-size 16 --swap-space 1 \
  > "$LOGS/serve.log" 2>&1 &
SERVER_PID=$!
PORT=""
for _ in $(seq 600); do
  PORT=$(sed -n 's/.* ready at http:\/\/[^ ]* (port \([0-9]*\)).*/\1/p' "$LOGS/serve.log" | head -n 1)
  [ -n "$PORT" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 20 "$LOGS/serve.log" >&2; fail "the server exited before it was ready (log: $LOGS/serve.log)"; }
  sleep 0.1
done
[ -n "$PORT" ] || fail "no 'ready at' line from the server within 60 s (log: $LOGS/serve.log)"
RANK_PIDS=$(pgrep -P "$SERVER_PID" | tr '\n' ' ' || true)
URL=http://127.0.0.1:$PORT
grep -o 'andyllm serve: .*' "$LOGS/serve.log" | sed 's/^/  /'
MODEL_ID=$(curl -sS --max-time 10 "$URL/v1/models" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
# request NAME ROUTE JSON: POST with curl as the page shows it; the answer in LOGS/NAME.json.
request() {
  show curl "$URL$2" -H 'Content-Type: application/json' -d "$3"
  curl -sS --fail-with-body --max-time 60 "$URL$2" -H 'Content-Type: application/json' -d "$3" > "$LOGS/$1.json" ||
    fail "$2 answered: $(cat "$LOGS/$1.json")"
}
show curl "$URL/health"
HEALTH=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$URL/health")
[ "$HEALTH" = 200 ] || fail "/health answered $HEALTH"
echo "  /health: 200"
request completion /v1/completions \
  "{\"model\": \"$MODEL_ID\", \"prompt\": \"${PROMPTS[0]}\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0}"
request chat /v1/chat/completions \
  "{\"model\": \"$MODEL_ID\", \"messages\": [{\"role\": \"user\", \"content\": \"Tell me a fortune.\"}], \"max_tokens\": $MAX_TOKENS}"
# The prompts' token ids (/tokenize), for the independent readers of steps 9 and 10.
show curl "$URL/tokenize" -H 'Content-Type: application/json' -d "{\"prompt\": \"${PROMPTS[0]}\"}"
for p in "${PROMPTS[@]}"; do
  curl -sS --fail-with-body --max-time 10 "$URL/tokenize" -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"$p\"}" || fail "/tokenize failed"
  echo
done > "$GEN/prompt_ids.jsonl"
sed -n 1p "$GEN/prompt_ids.jsonl" | sed 's/^/  /'
py "$LOGS/completion.json" "$LOGS/chat.json" "$GEN/best_model.jsonl" <<'EOF' || fail "the served completion differs from andyllm generate"
import json, sys
completion = json.load(open(sys.argv[1]))["choices"][0]["text"]
chat = json.load(open(sys.argv[2]))["choices"][0]["message"]["content"]
offline = json.loads(open(sys.argv[3]).readline())["text"]
print(f"  /v1/completions: {completion!r} ({'the same text as andyllm generate' if completion == offline else 'DIFFERS from andyllm generate: ' + repr(offline)})")
print(f"  /v1/chat/completions: {chat!r}")
sys.exit(0 if completion == offline else 1)
EOF
GEN_TOKENS=$(curl -sS --max-time 10 "$URL/metrics" | sed -n 's/^vllm:generation_tokens_total{[^}]*} //p')
echo "  /metrics: vllm:generation_tokens_total $GEN_TOKENS"
# The page's openai snippet, where the Python package is installed (pip install openai).
for python in python3 /usr/bin/python3; do
  if "$python" -c 'import openai' 2>/dev/null; then
    echo "  openai Python client ($python):"
    OPENAI_BASE_URL=$URL/v1 MODEL_ID=$MODEL_ID "$python" - > "$LOGS/openai.log" 2>&1 <<'EOF' ||
import os
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="unused")
reply = client.chat.completions.create(
    model=os.environ["MODEL_ID"],
    messages=[{"role": "user", "content": "Tell me a fortune."}],
    max_tokens=32,
)
print(reply.choices[0].message.content)
for chunk in client.completions.create(model=os.environ["MODEL_ID"], prompt="Once upon a time",
                                       max_tokens=16, stream=True):
    print(chunk.choices[0].text, end="", flush=True)
print()
EOF
      fail "the openai client failed (log: $LOGS/openai.log)"
    sed 's/^/    | /' "$LOGS/openai.log"
    break
  fi
done
echo "  stopping the server (SIGUSR1 to mpirun: drain, then every rank exits 0)"
stop_server || fail "the server exited non-zero on SIGUSR1 (log: $LOGS/serve.log)"
for pid in $RANK_PIDS; do
  if kill -0 "$pid" 2>/dev/null; then fail "rank process $pid is still running after the server stopped"; fi
done
if curl -s -o /dev/null --max-time 2 "$URL/health"; then fail "$URL still answers after the server stopped"; fi
echo "  stopped: no rank left, $URL closed"

# ---- 8. export (python convert_to_vllm.py; llama.cpp) ---------------------------------------
step "export: Hugging Face directories (vLLM, transformers) and GGUF files (llama.cpp)"
run export_hf "$ANDYLLM_BIN" export --format hf --model_path "$BEST" --output_dir "$HF" \
  --tokenizer_path "$DATA/tokenizer.model"
run export_hf_bf16 "$ANDYLLM_BIN" export --format hf --model_path "$BEST" --output_dir "$HF_BF16" --dtype bfloat16
run export_gguf_f16 "$ANDYLLM_BIN" export --format gguf --model_path "$BEST" --output "$GGUF_F16" --dtype f16
run export_gguf_q8_0 "$ANDYLLM_BIN" export --format gguf --model_path "$INT8" --output "$GGUF_Q8" --dtype q8_0
for f in "$HF/config.json" "$HF/model.safetensors" "$HF/tokenizer.json" "$HF_BF16/model.safetensors" \
         "$GGUF_F16" "$GGUF_Q8"; do
  [ -s "$f" ] || fail "$f is missing or empty"
done
echo "  $HF/: $(ls "$HF" | tr '\n' ' ')"
echo "  $(basename "$GGUF_F16") $(du -k "$GGUF_F16" | cut -f1) KiB, $(basename "$GGUF_Q8") $(du -k "$GGUF_Q8" | cut -f1) KiB"

# ---- 9. check the Hugging Face export -------------------------------------------------------
step "check the Hugging Face directories: our engine, and an independent reader"
generate "$HF" "$GEN/hf.jsonl" "$RANKS"
compare_ids "HF directory vs best_model (andyllm generate)" "$GEN/hf.jsonl" "$GEN/best_model.jsonl" ||
  fail "generate from $HF gives other greedy tokens than from $BEST"
if "$PY" -c 'import torch, numpy' 2>/dev/null; then
  generate "$HF_BF16" "$GEN/hf_bf16.jsonl" 1
  py "$GEN/prompt_ids.jsonl" > "$GEN/prompt_ids.json" <<'EOF'
import json, sys
print(json.dumps([json.loads(l)["tokens"] for l in open(sys.argv[1]) if l.strip()]))
EOF
  run hf_reference "$PY" tests/formats/hf_reference.py "$HF_BF16" "$GEN/prompt_ids.json" "$MAX_TOKENS"
  grep '^\[' "$LOGS/hf_reference.log" | tail -n 1 > "$GEN/hf_reference.json"
  compare_ids "hf_reference.py (float64, transformers' equations) vs andyllm generate, bf16 directory" \
    "$GEN/hf_reference.json" "$GEN/hf_bf16.jsonl" ||
    echo "  (an undertrained model has near-ties that float64 and float32 may break differently)"
else
  echo "  skipped hf_reference.py: $PY has no torch + numpy (Debian: python3-torch python3-numpy)"
fi

# ---- 10. check the GGUF files in llama.cpp --------------------------------------------------
step "check the GGUF files in llama.cpp (node-llama-cpp)"
if [ -f "$FORMATS_NODE/node_modules/node-llama-cpp/package.json" ] && command -v node >/dev/null; then
  # f16 on every prompt; q8_0 on the first only (llama.cpp's CPU threads spin-wait, and on two
  # shared cores a token can take a second).
  py "${PROMPTS[@]}" > "$GEN/prompts.json" <<<'import json, sys; print(json.dumps(sys.argv[1:]))'
  py "${PROMPTS[0]}" > "$GEN/prompt_0.json" <<<'import json, sys; print(json.dumps(sys.argv[1:]))'
  for gguf in "$GGUF_F16" "$GGUF_Q8"; do
    name=$(basename "$gguf" .gguf)
    prompts=$GEN/prompts.json
    [ "$gguf" = "$GGUF_F16" ] || prompts=$GEN/prompt_0.json
    show node tests/formats/node/llama_generate.mjs "$gguf" "$prompts" "$LLAMA_TOKENS"
    ANDYLLM_FORMATS_NODE=$FORMATS_NODE node tests/formats/node/llama_generate.mjs "$gguf" "$prompts" \
      "$LLAMA_TOKENS" > "$GEN/llama_cpp_$name.json" 2> "$LOGS/llama_cpp_$name.log" ||
      fail "llama.cpp could not run $gguf (log: $LOGS/llama_cpp_$name.log)"
    py "$GEN/llama_cpp_$name.json" "$GEN/prompt_ids.jsonl" <<'EOF'
import json, sys
got = json.load(open(sys.argv[1]))
ours = [json.loads(l)["tokens"] for l in open(sys.argv[2]) if l.strip()][:len(got)]
same = sum(g["prompt_ids"] == o for g, o in zip(got, ours))
print(f"  llama.cpp tokenizes {same}/{len(got)} prompts as andyllm does; {got[0]['prompt']!r} -> {got[0]['text']!r}")
EOF
    compare_ids "llama.cpp $name vs andyllm generate (fp32)" "$GEN/llama_cpp_$name.json" "$GEN/best_model.jsonl" \
      prefix || true
  done
else
  echo "  skipped: node-llama-cpp is not installed in $FORMATS_NODE (scripts/setup.sh installs it)"
fi

echo "      done in $(since "$STEP_T0") s"
echo
echo "workflow_demo: all $TOTAL steps passed in $(since "$T0") s. Written:"
echo "  dataset       $DATA/ (tokenizer.model, train/, validation/, manifest.json)"
echo "  training run  $RUN/ (best_model/, checkpoints/, metrics.jsonl, config.toml)"
echo "  int8 model    $INT8/"
echo "  Hugging Face  $HF/ (float32), $HF_BF16/ (bfloat16): vllm serve $HF"
echo "  GGUF          $GGUF_F16, $GGUF_Q8: llama-cli -m $GGUF_F16 -p 'The meaning of life is'"
echo "  generations   $GEN/*.jsonl     logs  $LOGS/"
