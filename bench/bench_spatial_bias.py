"""Benchmark of the spatial pair bias on a GPU: the fused Triton kernel against the reference.

    python bench/bench_spatial_bias.py [--out DIR] [--pairs 1048576] [--backward]

Public Graphormer-3D sizes (H = 32 heads, K = 128 Gaussians, MLP 128 -> 128 -> 32), N atoms
in {64, 256, 1024}, float32 and bfloat16, the batch chosen so each call covers about
--pairs atom pairs. Both candidates run eagerly after a warm-up; times are medians (with the
10th/90th percentiles) per call. With --backward, forward + backward is timed too (the
Triton backward recomputes through the reference in row chunks). Prints a table and writes
DIR/bench_spatial_bias.json (one row per measurement, naming the GPU, versions, dtype and
shapes). Without a CUDA device it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os

import torch

from digfast.ops import _backend
from digfast.ops.spatial_bias import spatial_bias

from bench_sampler_step import quantiles, time_cuda  # noqa: E402  (bench/ is on sys.path)
from common import environment, write_json  # noqa: E402

HEADS, GAUSSIANS, ATOM_TYPES = 32, 128, 8
SIZES = [64, 256, 1024]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def flops_per_pair(K: int, H: int) -> int:
    """MLP matmuls (2 K^2 + 2 K H) plus ~10 K for the Gaussians and GELU."""
    return 2 * K * K + 2 * K * H + 10 * K


def make_inputs(B, N, dtype, device):
    """Molecule-like inputs: coordinates a few units apart, padded with a mask."""
    g = torch.Generator().manual_seed(0)
    K, H, T = GAUSSIANS, HEADS, ATOM_TYPES
    atoms = torch.randint(0, T, (B, N), generator=g)
    mask = torch.rand(B, N, generator=g) < 0.9
    mask[:, 0] = True
    tensors = dict(
        x=1.5 * N ** (1 / 3) * torch.rand(B, N, 3, generator=g),
        pair_type=atoms[:, :, None] * T + atoms[:, None, :],
        mul=1 + 0.1 * torch.randn(T * T, generator=g), add=0.1 * torch.randn(T * T, generator=g),
        means=torch.linspace(0, 6, K), stds=torch.full((K,), 0.5),
        w1=torch.randn(K, K, generator=g) / K**0.5, b1=torch.zeros(K),
        w2=torch.randn(H, K, generator=g) / K**0.5, b2=torch.zeros(H), mask=mask)
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in tensors.items()}


def call(inputs, backend, backward):
    """One forward (under no_grad), or forward + backward through a sum of the outputs."""
    args = [inputs[k] for k in ("x", "pair_type", "mul", "add", "means", "stds", "w1", "b1",
                                "w2", "b2", "mask")]
    if not backward:
        def forward():
            with torch.no_grad():
                spatial_bias(*args, backend=backend)
        return forward
    leaves = [a.detach().requires_grad_(True) if a.is_floating_point() else a for a in args]

    def fwd_bwd():
        bias, node = spatial_bias(*leaves, backend=backend)
        (bias.float().sum() + node.float().sum()).backward()
    return fwd_bwd


def max_difference(inputs):
    """max |triton - reference| over both outputs, in float32, relative to max |reference|."""
    args = [inputs[k] for k in ("x", "pair_type", "mul", "add", "means", "stds", "w1", "b1",
                                "w2", "b2", "mask")]
    with torch.no_grad():
        out = spatial_bias(*args, backend="triton")
        ref = spatial_bias(*args, backend="reference")
    return max(float((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))
               for o, r in zip(out, ref))


def run(pairs, warmup, repeat, backward):
    rows = []
    modes = ["forward"] + (["forward+backward"] if backward else [])
    for N in SIZES:
        B = max(1, pairs // (N * N))
        for label, dtype in DTYPES.items():
            inputs = make_inputs(B, N, dtype, "cuda")
            rel_diff = max_difference(inputs)
            for mode in modes:
                results = {}
                for backend in ("reference", "triton"):
                    fn = call(inputs, backend, mode != "forward")
                    results[backend] = quantiles(time_cuda(fn, warmup, repeat, inner=5))
                    torch.cuda.empty_cache()
                ref = results["reference"][0]
                elt = torch.finfo(dtype).bits // 8
                written = B * N * (HEADS * N + GAUSSIANS) * elt  # bias + node features
                for backend, (med, p10, p90) in results.items():
                    rows.append(dict(op="spatial_bias", device="cuda", backend=backend, mode=mode,
                                     B=B, N=N, K=GAUSSIANS, H=HEADS, dtype=label, masked=True,
                                     median_ms=med * 1e3, p10_ms=p10 * 1e3, p90_ms=p90 * 1e3,
                                     speedup_vs_reference=ref / med,
                                     mpairs_per_s=B * N * N / med / 1e6,
                                     tflop_per_s=B * N * N * flops_per_pair(GAUSSIANS, HEADS) / med / 1e12,
                                     output_gb_per_s=written / med / 1e9,
                                     samples_per_s=B / med, rel_diff_vs_reference=rel_diff))
            del inputs
            torch.cuda.empty_cache()
    return rows


def print_table(rows):
    head = (f"{'backend':9} {'mode':16} {'B':>4} {'N':>5} {'dtype':5} {'median ms':>10} {'p10':>8} "
            f"{'p90':>8} {'x ref':>6} {'Mpair/s':>9} {'TFLOP/s':>8} {'out GB/s':>8} {'rel diff':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:9} {r['mode']:16} {r['B']:4d} {r['N']:5d} {r['dtype']:5} "
              f"{r['median_ms']:10.4f} {r['p10_ms']:8.4f} {r['p90_ms']:8.4f} "
              f"{r['speedup_vs_reference']:6.1f} {r['mpairs_per_s']:9.1f} {r['tflop_per_s']:8.2f} "
              f"{r['output_gb_per_s']:8.1f} {r['rel_diff_vs_reference']:9.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder for bench_spatial_bias.json ('' to skip)")
    parser.add_argument("--pairs", type=int, default=1 << 20, help="atom pairs per call (sets B)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_spatial_bias: no CUDA device, nothing to time (the Triton kernel runs on GPUs)")
        return 0
    if not _backend.available("triton", torch.device("cuda")):
        print("bench_spatial_bias: triton is not installed, nothing to compare")
        return 0
    rows = run(args.pairs, args.warmup, args.repeat, args.backward)
    env = environment()
    print(f"# GPU {env['gpu']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}")
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "bench_spatial_bias.json"), env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
