#!/usr/bin/env bash
# Issue 3's prepared GPU run (device tool): fine-tune LJ-13 variants side by side for
# GPU_TRAIN_MIN minutes (default 6), then score each beside the shipped model on the same
# samples (bench/gpu_train.py). Models, accuracy.json and the log land in $OUT/gpu_train.
#   here, once: python scripts/make_particle_data.py --system lj13 --n 50000 --seed 0 --out runs/lj13_train.npz
#   run (carry runs/lj13_train.npz): bash bench/gpu_train.sh       (about GPU_TRAIN_MIN + 2 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/gpu_train"
# eager torch ops only: no build step, and the 13-atom model gains nothing from the kernels
export PYTHONPATH=$PWD OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 DIGFAST_BACKEND=reference
data=runs/lj13_train.npz
if [ ! -f "$data" ]; then  # the 4-minute CPU chain, when the file was not carried
  python scripts/make_particle_data.py --system lj13 --n 50000 --seed 0 --out "$data" > "$OUT/gpu_train/data.log" 2>&1 || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu_train/gpu.txt"
python bench/gpu_train.py --data "$data" --minutes "${GPU_TRAIN_MIN:-6}" --out "$OUT/gpu_train" 2>&1 \
  | grep --line-buffered -v "step/s\|s/step" | tee "$OUT/gpu_train/log.txt"
exit "${PIPESTATUS[0]}"
