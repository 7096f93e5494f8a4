#!/usr/bin/env bash
# Random-weight PaliGemma with the real 3B shapes -> `pgexport onnx --int8`, on this machine:
# wall time and peak RSS of each step, sizes and parity from the manifest.
#   bash benchmarks/export_3b.sh [PRESET]        (PRESET: pg1-3b-224 (default), pg2-3b-224, ...)
# Needs ~40 GB of free disk under $WORK (checkpoint 11.7 GB, fp32 graphs 14 GB, int8 3.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-pg1-3b-224}
WORK=${WORK:-/tmp/pgexport-bench/$PRESET}
RESULTS=benchmarks/results/export_3b.jsonl
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK"
if [ ! -f "$WORK/checkpoint/config.json" ]; then
  $PY benchmarks/measure.py --label "$PRESET: build random checkpoint + save_pretrained" --json "$RESULTS" -- \
    $PY -m pgexport.random_model "$PRESET" "$WORK/checkpoint"
fi
$PY benchmarks/measure.py --label "$PRESET: pgexport onnx --int8 (export fp32, quantize int8, validate both)" --json "$RESULTS" -- \
  $PY -m pgexport.cli onnx "$WORK/checkpoint" -o "$WORK/artifact" --int8 --force --json > "$WORK/manifest.json" || true
$PY benchmarks/summarize_export.py "$WORK/manifest.json" --label "$PRESET" >> benchmarks/results/export_3b.md
tail -n 30 benchmarks/results/export_3b.md
