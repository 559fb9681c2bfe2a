#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md ("Feeding the GPU"), in one call of about five minutes:
#   bash benchmarks/gpu.sh OUT_DIR [OLD_TREE]
# OLD_TREE: a checkout of the code before the uint8 path (git archive 78ef9b6), for the old-path rows.
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [OLD_TREE]}
old=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
# the benchmark data: 12,000 synthetic 112 px faces (9,600 train images in fold 0's run)
$py -m foldkit.synthetic --out /tmp/syn --n-train 9000 --n-validate 3000 --n-test 100 --seed 0 \
  --workers "$(nproc)" 2>&1 | grep wrote
# the store built alone: time, images/s, peak memory
$py -m foldkit.store --data-dir /tmp/syn --work-dir /tmp/store-alone 2>&1 | grep -E "images at|peak" \
  | tee "$out/store_build.txt"
# bare steps vs main.py's own loop: new path, lean recipe and (with OLD_TREE) the old path
$py benchmarks/run.py --gpu --data-dir /tmp/syn --work-dir /tmp/gpu-runs ${old:+--old-tree "$old"} \
  --budget 200 --out "$out/gpu.json" 2>&1 | grep -vE "^\s*[{}\"]" | grep -v "it/s"
