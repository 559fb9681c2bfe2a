#!/usr/bin/env bash
# efficientnet_b0 at 112 px (the host-bound case of the data-path issue) in one GPU call of about five
# minutes:
#   bash benchmarks/gpu_b0.sh OUT_DIR
# 1. the training data path alone (store, the default recipe's augmentations in one worker per core,
#    pinned uint8 batches, device transform; no model), with and without the augmentations: the
#    most any loop can take in (run.py --loader);
# 2. main.py's loop with CUDA graphs (train.compile=true, compile_mode=reduce-overhead) against the
#    eager bare step and against the bare step compiled alike, the fair ceiling of a graphed loop
#    (run.py --gpu --sweep-workers N --bare-compile reduce-overhead);
# 3. main.py's eager loop (the default) against the eager bare step, in the same call.
# Each run.py call also times the loader alone again, so every ratio has its ceilings beside it.
# OUT_DIR gets loader.json, graphs.json and eager.json. Env: PYTHON (python3), DATA (/tmp/syn: the
# 12,000 synthetic faces of benchmarks/gpu.sh, made when missing), WORK (/tmp/gpu-b0).
set -uo pipefail
mkdir -p "${1:?usage: benchmarks/gpu_b0.sh OUT_DIR}"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
data=${DATA:-/tmp/syn}
work=${WORK:-/tmp/gpu-b0}
cores=$(nproc)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
command -v lscpu >/dev/null && lscpu | grep -E "^(Model name|Thread|Core|CPU\(s\))"
if [ ! -s "$data/train/train_label.txt" ]; then
  $py -m foldkit.synthetic --out "$data" --n-train 9000 --n-validate 3000 --n-test 100 --seed 0 \
    --workers "$cores" 2>&1 | grep wrote
fi
quiet() { grep -vE 'it/s|img/s\]' | grep -vE '^\s*[]["{}]|^\s+[0-9]'; }  # no bars, no JSON
echo "== loader alone (at ${SECONDS} s)"
$py benchmarks/run.py --loader --data-dir "$data" --work-dir "$work/loader" --workers "$cores" \
  --out "$out/loader.json" 2>&1 | quiet
echo "== CUDA graphs (at ${SECONDS} s)"
$py benchmarks/run.py --gpu --sweep-workers "$cores" --epochs 3 --bare-compile reduce-overhead \
  --data-dir "$data" --work-dir "$work/graphs" --out "$out/graphs.json" \
  --set train.compile=true --set train.compile_mode=reduce-overhead 2>&1 | quiet
echo "== eager (at ${SECONDS} s)"
$py benchmarks/run.py --gpu --sweep-workers "$cores" --epochs 3 --data-dir "$data" \
  --work-dir "$work/eager" --out "$out/eager.json" 2>&1 | quiet
echo "done in ${SECONDS} s"
