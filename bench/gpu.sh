#!/usr/bin/env bash
# The checks for a lent GPU machine, in one script: the training-throughput table (GPU rows of
# bench/results/throughput.json: resnet18 28x28 fp32 and resnet34 224x224 bf16, eager and compiled),
# the older throughput check (bf16 and fp32) and
# issue 14's GPU goal: the full-width ResNet-18 (32-64-128-256) trained to convergence (15 epochs),
# then IR-Net + KD, RSign + RPReLU and W1A32, 2 seeds each (6 runs in parallel on the one GPU, binary
# epochs chosen by a timed probe to fit MINUTES). Results land in $OUT (default bench/results).
#   bench/gpu.sh [MINUTES]
set -o pipefail
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench/results}
MINUTES=${1:-7.5}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-throughput.txt"
python3 -c "import torch, timm, pydantic; print('torch', torch.__version__, 'timm', timm.__version__, 'pydantic', pydantic.VERSION)" | tee -a "$OUT/gpu-throughput.txt"
for amp in bf16 off; do
  python3 -m bench.throughput --device cuda --amp $amp --steps 300 2>&1 | tail -3 | tee -a "$OUT/gpu-throughput.txt"
done
python3 -m bench.throughput --table --device cuda --repeats 5 --steps 20 2>&1 | tail -8 | tee -a "$OUT/gpu-throughput.txt"
[ "$OUT" != bench/results ] && cp bench/results/throughput.* "$OUT"/ 2>/dev/null
python3 -m bench.accuracy --device cuda --jobs 6 --width 32 --fp-epochs 15 --minutes "$MINUTES" --name accuracy-gpu-goal \
  --variants "IR-Net + KD" "IR-Net + KD + RSign + RPReLU" "IR-Net W1A32" 2>&1 \
  | tee "$OUT/accuracy-gpu-goal.log"
status=$?
[ "$OUT" != bench/results ] && cp bench/results/accuracy-gpu-goal.* "$OUT"/ 2>/dev/null
exit $status
