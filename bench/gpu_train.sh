#!/usr/bin/env bash
# The prepared GPU run of issues 3, 6 and 7 (device tool), everything side by side on one GPU
# (each job alone leaves it mostly idle), for GPU_TRAIN_MIN whole minutes (default 6):
#  - LJ-13 large-batch fine-tunes of the shipped model, the recipe's 4 x 128 and a 4 x 256 from
#    scratch (capacity against steps), and LJ-13 and DW-4 energy-only (PIDP
#    Monte-Carlo score) models, each scored beside the shipped models of its system on the same
#    samples (bench/gpu_train.py);
#  - alanine dipeptide: samples with their exact log p, reweighted to basin free energies
#    (scripts/alanine_free_energy.py; saved chunk by chunk, analysed at the end).
# Models, JSON and logs land in $OUT/gpu_train.
#   here, once: python scripts/make_particle_data.py --system lj13 --n 50000 --seed 0 --out runs/lj13_train.npz
#   run (carry runs/lj13_train.npz): bash bench/gpu_train.sh       (about GPU_TRAIN_MIN + 2 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/gpu_train"
# eager torch ops only: no build step, and the 13-atom model gains nothing from the kernels
export PYTHONPATH=$PWD OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 DIGFAST_BACKEND=reference
data=runs/lj13_train.npz
if [ ! -f "$data" ]; then  # the 4-minute CPU chain, when the file was not carried
  python scripts/make_particle_data.py --system lj13 --n 50000 --seed 0 --out "$data" > "$OUT/gpu_train/data.log" 2>&1 || exit 1
fi
# the GPU training paths against the CPU's first (the same batches: the same losses to rounding)
python -m pytest -q -p no:cacheprovider -k "gpu_training or gpu_pidp" tests/test_training.py 2>&1 \
  | tail -3 | tee "$OUT/gpu_train/tests.txt"
# training minutes: GPU_TRAIN_MIN (default 6), fewer when making the data left less of the
# GPU_TRAIN_TOTAL_S budget (default 510 s: one device call; ~150 s go to start-up and scoring)
budget=$(( (${GPU_TRAIN_TOTAL_S:-510} - ($(date +%s) - start) - 150) / 60 ))
minutes=$(( ${GPU_TRAIN_MIN:-6} < budget ? ${GPU_TRAIN_MIN:-6} : budget ))
if (( minutes < 1 )); then echo "no time left to train (${budget} min)"; exit 1; fi
device=${GPU_TRAIN_DEVICE:-cuda}  # a CPU dry run: GPU_TRAIN_DEVICE=cpu GPU_TRAIN_MIN=1 GPU_TRAIN_ARGS="-n 40 --runs ancestral:4"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu_train/gpu.txt"
fe="$OUT/gpu_train/alanine_fe"
timeout -k 5 $((minutes * 60 + 60)) python scripts/alanine_free_energy.py -n 40000 --chunk 1000 --device "$device" \
  --out "$fe.npz" > "$fe.log" 2>&1 &
python bench/gpu_train.py --data "$data" --minutes "$minutes" --out "$OUT/gpu_train" --device "$device" \
  ${GPU_TRAIN_ARGS:-} 2>&1 \
  | grep --line-buffered -v "step/s\|s/step" | tee "$OUT/gpu_train/log.txt"
rc=${PIPESTATUS[0]}
wait
tail -3 "$fe.log"
if [ -f "$fe.npz" ]; then
  python scripts/alanine_free_energy.py --analyse-only --out "$fe.npz" > "$fe.json" 2>&1
  head -c 3000 "$fe.json"
fi
exit "$rc"
