#!/usr/bin/env bash
# Peak memory of every 3B stage (random weights with PaliGemma-1 3B shapes at 224 px), each a
# separate process measured by benchmarks/measure.py (largest RSS of the process tree, file-backed
# pages included). One JSON line per stage in benchmarks/results/memory_3b.jsonl, its RSS trace in
# $WORK/traces/; benchmarks/memory_3b_table.py renders benchmarks/results/memory_3b.md.
#
#   bash benchmarks/memory_3b.sh [STAGE...]     (default: every stage, in the order below)
#
# Stages: checkpoint load onnx-fp32 onnx-int8 validate int8 q4 q4-hqq int8-static fp16 optimize
#         coreml-fp16 coreml-int4 bench build
# Needs about 60 GB of free disk under $WORK. The target is a 16 GB runner: 14 GB peak, 2 GB headroom.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/pgexport-bench/memory-3b}
PRESET=${PRESET:-pg1-3b-224}
RESULTS=${RESULTS:-benchmarks/results/memory_3b.jsonl}
PY=${PY:-.venv/bin/python}
PG=${PG:-.venv/bin/pgexport}
CK=$WORK/checkpoint
ART=$WORK/onnx-int8   # the gated `pgexport onnx --int8` artifact: input of validate, quantize and bench
mkdir -p "$WORK/traces"

measure() {  # stage name, label, then the command; a failed stage (exit code in the results) does not stop the rest
  local stage=$1 label=$2; shift 2
  $PY benchmarks/measure.py --label "$PRESET $stage: $label" --json "$RESULTS" --trace "$WORK/traces/$stage.tsv" -- "$@" \
    > "$WORK/$stage.out" 2> "$WORK/$stage.log" || echo "$stage failed: see $WORK/$stage.log" >&2
}

stage() {
  case $1 in
    checkpoint) [ -f "$CK/config.json" ] || measure checkpoint "write the random checkpoint" \
                  $PY -m pgexport.random_model "$PRESET" "$CK" ;;
    load) measure load "load_checkpoint + read every weight" $PY -c \
            "import sys; from pgexport.load import load_checkpoint; m = load_checkpoint(sys.argv[1]).model; print(sum(float(p.detach().sum()) for p in m.parameters()))" "$CK" ;;
    onnx-fp32) measure onnx-fp32 "pgexport onnx --no-validate" $PG onnx "$CK" -o "$WORK/onnx-fp32" --no-validate --force ;;
    onnx-int8) measure onnx-int8 "pgexport onnx --int8 (fp32 + int8 + int8 table, gate on both)" \
                 $PG onnx "$CK" -o "$ART" --int8 --force --json ;;
    validate) measure validate "pgexport validate (fp32 and int8 hops)" $PG validate "$ART" --json ;;
    int8) measure int8 "pgexport quantize --method int8 --embed fp32 (gate)" \
            $PG quantize "$ART" -o "$WORK/int8" --method int8 --embed fp32 --force --json ;;
    q4) measure q4 "pgexport quantize --method q4 (rtn, gate)" $PG quantize "$ART" -o "$WORK/q4" --method q4 --force --json ;;
    q4-hqq) measure q4-hqq "pgexport quantize --method q4 --int4-method hqq (gate)" \
              $PG quantize "$ART" -o "$WORK/q4-hqq" --method q4 --int4-method hqq --force --json ;;
    int8-static) measure int8-static "pgexport quantize --method int8-static (gate)" \
                   $PG quantize "$ART" -o "$WORK/int8-static" --method int8-static --force --json ;;
    fp16) measure fp16 "pgexport quantize --method fp16 (gate)" $PG quantize "$ART" -o "$WORK/fp16" --method fp16 --force --json ;;
    optimize) measure optimize "pgexport quantize --method int8 --optimize (gate)" \
                $PG quantize "$ART" -o "$WORK/optimize" --method int8 --optimize --force --json ;;
    coreml-fp16) measure coreml-fp16 "pgexport coreml --compress none (wrapper parity)" \
                   $PG coreml "$CK" -o "$WORK/coreml-fp16" --compress none --force --json ;;
    coreml-int4) measure coreml-int4 "pgexport coreml --compress int4 (wrapper parity)" \
                   $PG coreml "$CK" -o "$WORK/coreml-int4" --compress int4 --force --json ;;
    bench) measure bench "pgexport bench CHECKPOINT ARTIFACT --batch 1 (eager fp32, ORT fp32 and int8)" \
             $PG bench "$CK" "$ART" --batch 1 --runs 1 --new-tokens 8 --json "$WORK/bench.json" ;;
    build) sed "s|CHECKPOINT|$CK|" benchmarks/recipes/3b.yaml > "$WORK/3b.yaml"
           measure build "pgexport build of a 3B recipe (onnx --int8 with its gate, bench, verify)" \
             $PG build "$WORK/3b.yaml" -o "$WORK/build" --force --json ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=${*:-checkpoint load onnx-fp32 onnx-int8 validate int8 q4 q4-hqq int8-static fp16 optimize coreml-fp16 coreml-int4 bench build}
for name in $STAGES; do
  echo "$(date +%T) $name" >&2
  stage "$name"
done
$PY benchmarks/memory_3b_table.py --update benchmarks/results/memory_3b.md
