#!/usr/bin/env bash
# pgexport bench on this CPU: PyTorch checkpoint (the baseline, first) vs its ONNX artifact (fp32, int8).
#   bash benchmarks/bench_cpu.sh demo        the bundled demo model                          (~2 min)
#   bash benchmarks/bench_cpu.sh mid         mid-pg1-224, PaliGemma-3B scaled ~8x down         (~10 min)
#   bash benchmarks/bench_cpu.sh mid-448     the same weights resized to 448 px, latency-only  (~15 min)
#   bash benchmarks/bench_cpu.sh 3b          pg1-3b-224, the real 3B shapes: needs >= 20 GB free memory,
#                                            ~40 GB disk, ~11 min export + ~15 min bench
#   bash benchmarks/bench_cpu.sh 3b-448      pg1-3b-448 (1024 image tokens), batch 1: ~6 min export + ~15 min bench
#   bash benchmarks/bench_cpu.sh 3b-896      pg1-3b-896 (4096 image tokens), batch 1, one timed run: ~6 + ~40 min
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
if [ ! -f "$ARTIFACT/manifest.json" ]; then
  $PGEXPORT onnx "$CHECKPOINT" -o "$ARTIFACT" --int8 --no-validate --force --json > /dev/null
fi
# Prefill grows with the image tokens (256 / 1024 / 4096 at 224 / 448 / 896 px): the larger
# resolutions run batch 1 only, and 896 px one timed run without warm-up (a run takes minutes).
case "$NAME" in
  3b-448) SIZES=(--batch 1 --runs 2) ;;
  3b-896) SIZES=(--batch 1 --warmup 0 --runs 1) ;;
  *) SIZES=(--batch 1,4) ;;
esac
$PGEXPORT bench "$CHECKPOINT" "$ARTIFACT" --dtype fp32,int8 "${SIZES[@]}" \
  --json "$RESULTS/bench_${NAME}_cpu.json" --markdown "$RESULTS/bench_${NAME}_cpu.md" --plot "$WORK/bench_${NAME}_cpu.png" "$@"
