#!/usr/bin/env bash
# Issue 4's measured result on the demo task, on CPU (results: benchmarks/results/distill.md):
#   1. distill the demo model (4 decoder layers) into a 2-layer student (teacher layers 0 and 2), KD loss;
#   2. the same student, same steps and data, trained on labels only (--alpha 0);
#   3. export teacher and student with `pgexport onnx --int8` (parity gate on, held-out A's per-kind figures
#      included), and validate both on held-out B (images drawn otherwise) with `pgexport validate`;
#   4. time both artifacts on ONNX Runtime with `pgexport bench`.
# LABELS_ONLY=0 skips step 2.
# Each stage is skipped when its output exists, so the script can be rerun after an interruption
# (a stopped training run continues with --resume). Training is wrapped in the shared long-job lock.
#   OUT=/tmp/distill/demo benchmarks/distill_demo.sh          (2000 steps: about 2 + 1.5 min on an idle CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distill/demo}
ROWS=${ROWS:-16000}     # generated demo-task rows per epoch
EPOCHS=${EPOCHS:-4}     # ROWS * EPOCHS / BATCH optimizer steps (2000 by default)
BATCH=${BATCH:-32}
LR=${LR:-1e-3}
LABELS_ONLY=${LABELS_ONLY:-1}
PG=.venv/bin/pgexport
EVAL=pgexport/demo/data/eval.jsonl
mkdir -p "$OUT"

train() {  # name, extra options
  local name=$1; shift
  [ -d "$OUT/$name" ] && return
  local resume=()
  [ -f "$OUT/$name.checkpoints/progress.json" ] && resume=(--resume)
  flock /tmp/pgexport-long.lock $PG distill -o "$OUT/$name" --train-rows "$ROWS" --epochs "$EPOCHS" \
    --batch-size "$BATCH" --lr "$LR" --decoder-layers 2 --save-every 50 "${resume[@]}" "$@" 2>&1 | tee "$OUT/$name.log"
}

train kd --alpha 0.5 --temperature 2
[ "$LABELS_ONLY" = 0 ] || train labels-only --alpha 0

[ -d "$OUT/teacher-onnx" ] || $PG onnx --int8 -o "$OUT/teacher-onnx" 2>&1 | tee "$OUT/teacher-onnx.log"
# the student answers segment prompts in its teacher's codes: it exports with the teacher's decoder
[ -d "$OUT/kd-onnx" ] || $PG onnx "$OUT/kd" --int8 --eval-file "$EVAL" --seg-decoder pgexport/demo/seg_decoder.npz \
  -o "$OUT/kd-onnx" 2>&1 | tee "$OUT/kd-onnx.log"
EVAL_B=$OUT/heldout-b/eval.jsonl
[ -f "$EVAL_B" ] || .venv/bin/python -c "import sys; from pathlib import Path
from pgexport.demo.train import held_out, write_eval_split
write_eval_split(Path(sys.argv[1]), held_out('B'))" "$OUT/heldout-b"
for name in teacher kd; do
  [ -f "$OUT/$name-onnx-b.json" ] || $PG validate "$OUT/$name-onnx" --eval-file "$EVAL_B" --json > "$OUT/$name-onnx-b.json"
done
$PG bench "$OUT/teacher-onnx" "$OUT/kd-onnx" --batch 1,4 --runs 5 --json "$OUT/bench.json" --markdown "$OUT/bench.md"
