#!/usr/bin/env bash
# Draws the training curves of an `andyllm train` run with gnuplot:
#   OUT_DIR/loss.png        training loss per logged step, and validation loss
#   OUT_DIR/throughput.png  tokens/s per logged step
#
#   scripts/plot_metrics.sh outputs/tiny/metrics.jsonl [OUT_DIR]   # OUT_DIR: beside the file
set -euo pipefail

METRICS="${1:?usage: scripts/plot_metrics.sh METRICS_JSONL [OUT_DIR]}"
OUT="${2:-$(dirname "$METRICS")}"
command -v gnuplot >/dev/null || { echo "plot_metrics: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -f "$METRICS" ] || { echo "plot_metrics: $METRICS not found" >&2; exit 1; }
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# field NAME LINE -> the number after "NAME": (metrics.jsonl is one flat JSON object per line).
awk -v train="$TMP/train.tsv" -v val="$TMP/val.tsv" '
  function field(name,   m) {
    if (match($0, "\"" name "\": *[-0-9.eE+]+")) {
      m = substr($0, RSTART, RLENGTH); sub(/^[^:]*: */, "", m); return m
    }
    return ""
  }
  {
    s = field("step")
    if (index($0, "\"val_loss\"")) { v = field("val_loss"); if (v != "") print s "\t" v > val }
    else { l = field("loss"); t = field("tokens_per_sec"); if (l != "") print s "\t" l "\t" (t == "" ? "NaN" : t) > train }
  }' "$METRICS"
touch "$TMP/train.tsv" "$TMP/val.tsv"

VAL_PLOT=""
if [ -s "$TMP/val.tsv" ]; then VAL_PLOT=", '$TMP/val.tsv' using 1:2 with linespoints lw 2 title 'validation loss'"; fi
gnuplot <<GP
set terminal pngcairo size 900,500 noenhanced
set grid
set xlabel 'step'
set output '$OUT/loss.png'
set ylabel 'loss'
set title 'loss ($METRICS)'
plot '$TMP/train.tsv' using 1:2 with lines lw 2 title 'training loss'$VAL_PLOT
set output '$OUT/throughput.png'
set ylabel 'tokens/s'
set title 'throughput ($METRICS)'
plot '$TMP/train.tsv' using 1:3 with lines lw 2 title 'tokens/s'
GP
echo "wrote $OUT/loss.png and $OUT/throughput.png"
