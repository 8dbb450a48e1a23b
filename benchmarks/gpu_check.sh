#!/usr/bin/env bash
# The GPU check (issue 11): on a CUDA machine, time the I-JEPA train step at ViT-L/16 and ViT-H/14
# (224 px, the official predictor 384x12) in fp32 and bf16 against the official code, and report
# images/s, peak memory and model FLOPs utilisation. Needs a checkout of facebookresearch/ijepa
# (never vendored): IJEPA_OFFICIAL=/path/to/ijepa benchmarks/gpu_check.sh
# PEAK_TFLOPS: the device's dense bf16 peak (H100/H200 SXM: 989). Results: runs/gpu_check/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OFFICIAL=${IJEPA_OFFICIAL:?set IJEPA_OFFICIAL to a facebookresearch/ijepa checkout}
PEAK=${PEAK_TFLOPS:-989}
mkdir -p runs/gpu_check
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), torch.__version__)'
#        size  patch batch
for shape in "large 16 64" "huge 14 32"; do
  set -- $shape
  "$PY" benchmarks/train_throughput.py --size "$1" --img 224 --patch "$2" --in-chans 3 --batch "$3" \
    --pred-dim 384 --pred-depth 12 --device cuda --official "$OFFICIAL" --variants visrep,official \
    --steps 10 --warmup 3 --peak-tflops "$PEAK" --out "runs/gpu_check/ijepa_$1.json"
done
