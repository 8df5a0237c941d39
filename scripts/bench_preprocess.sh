#!/usr/bin/env bash
# Tokenization throughput of `andyllm preprocess` against Python sentencepiece (Debian's
# python3-sentencepiece: the same library and tokenizer model), one run each, on a corpus of
# about SIZE_MB made from copies of the demo corpus (data/demo/raw, from scripts/quickstart.sh):
#   python   : one process, SentencePieceProcessor.encode of every document (what the seed did)
#   andyllm  : preprocess --tokenizer_path (the same model, so no tokenizer training is timed)
#              with --threads 1, --threads 2, and mpirun -np 2 --threads 1 (whose rates are
#              rank 0's share: twice that in all)
# Reported: the tokenize step's MB/s from preprocess's progress line (reading the text again,
# encoding, writing the shards), the encoder's own rate (the time inside the encoder only, as
# the Python figure is), and the whole command's wall time (reading, counting, tokenizing, HDF5
# shards with checksums, manifest).
# AndyLLM encodes word by word through a per-thread cache of encoded words (data/tokenizer.h);
# on copies of one corpus every word after the first copy is a cache hit, so the script also
# measures one copy alone (no text repeated: the cache's lower bound here) for both, and the
# copies with the cache off (ANDYLLM_TOKENIZER_WORD_CACHE=0: sentencepiece on whole texts).
#   scripts/bench_preprocess.sh [SIZE_MB]    # default 32
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
SIZE_MB="${1:-32}"
BIN="${ANDYLLM_BIN:-build/andyllm}"
RAW=data/demo/raw
TOK=data/demo/processed/tokenizer.model
[ -d "$RAW" ] && [ -f "$TOK" ] || { echo "bench_preprocess: run scripts/quickstart.sh first (needs $RAW and $TOK)" >&2; exit 1; }
WORK="$(mktemp -d /tmp/andyllm-bench-preprocess-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
raw_bytes=$(du -sb "$RAW" | cut -f1)
copies=$(( (SIZE_MB * 1000000 + raw_bytes - 1) / raw_bytes ))
for i in $(seq "$copies"); do cp -r "$RAW" "$WORK/corpus/copy$i" 2>/dev/null || { mkdir -p "$WORK/corpus"; cp -r "$RAW" "$WORK/corpus/copy$i"; }; done
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); corpus: $copies copies of $RAW, $(( $(du -sb "$WORK/corpus" | cut -f1) / 1000000 )) MB"

python_rate() {  # python_rate DIR LABEL
/usr/bin/python3 - "$1" "$TOK" "$2" <<'PY'
import os, sys, time
import sentencepiece as spm
root, model = sys.argv[1], sys.argv[2]
docs = []
for d, _, files in os.walk(root):
    for f in sorted(files):
        if f.endswith(".txt"):
            with open(os.path.join(d, f), encoding="utf-8") as fh:
                docs.append(fh.read())
sp = spm.SentencePieceProcessor(model_file=model)
n_bytes = sum(len(t.encode("utf-8")) for t in docs)
t0 = time.perf_counter()
tokens = sum(len(sp.encode(t)) for t in docs)
dt = time.perf_counter() - t0
print(f"python sentencepiece {spm.__version__}, 1 process, {sys.argv[3]}: {len(docs)} docs, {tokens} tokens, "
      f"{n_bytes / dt / 1e6:.2f} MB/s ({dt:.2f} s)")
PY
}
python_rate "$WORK/corpus" "all copies"
python_rate "$WORK/corpus/copy1" "one copy"

run() {  # [IN=DIR] run LABEL COMMAND...
  local label="$1"; shift
  local t0 t1 line
  t0=$(date +%s.%N)
  line=$("$@" --input_dir "${IN:-$WORK/corpus}" --output_dir "$WORK/out" --tokenizer_path "$TOK" --overwrite 2>&1 |
         grep "tokenize.*done in" | tail -1 | sed 's/.*tokens | //')
  t1=$(date +%s.%N)
  printf "andyllm %-28s tokenize: %s | whole command %.2f s\n" "$label" "$line" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
}
run "--threads 1" "$BIN" preprocess --threads 1
run "--threads 2" "$BIN" preprocess --threads 2
run "mpirun -np 2 --threads 1" mpirun -np 2 "$BIN" preprocess --threads 1
ANDYLLM_TOKENIZER_WORD_CACHE=0 run "--threads 1, no word cache" "$BIN" preprocess --threads 1
IN="$WORK/corpus/copy1" run "--threads 1, one copy" "$BIN" preprocess --threads 1
IN="$WORK/corpus/copy1" run "--threads 2, one copy" "$BIN" preprocess --threads 2
IN="$WORK/corpus/copy1" run "mpirun -np 2 --threads 1, one copy" mpirun -np 2 "$BIN" preprocess --threads 1
IN="$WORK/corpus/copy1" ANDYLLM_TOKENIZER_WORD_CACHE=0 run "--threads 1, one copy, no cache" "$BIN" preprocess --threads 1
