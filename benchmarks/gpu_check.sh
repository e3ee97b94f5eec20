#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA GPU (issues 2 and 7):
#   1. the CUDA tests (tests/training/test_cuda.py) and the encoder tests on that machine;
#   2. train / eval pairs/s at SR-GNN's settings on the GPU against the public-code-style
#      baseline on the same GPU (benchmarks/speed.py --device cuda), and the step-time
#      variants of benchmarks/gpu_step.py;
#   3. the planner on a 4-core slice of the machine with its GPU: predicted against measured
#      step time, the placement chosen and its gain over the plain CPU loop;
#   4. plain SR-GNN (positions off) at the full budget on Diginetica, on the GPU.
# Usage: DATA=DIR OUT=DIR benchmarks/gpu_check.sh   (DIR holds diginetica/)
#   CKPT=DIR     evaluate this trained srgnn checkpoint in step 2 (a `fedenc train` output folder)
#   ONLY_STEPS="1 2"   run only these steps (default: all)
set -u
END=$((SECONDS + ${BUDGET:-560}))  # the accuracy run gets what is left of this
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FEDENC_PLANNER_CACHE=$(mktemp -d)
PY=${PY:-python3}
STEPS=" ${ONLY_STEPS:-1 2 2b 3 4} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
nvidia-smi -L || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if want 1; then echo "== 1. tests"; date +%T
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/training/test_cuda.py tests/encoders \
  2>&1 | tee "$OUT/tests.log" | tail -15; fi
if want 2; then echo "== 2. speed"; date +%T
timeout 150 $PY benchmarks/speed.py --data "$DATA" --device cuda --batches 50 --repeats 5 \
  ${CKPT:+--checkpoint "$CKPT"} --json "$OUT/speed_cuda.json" 2>&1 | tee "$OUT/speed.log"; fi
if want 2b; then echo "== 2b. step variants"; date +%T
timeout 120 $PY benchmarks/gpu_step.py --data "$DATA" --steps 30 --repeats 5 2>&1 \
  | tee "$OUT/gpu_step.log" | head -12; fi
if want 3; then echo "== 3. planner"; date +%T
timeout 200 taskset -c 0-3 $PY benchmarks/planner.py --data "$DATA" --fresh --skip-straggler \
  --repeats 5 --only "${ONLY:-cpu-t4-c4096,cuda-c4096,cuda-c65536}" \
  --json "$OUT/planner.json" 2>&1 | tee "$OUT/planner.log"; fi
if want 4; then echo "== 4. accuracy"; date +%T
ACC=$(mktemp -d)
timeout $((END - SECONDS - 15)) $PY benchmarks/accuracy.py --data "$DATA" --out "$ACC" \
  --only digi-srgnn-plain --extra "--device cuda --plan default" 2>&1 | tee "$OUT/accuracy.log" \
  | grep -v "━" | tail -30
cp "$ACC"/digi-srgnn-plain/results.json "$OUT/accuracy_plain.json" 2>/dev/null || echo "no results.json"; fi
date +%T
