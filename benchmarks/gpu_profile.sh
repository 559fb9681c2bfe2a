#!/usr/bin/env bash
# Where the host time of main.py's training step goes (benchmarks/profile_step.py), in one GPU call of
# about five minutes:
#   bash benchmarks/gpu_profile.sh OUT_DIR
# efficientnet_b0 at 112 px, batch 128 (bf16, channels_last: configs/default.yaml), STEPS batches per
# epoch (20: reading a profile costs time per event, some 15,000 a step: 36 s for 40 b0 steps on an
# H100; summary's processing_s says how long it took), epoch 2 of 3 profiled, then as many steps of
# the same trainer's bare step; up to five runs, each in its own process, in this order (a run starts
# only with 45 s of the budget left):
#   recipe   the default recipe (EMA, grad clipping, dropout, drop path), with chrome traces
#   cudagraphs  the recipe with train.compile=true, train.compile_mode=reduce-overhead (CUDA graphs)
#   noaug    the recipe with every augmentation off: the workers nearly idle, so what it gains over
#            recipe is what the workers' CPU load costs the main thread (or their throughput)
#   lean     the recipe's extras off
#   compile  the recipe with train.compile=true (default mode)
# OUT_DIR gets few, small files (easy to copy off a rented box): summary_<run>.json per run, the
# recipe's traces gzipped, and profiles.tar.gz with every run's folder (report.txt, host_ops*.txt,
# summary.json, run.log). The reports are printed as each run ends.
# Env: PYTHON (python3), BUDGET (seconds for the whole script, 280), STEPS (20), DATA (/tmp/syn: made like
# benchmarks/gpu.sh when missing, reused when there), SCRATCH (/tmp/gpu-profile), EXTRA (more
# profile_step.py options for every run; later options win, e.g. EXTRA="--main-thread-only").
set -uo pipefail
mkdir -p "${1:?usage: benchmarks/gpu_profile.sh OUT_DIR}"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 1  # the repository root, where profile_step.py imports main.py from
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
budget=${BUDGET:-280}
steps=${STEPS:-20}
data=${DATA:-/tmp/syn}
scratch=${SCRATCH:-/tmp/gpu-profile}
read -r -a extra <<<"${EXTRA:-}"
rm -rf "$scratch" && mkdir -p "$scratch"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
command -v lscpu >/dev/null && lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\))"
$py -c "import os, torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cpus', os.cpu_count())"
# the data of benchmarks/gpu.sh: 12,000 synthetic 112 px faces, 9,600 train images in fold 0 (75 batches)
if [ ! -s "$data/train/train_label.txt" ]; then
  $py -m foldkit.synthetic --out "$data" --n-train 9000 --n-validate 3000 --n-test 100 --seed 0 \
    --workers "$(nproc)" 2>&1 | grep wrote
fi

# profile NAME [profile_step.py options...]: one run into $scratch/NAME, within what is left of $budget
profile() {
  local name=$1 left=$((budget - SECONDS))
  shift
  if [ "$left" -lt 45 ]; then
    echo "== $name: skipped, ${left} s left of the ${budget} s budget"
    return
  fi
  echo "== $name (at ${SECONDS} s, ${left} s left)"
  local dir=$scratch/$name
  mkdir -p "$dir"
  timeout -k 10 "$left" $py benchmarks/profile_step.py --data-dir "$data" --work-dir "$scratch/work" \
    --out "$dir" --backbone efficientnet_b0 --img-size 112 --batch 128 --steps "$steps" --epochs 3 \
    "$@" "${extra[@]}" >"$dir/run.log" 2>&1
  local status=$?
  if [ -f "$dir/summary.json" ]; then
    cp "$dir/summary.json" "$out/summary_$name.json"
    cat "$dir/report.txt"
  fi
  if [ "$status" -ne 0 ]; then
    echo "== $name: exit status $status (124: over the time left); the end of its log:"
    grep -v "it/s" "$dir/run.log" | tail -n 25
  fi
}

profile recipe --trace
profile cudagraphs --set train.compile=true --set train.compile_mode=reduce-overhead
profile noaug --set augment.hflip=0 --set augment.affine=0 --set augment.color=0 \
  --set augment.to_gray=0 --set augment.blur=0 --set augment.downscale=0 --set augment.jpeg=0 \
  --set augment.noise=0 --set augment.dropout=0
profile lean --set train.ema=false --set train.grad_clip=null --set train.drop_rate=null \
  --set train.drop_path_rate=null
profile compile --set train.compile=true

# pack: the traces gzipped (left in SCRATCH when over 16 MiB gzipped), the rest in one tarball
for trace in trace trace_bare; do
  f=$scratch/recipe/$trace.json
  [ -f "$f" ] || continue
  gzip -c "$f" >"$out/${trace}_recipe.json.gz" && rm -f "$f"
  size=$(stat -c %s "$out/${trace}_recipe.json.gz")
  if [ "$size" -gt $((16 * 1024 * 1024 - 65536)) ]; then
    mv "$out/${trace}_recipe.json.gz" "$scratch/"
    echo "$trace: $((size / 1048576)) MiB gzipped, too large to bring back: left in $scratch"
  fi
done
runs=$(cd "$scratch" && ls -d recipe noaug lean cudagraphs compile 2>/dev/null)
[ -n "$runs" ] && tar czf "$out/profiles.tar.gz" -C "$scratch" $runs
ls -l "$out"
echo "done in ${SECONDS} s"
