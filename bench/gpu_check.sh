#!/usr/bin/env bash
# The one prepared GPU run (device tool): build digfast._C with CUDA in the checkout, check the
# CUDA and Triton paths against the torch reference, then time, most wanted first (see the
# order's comment below): the DiG protein sampler, the whole Graphormer-3D, the Hutchinson
# divergence, autotuned attention, the spatial bias, the sampler step and end-to-end sampler,
# and pair-bias attention against PyTorch's paths.
#   run: bash bench/gpu_check.sh        (needs torch with CUDA, triton, pybind11, cmake, nvcc)
# Each section runs under its own time limit and inside one overall deadline (GPU_CHECK_S,
# default 560 s), so a slow or failing section costs only itself. Logs and JSON go to a work
# folder that is packed into $OUT/gpu_results.tgz after every section (what a killed run leaves
# still comes back); the last lines printed are one row per section: rc and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
W=$(mktemp -d)/gpu_results
mkdir -p "$W"
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/bench
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_S:-560}))
: > "$W/sections.txt"

# section NAME SECONDS COMMAND...: run it with its output in $W/NAME.txt, never past the deadline;
# GPU_SECTIONS="build sampler ..." runs only the sections named (a rerun of what failed)
section() {
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_SECTIONS:-}" ] && [[ " $GPU_SECTIONS " != *" $name "* ]]; then return; fi
  local left=$((DEADLINE - $(date +%s) - 5))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    echo "$name skipped (deadline)" | tee -a "$W/sections.txt"; return
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout -k 5 "$limit" bash -c '"$@"' _ "$@" > "$W/$name.txt" 2>&1  # functions too (export -f)
  local rc=$?
  tail -25 "$W/$name.txt"
  printf '%-24s rc=%-4s %4ss\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" | tee -a "$W/sections.txt"
  tar -czf "$OUT/gpu_results.tgz" -C "$(dirname "$W")" gpu_results
}

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # in place (no pip, no network): the module lands next to the Python sources
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
    && cmake --build build/gpu && cp build/gpu/_C*.so digfast/ || return 1
  [ -e digfast/kernels ] || ln -s ../kernels digfast/kernels   # as the wheel maps it
  python -c "import digfast._C as C, json; print(json.dumps(C.build_info()))"
}

# The two ceilings of METHOD.md, measured here: device-to-device copy and a bf16 matrix product.
ceilings() {
  python - "$W/ceilings.json" <<'EOF'
import json, sys, torch
from triton.testing import do_bench
x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16); y = torch.empty_like(x)
copy_ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
out = dict(copy_gb_per_s=2 * x.numel() * 2 / copy_ms / 1e6, bf16_mm_tflop_per_s=2 * 8192**3 / mm_ms / 1e9,
           gpu=torch.cuda.get_device_name())
print(json.dumps(out)); json.dump(out, open(sys.argv[1], "w"))
EOF
}

export -f build ceilings
export W
section build 150 build
section ceilings 30 ceilings
# every GPU test (the names say gpu or cuda), over 8 workers where pytest-xdist is there:
# mostly Triton compiles
WORKERS=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
# (GPU_TESTS="-k ... tests/x.py" narrows them)
section tests_gpu 150 python -m pytest -q -p no:cacheprovider $WORKERS --continue-on-collection-errors \
  ${GPU_TESTS:--k "gpu or cuda" tests/}
# Order: what an open issue still needs first (the protein figures, issue 5), then what the
# 2026-11-28 run found wanting and has been changed since (the recomputed backwards, autotuned
# attention, the divergence), then what that run measured already (sampler, attention sizes).
# DiG protein: structures/s of the public 500-step sampler, public-style (one structure per
# call, fp32) against the fast path; targets: L = 256 bf16 >= 100x public-style and >= 10
# structures/s; L = 1000 runs on one 80 GB GPU (peak memory in the JSON).
section protein_256 100 python bench/protein.py --device cuda --lengths 256 --dtype bf16 --batch auto \
  --steps 5 --json "$W/bench_protein_256.json"
section protein_1000 90 python bench/protein.py --device cuda --lengths 1000 --dtype bf16 --batch 32 \
  --steps 3 --skip-reference --json "$W/bench_protein_1000.json"
section protein_64 60 python bench/protein.py --device cuda --lengths 64 --dtype bf16 --batch auto \
  --steps 5 --json "$W/bench_protein_64.json"
section protein_256_fp32 60 python bench/protein.py --device cuda --lengths 256 --dtype fp32 \
  --batch auto --steps 5 --skip-reference --json "$W/bench_protein_256_fp32.json"
# whole Graphormer-3D (12 x 768, 32 heads, 128 Gaussians, N = 256, B = 8, fp32): kernels vs eager
section model 75 python bench/bench_model.py --size reference --atoms 256 --batch 8 --backward \
  --json "$W/bench_model.json"
# Hutchinson K = 8 (forward and reverse mode) against one score evaluation, 12 x 768 at N = 256,
# with a profile of where the time goes; then the same on the eager reference ops
section divergence 60 python bench/bench_divergence.py --size reference --atoms 256 \
  --methods score hutchinson-forward hutchinson --json "$W/bench_divergence.json" --profile --repeat 3
section divergence_reference 60 env DIGFAST_BACKEND=reference python bench/bench_divergence.py \
  --size reference --atoms 256 --methods score hutchinson-forward hutchinson \
  --json "$W/bench_divergence_reference.json"
# the attention forward's tile shapes autotuned (DIGFAST_AUTOTUNE=1, opt-in until measured)
section attention_autotune_tests 60 env DIGFAST_AUTOTUNE=1 python -m pytest -q -p no:cacheprovider \
  -k gpu tests/test_pair_bias_attention_kernel.py
for n in 256 4096; do
  section "attention_autotune_$n" 45 env DIGFAST_AUTOTUNE=1 python bench/bench_pair_bias_attention.py \
    --sizes "$n" --forward-only --only triton,flex --out "$W/attention_autotune_$n"
done
section spatial_bias 45 python bench/bench_spatial_bias.py --out "$W/spatial_bias" --backward
section protein_eager 45 python bench/protein.py --device cuda --lengths 64 256 --dtype bf16 \
  --batch auto --steps 5 --no-cuda-graph --skip-reference --json "$W/bench_protein_eager.json"
section sampler_step 60 python bench/bench_sampler_step.py --json "$W/bench_sampler_step.json"
section sampler 60 python bench/bench_sampler.py --json "$W/bench_sampler.json"
# pair-bias attention, H = 32, dh = 24, bf16, 16384 tokens a call; one size per run
for n in 256 1024 4096 64; do
  section "attention_$n" 75 python bench/bench_pair_bias_attention.py --sizes "$n" --out "$W/attention_$n"
done

echo "== sections"
cat "$W/sections.txt"
