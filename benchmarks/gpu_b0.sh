#!/usr/bin/env bash
# efficientnet_b0 at 112 px (the host-bound case of the data-path issue) in one GPU call of at most
# ten minutes (carry the wheels the device lacks; give the call 600 s):
#   bash benchmarks/gpu_b0.sh OUT_DIR
# 0. main.py's trainer step against the bare step with the same extras, in one process, alternated
#    (run.py --steps-compare): is the step the loop runs slower before any data path?
# 1. the training data path alone (store, the default recipe's augmentations in one worker per core,
#    pinned uint8 batches, device transform; no model), with and without the augmentations: the
#    most any loop can take in (run.py --loader);
# 2. main.py's loop with CUDA graphs (train.compile=true, compile_mode=reduce-overhead) against the
#    eager bare step and against the bare step compiled alike, the fair ceiling of a graphed loop
#    (run.py --gpu --sweep-workers N --bare-compile reduce-overhead, at most 330 s: the two compiles
#    take over a minute each; it also times the loader alone again, beside the ratios);
# 3. A/B runs of the eager loop, each against its own trainer's bare step (profile_step.py
#    --no-profile, STEPS batches per epoch, 3 epochs): as it is; without the recipe's extras (EMA,
#    clipping, dropout, drop path); without pinned memory (no pin-memory thread); without
#    augmentations; with a 1 ms GIL switch interval. While BUDGET seconds (560, counted from the
#    start) allow: a run starts only with 60 s left, and each ends by then.
# OUT_DIR gets steps.json, loader.json, graphs.json and ab_<run>.json. Env: PYTHON (python3), DATA (/tmp/syn: the
# 12,000 synthetic faces of benchmarks/gpu.sh, made when missing), WORK (/tmp/gpu-b0), STEPS (40).
# PYTHON and DATA: absolute paths, or relative to the repository root (the script runs from there).
set -uo pipefail
mkdir -p "${1:?usage: benchmarks/gpu_b0.sh OUT_DIR}"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
data=${DATA:-/tmp/syn}
work=${WORK:-/tmp/gpu-b0}
steps=${STEPS:-40}
budget=${BUDGET:-560}
cores=$(nproc)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
command -v lscpu >/dev/null && lscpu | grep -E "^(Model name|Thread|Core|CPU\(s\))"
left() { echo $((budget - SECONDS)); }
if [ ! -s "$data/train/train_label.txt" ]; then
  timeout -k 10 120 $py -m foldkit.synthetic --out "$data" --n-train 9000 --n-validate 3000 \
    --n-test 100 --seed 0 --workers "$cores" 2>&1 | grep wrote
fi
quiet() { grep -vE 'it/s|img/s\]' | grep -vE '^\s*[]["{}]|^\s+[0-9]'; }  # no bars, no JSON
echo "== trainer step against the bare step (at ${SECONDS} s)"
timeout -k 10 90 $py benchmarks/run.py --steps-compare --out "$out/steps.json" 2>&1 | quiet
echo "steps: exit status ${PIPESTATUS[0]}"
echo "== loader alone (at ${SECONDS} s)"
timeout -k 10 90 $py benchmarks/run.py --loader --data-dir "$data" --work-dir "$work/loader" \
  --workers "$cores" --out "$out/loader.json" 2>&1 | quiet
echo "loader: exit status ${PIPESTATUS[0]}"
graphs=$(($(left) < 330 ? $(left) : 330))  # two compiles (over a minute each), then main.py's
if [ "$graphs" -ge 60 ]; then
  echo "== CUDA graphs (at ${SECONDS} s, at most ${graphs} s)"
  timeout -k 10 "$graphs" $py benchmarks/run.py --gpu --sweep-workers "$cores" --epochs 3 \
    --bare-compile reduce-overhead --data-dir "$data" --work-dir "$work/graphs" --out "$out/graphs.json" \
    --set train.compile=true --set train.compile_mode=reduce-overhead 2>&1 | quiet
  echo "graphs: exit status ${PIPESTATUS[0]} (124: cut at its limit; graphs.json keeps what was measured)"
else
  echo "== CUDA graphs: skipped, $(left) s left of the ${budget} s budget"
fi
ab() {  # ab NAME [profile_step.py options...]: one eager A/B run, within what is left of $budget
  local name=$1 left
  left=$(left)
  shift
  if [ "$left" -lt 60 ]; then
    echo "== $name: skipped, ${left} s left of the ${budget} s budget"
    return
  fi
  echo "== A/B $name (at ${SECONDS} s)"
  rm -rf "$work/ab_$name"  # a failed run must not leave an earlier run's summary to copy
  timeout -k 10 "$left" $py benchmarks/profile_step.py --data-dir "$data" --work-dir "$work/ab" \
    --out "$work/ab_$name" --steps "$steps" --epochs 3 --no-profile "$@" >"$work/ab_$name.log" 2>&1
  local status=$?
  if [ -f "$work/ab_$name/summary.json" ]; then
    cp "$work/ab_$name/summary.json" "$out/ab_$name.json"
    grep -E "^wall ms" "$work/ab_$name/report.txt"
  fi
  if [ "$status" -ne 0 ]; then
    echo "$name: exit status $status (124: over the time left); the end of its log:"
    grep -v "it/s" "$work/ab_$name.log" | tail -n 15
  fi
}
ab default
ab lean --set train.ema=false --set train.grad_clip=null --set train.drop_rate=null \
  --set train.drop_path_rate=null
ab nopin --no-pin
ab noaug --set augment.hflip=0 --set augment.affine=0 --set augment.color=0 --set augment.to_gray=0 \
  --set augment.blur=0 --set augment.downscale=0 --set augment.jpeg=0 --set augment.noise=0 \
  --set augment.dropout=0
ab switch1ms --switch-interval 0.001
echo "done in ${SECONDS} s"
