#!/usr/bin/env bash
# Core ML conversion (`pgexport coreml`, fp16 and int4) of the demo model or of random-weight
# PaliGemma checkpoints with real 3B shapes, on this machine: wall time and peak RSS of each run
# (benchmarks/measure.py), package sizes from the manifest, appended to benchmarks/results/coreml.md.
#   bash benchmarks/coreml_3b.sh [PRESET|demo] [COMPRESS...]     (default: pg1-3b-224 none int4)
#   FLAGS=--validate bash benchmarks/coreml_3b.sh ...   also checks the wrappers against transformers (fp32) first
# 3B runs are memory-heavy: each holds /tmp/pgexport-heavy.lock. Needs ~15 GB of free disk under $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-pg1-3b-224}
shift || true
COMPRESS=${*:-none int4}
WORK=${WORK:-/tmp/coreml-bench/$PRESET}
RESULTS=$WORK/measure.jsonl  # raw measure.py lines; the table rows go to benchmarks/results/coreml.md
FLAGS=${FLAGS:---no-validate}
PY=${PY:-.venv/bin/python}
PGEXPORT=${PGEXPORT:-.venv/bin/pgexport}
mkdir -p "$WORK"
LOCK="flock /tmp/pgexport-heavy.lock"
if [ "$PRESET" = demo ]; then
  MODEL="" LOCK=""  # the demo model converts in seconds, in under 1 GB
else
  MODEL=${CHECKPOINT:-/tmp/pgexport-bench/$PRESET/checkpoint}
  [ -f "$MODEL/config.json" ] || flock /tmp/pgexport-heavy.lock $PY -m pgexport.random_model "$PRESET" "$MODEL"
fi
for compress in $COMPRESS; do
  label="$PRESET: pgexport coreml --compress $compress $FLAGS"
  $LOCK $PY benchmarks/measure.py --label "$label" --json "$RESULTS" -- \
    $PGEXPORT coreml $MODEL -o "$WORK/$compress" --compress "$compress" $FLAGS --force --json \
    > "$WORK/$compress.manifest.json" 2> "$WORK/$compress.log" || true
  $PY - "$RESULTS" "$WORK/$compress.manifest.json" "$label" >> benchmarks/results/coreml.md <<'PY'
import json, sys
results, manifest_path, label = sys.argv[1:]
run = [json.loads(line) for line in open(results) if json.loads(line)["label"] == label][-1]
try:
    packages = json.load(open(manifest_path))["packages"]
    sizes = ", ".join(f"{name} {p['bytes'] / 1e6:,.1f} MB (fp16 {p['fp16_bytes'] / 1e6:,.1f} MB)" for name, p in packages.items())
except (OSError, ValueError, KeyError):
    sizes = f"no manifest (exit {run['exit_code']}; see the run's log)"
print(f"| {label} | {run['date']} | {run['exit_code']} | {run['seconds']} s | {run['peak_rss_gb']} GB | {sizes} |")
PY
done
tail -n 5 benchmarks/results/coreml.md
