#!/usr/bin/env bash
# pgexport bench on one CUDA GPU: the PyTorch paths (bf16 eager, and transformers' static cache with
# its compiled decode step) on random-weight PaliGemma-3B shapes, stage by stage under one deadline
# so that a short lease still returns every stage it finished.
#   bash benchmarks/bench_gpu.sh OUT_DIR [DEADLINE_SECONDS]      (default deadline 540 s)
# Stages, each skipped when less time is left than it needs:
#   224 px batch 1, 224 px batch 4, 448 px batch 1, 896 px batch 1 (native-resolution checkpoints).
# Each stage writes OUT_DIR/gpu_<px>_b<batch>.json; `python benchmarks/gpu_tables.py OUT_DIR/*.json`
# turns them into benchmarks/results/bench_3b_gpu.md. Environment overrides: PY (python with torch
# + CUDA and pgexport importable), PRESET_PREFIX (default pg1-3b; tiny presets for a CPU dry run:
# DEVICE=cpu PRESET_PREFIX=tiny), NEW_TOKENS (64), RUNS (5), WARMUP (2).
# Not covered: onnxruntime's CUDA provider (needs the onnxruntime-gpu wheel, which this repo does
# not pin) and fp16 ONNX artifacts of the 3B decoder (the fp16 pass refuses graphs over 2 GB).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_gpu.sh OUT_DIR [DEADLINE_SECONDS]}
DEADLINE=$((SECONDS + ${2:-540}))
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PREFIX=${PRESET_PREFIX:-pg1-3b}
NEW_TOKENS=${NEW_TOKENS:-64}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-2}
WORK=${WORK:-/tmp/pgexport-gpu}
mkdir -p "$OUT" "$WORK"

checkpoint() {  # $1: resolution -> path of a native random checkpoint (built once, bf16)
  local preset=$PREFIX-$1 folder=$WORK/$PREFIX-$1
  [ "$PREFIX" = tiny ] && preset=tiny-pg1
  [ -f "$folder/config.json" ] || $PY -m pgexport.random_model "$preset" "$folder" --dtype bf16 >/dev/null || return 1
  echo "$folder"
}

stage() {  # $1 resolution, $2 batch, $3 seconds the stage needs at most
  local left=$((DEADLINE - SECONDS)) folder
  if [ "$left" -lt "$3" ]; then echo "== skip ${1}px batch $2: $left s left, needs $3 s"; return; fi
  echo "== ${1}px batch $2 (at ${SECONDS}s, $left s left)"
  folder=$(checkpoint "$1") || { echo "== checkpoint for $1 px failed"; return; }
  timeout $((left - 5)) $PY -m pgexport.cli bench "$folder" --device "$DEVICE" --batch "$2" \
    --new-tokens "$NEW_TOKENS" --runs "$RUNS" --warmup "$WARMUP" --json "$OUT/gpu_${1}_b${2}.json" 2>&1 \
    | grep -v "^\s*$" | tail -n 20
  echo "== ${1}px batch $2 done at ${SECONDS}s (status ${PIPESTATUS[0]})"
}

[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
$PY -c "import torch, transformers, pgexport; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
stage 224 1 200
stage 224 4 150
stage 448 1 150
stage 896 1 150
echo "== finished at ${SECONDS}s"
