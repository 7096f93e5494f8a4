#!/usr/bin/env bash
# pgexport bench on this CPU: PyTorch checkpoint (the baseline, first) vs its ONNX artifact (fp32, int8).
#   bash benchmarks/bench_cpu.sh demo        the bundled demo model                          (~2 min)
#   bash benchmarks/bench_cpu.sh mid         mid-pg1-224, PaliGemma-3B scaled ~8x down         (~10 min)
#   bash benchmarks/bench_cpu.sh mid-448     the same weights resized to 448 px, latency-only  (~15 min)
#   bash benchmarks/bench_cpu.sh 3b          pg1-3b-224, the real 3B shapes: needs >= 20 GB free memory,
#                                            ~40 GB disk, ~11 min export + ~15 min bench
#   bash benchmarks/bench_cpu.sh 3b-448      pg1-3b-448 (1024 image tokens), fp32/int8/q4, batch 1 and 4, one timed run
#   bash benchmarks/bench_cpu.sh 3b-896      pg1-3b-896 (4096 image tokens), the same (batch 4: row-by-row prefill)
# Results: benchmarks/results/bench_<name>_cpu.{md,json} (+ a PNG under $WORK). Checkpoints and
# artifacts are kept under $WORK and reused. Extra arguments go to `pgexport bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: bench_cpu.sh demo|mid|mid-448|3b|3b-448|3b-896 [pgexport bench options]}
shift
PY=${PY:-.venv/bin/python}
PGEXPORT=${PGEXPORT:-.venv/bin/pgexport}
WORK=${WORK:-/tmp/pgexport-bench}
RESULTS=benchmarks/results
mkdir -p "$WORK" "$RESULTS"

case "$NAME" in
  demo) CHECKPOINT=$($PY -c "from pgexport.demo import CHECKPOINT_DIR; print(CHECKPOINT_DIR)"); ARTIFACT=$WORK/demo/artifact ;;
  mid) CHECKPOINT=$WORK/mid-pg1-224/checkpoint; ARTIFACT=$WORK/mid-pg1-224/artifact ;;
  mid-448) CHECKPOINT=$WORK/mid-pg1-448/checkpoint; ARTIFACT=$WORK/mid-pg1-448/artifact ;;
  3b) CHECKPOINT=$WORK/pg1-3b-224/checkpoint; ARTIFACT=$WORK/pg1-3b-224/artifact ;;
  3b-448|3b-896) CHECKPOINT=$WORK/pg1-$NAME/checkpoint; ARTIFACT=$WORK/pg1-$NAME/artifact ;;
  *) echo "unknown suite $NAME" >&2; exit 2 ;;
esac

if [ ! -f "$CHECKPOINT/config.json" ]; then
  case "$NAME" in
    mid) $PY benchmarks/bench_presets.py mid-pg1-224 "$CHECKPOINT" ;;
    mid-448) $PY benchmarks/bench_presets.py mid-pg1-224 "$CHECKPOINT" --resolution 448 ;;
    3b) $PY -m pgexport.random_model pg1-3b-224 "$CHECKPOINT" ;;
    3b-448|3b-896) $PY -m pgexport.random_model "pg1-$NAME" "$CHECKPOINT" ;;
  esac
fi
# Latency is what is measured here; parity is the export's own gate (random weights, so --no-validate).
# The 448/896 px suites also write the 4-bit (q4) variant.
QUANT=(--int8); DTYPES=fp32,int8
case "$NAME" in 3b-448|3b-896) QUANT=(--int8 --int4); DTYPES=fp32,int8,q4 ;; esac
if [ ! -f "$ARTIFACT/manifest.json" ]; then
  $PGEXPORT onnx "$CHECKPOINT" -o "$ARTIFACT" "${QUANT[@]}" --no-validate --force --json > /dev/null
fi
bench() {  # $1: result name, then pgexport bench options
  local out=$1; shift
  $PGEXPORT bench "$CHECKPOINT" "$ARTIFACT" "$@" \
    --json "$RESULTS/bench_${out}_cpu.json" --markdown "$RESULTS/bench_${out}_cpu.md" --plot "$WORK/bench_${out}_cpu.png"
}
# Prefill grows with the image tokens (256 / 1024 / 4096 at 224 / 448 / 896 px): the larger
# resolutions run one timed run without warm-up (a batch-4 prefill at 896 px is 16k tokens).
# At 896 px batch 4, onnxruntime prefills one row at a time (--prefill-rows 1): the whole 16k-token
# batch ran this 24 GB machine out of memory (killed at 24.3 GB). fp32, the largest, runs last.
case "$NAME" in
  3b-448) bench "$NAME" --dtype $DTYPES --batch 1,4 --warmup 0 --runs 1 "$@" ;;
  3b-896) bench "$NAME" --dtype $DTYPES --batch 1 --warmup 0 --runs 1 "$@"
          bench "$NAME-b4" --dtype int8,q4,fp32 --batch 4 --warmup 0 --runs 1 --prefill-rows 1 "$@" ;;
  *) bench "$NAME" --dtype $DTYPES --batch 1,4 "$@" ;;
esac
