#!/usr/bin/env bash
# The built-in demo, end to end on this machine (nothing is downloaded):
#   1. set up (Debian packages + build)          4. tokenizer + HDF5 shards from the demo corpus
#   2. andyllm version                            5. train configs/tiny.toml on 2 MPI ranks
#   3. a 2-rank collective check (bench comm)     6. plot the curves, say where everything went
# Re-running reuses the corpus and dataset; ANDYLLM_FRESH=1 rebuilds them and restarts training.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$ANDYLLM_ROOT/scripts/setup.sh"
cd "$ANDYLLM_ROOT"

RANKS=${ANDYLLM_RANKS:-2}
RAW=data/demo/raw
DATA=data/demo/processed
OUT=outputs/tiny

echo
echo "== andyllm version"
"$ANDYLLM_BIN" version

echo
echo "== collective check on $RANKS ranks (andyllm bench comm)"
mpirun -np "$RANKS" "$ANDYLLM_BIN" bench comm --max_bytes 1048576 --iters 3

if [ "${ANDYLLM_FRESH:-0}" = 1 ]; then rm -rf "$RAW" "$DATA" "$OUT"; fi
if [ ! -d "$RAW" ]; then
  echo
  echo "== demo corpus from Debian's fortunes package -> $RAW"
  scripts/make_demo_corpus.sh "$RAW"
fi
if [ ! -f "$DATA/manifest.json" ]; then
  echo
  echo "== andyllm preprocess -> $DATA"
  rm -rf "$DATA"
  "$ANDYLLM_BIN" preprocess --input_dir "$RAW" --output_dir "$DATA" --vocab_size 4096
else
  echo
  echo "== dataset $DATA already present (ANDYLLM_FRESH=1 rebuilds it)"
fi

echo
echo "== mpirun -np $RANKS andyllm train --config configs/tiny.toml"
# --resume auto (the default) continues a previous run of this demo from its latest checkpoint;
# Ctrl-C makes every rank write one first (scripts/mpirun.sh).
scripts/mpirun.sh "$RANKS" train --config configs/tiny.toml --output_dir "$OUT"

echo
echo "== loss and throughput curves (gnuplot)"
scripts/plot_metrics.sh "$OUT/metrics.jsonl" || echo "(plotting failed; metrics are in $OUT/metrics.jsonl)"

echo
echo "== written:"
echo "  tokenizer + shards:  $DATA/ (tokenizer.model, train/, validation/, manifest.json)"
echo "  run outputs:         $OUT/ (config.toml, metrics.jsonl, checkpoints/, best_model/, *.png)"
