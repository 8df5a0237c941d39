#!/usr/bin/env bash
# Builds the demo corpus for `andyllm preprocess` from Debian's `fortunes` package (installed by
# scripts/setup.sh; nothing is downloaded): every fortune file under the games fortunes folder
# becomes data/demo/raw/<file>/<file>-NNNN.txt, each .txt one document of up to
# FORTUNES_PER_DOC fortunes (default 20) separated by blank lines.
#
#   scripts/make_demo_corpus.sh [OUT_DIR]        # default: data/demo/raw (git-ignored)
#   build/andyllm preprocess --input_dir data/demo/raw --output_dir data/demo/processed --vocab_size 4096
set -euo pipefail

SRC="${FORTUNES_DIR:-/usr/share/games/fortunes}"
OUT="${1:-data/demo/raw}"
PER_DOC="${FORTUNES_PER_DOC:-20}"

if [ ! -d "$SRC" ]; then
  echo "make_demo_corpus: $SRC not found: install the Debian package 'fortunes' (scripts/setup.sh does)" >&2
  exit 1
fi

rm -rf "$OUT"
mkdir -p "$OUT"
n_files=0
for f in "$SRC"/*; do
  name="$(basename "$f")"
  case "$name" in *.dat|*.u8) continue ;; esac
  [ -f "$f" ] || continue
  mkdir -p "$OUT/$name"
  # A fortune ends at a line holding only '%'. Backspace overstriking (x\bx) is removed.
  LC_ALL=C awk -v bs="$(printf '\b')" -v out="$OUT/$name/$name" -v per="$PER_DOC" '
    function flush_doc() {
      if (doc != "") { printf "%s", doc > sprintf("%s-%04d.txt", out, ndoc); close(sprintf("%s-%04d.txt", out, ndoc)); ndoc++ }
      doc = ""; nf = 0
    }
    function end_fortune() {
      if (cur ~ /[^ \t\n]/) { doc = doc (nf ? "\n" : "") cur; nf++; if (nf >= per) flush_doc() }
      cur = ""
    }
    { while (gsub("[^" bs "]" bs, "") > 0) {} gsub(bs, "") }
    /^%$/ { end_fortune(); next }
    { cur = cur $0 "\n" }
    END { end_fortune(); flush_doc() }
  ' "$f"
  n_files=$((n_files + 1))
done

docs=$(find "$OUT" -name '*.txt' | wc -l)
bytes=$(du -sb "$OUT" | cut -f1)
echo "make_demo_corpus: $n_files fortune files -> $docs documents, $bytes bytes in $OUT"
