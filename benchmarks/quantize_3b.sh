#!/usr/bin/env bash
# Quantization of the PaliGemma-1 3B shapes (random weights, 224 px): every method's wall time and
# peak RSS (benchmarks/measure.py), sizes per graph, greedy token agreement with the fp32 graphs
# and CPU decode ms/token (benchmarks/quantize_demo.py --compare). Each step takes the heavy lock.
#
#   ART=/tmp/pgexport-bench/pg1-3b-224/artifact OUT=/tmp/quant/3b [STEPS="q4 compare"] \
#     [COMPARE="q4:q4"] benchmarks/quantize_3b.sh
#
# The gate's PyTorch reference is left out here (--no-validate): the 11.7 GB checkpoint and the
# quantized graphs do not fit beside each other with the rest of this 24 GB machine busy; the fp32
# graphs stand in (they match PyTorch: benchmarks/results/export_3b.md). Results:
# benchmarks/results/quantize_3b.jsonl (measure.py lines), $OUT/*.json (manifests),
# benchmarks/results/quantize_3b_compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ART=${ART:-/tmp/pgexport-bench/pg1-3b-224/artifact}
OUT=${OUT:-/tmp/quant/3b}
RESULTS=benchmarks/results/quantize_3b.jsonl
LOCK=/tmp/pgexport-heavy.lock
mkdir -p "$OUT"

quantize() {  # name, then pgexport quantize options
  local name=$1; shift
  # a failed step (its exit code and peak are in the results) does not stop the others
  flock "$LOCK" .venv/bin/python benchmarks/measure.py --label "quantize 3b $name" --json "$RESULTS" -- \
    .venv/bin/pgexport quantize "$ART" -o "$OUT/$name" "$@" --no-validate --force --json > "$OUT/$name.json" \
    || { echo "quantize 3b $name failed" >&2; return 0; }
  .venv/bin/python - "$name" "$OUT/$name.json" <<'PY'   # sizes and per-graph method into the results
import json, sys
from pathlib import Path
name, manifest = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
out = Path("benchmarks/results/quantize_3b_sizes.json")
sizes = json.loads(out.read_text()) if out.is_file() else {}
variant = list(manifest["variants"])[-1]
sizes[name] = {"variant": variant, **manifest["sizes"][variant], "fp32_total": manifest["sizes"]["fp32"]["total"],
               "methods": {k: v["method"] for k, v in manifest["quantization"].items() if v.get("method")}}
out.write_text(json.dumps(sizes, indent=2) + "\n")
PY
}

STEPS=${STEPS:-"int8 q4 q4-hqq mixed fp16 q4-optimized int8-static compare"}  # a subset reruns only those steps
COMPARE=${COMPARE:-"int8:int8 q4:q4 q4-hqq:q4 mixed:q4 fp16:fp16 q4-optimized:q4 int8-static:int8-static"}  # NAME:VARIANT
for step in $STEPS; do
  case $step in
    int8) quantize int8 --method int8 --embed int8 ;;                 # dynamic int8 + 8-bit table
    q4) quantize q4 --method q4 ;;                                    # MatMulNBits rtn, block 32, 4-bit table
    q4-hqq) quantize q4-hqq --method q4 --int4-method hqq ;;          # HQQ zero points, block 32
    mixed) quantize mixed --vision int8 --decoder q4 --embed q4 ;;    # the issue's per-graph example
    fp16) quantize fp16 --method fp16 ;;                              # islands probed on the 10 GB decoder
    q4-optimized) quantize q4-optimized --method q4 --optimize ;;     # fusions on the whole graphs first
    int8-static) quantize int8-static --method int8-static --embed int8 ;;  # calibrated on the demo samples
    compare)  # the variants whose step succeeded; their rows replace earlier ones in the JSON
      targets=()
      for t in $COMPARE; do
        [ -f "$OUT/${t%%:*}/manifest.json" ] && targets+=("$OUT/$t")
      done
      flock "$LOCK" .venv/bin/python benchmarks/quantize_demo.py --json benchmarks/results/quantize_3b_compare.json \
        --runs 1 --tokens 8 --compare "$ART" "${targets[@]}" ;;
  esac
done
