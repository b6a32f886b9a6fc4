"""Whole Graphormer-3D score evaluation: the Triton kernels against the eager reference.

    python bench/bench_model.py [--size reference|small] [--atoms 256] [--batch 8]
                                [--dtype fp32|bf16] [--backward] [--json FILE]
    GPU (gpu_check.sh): --size reference --atoms 256 --batch 8 --backward

One network with random weights (reference size: the public 12 layers x 768, 32 heads, FFN
768, 128 Gaussians), one batch of structures, both paths in the same run:
    reference   model.backend = "reference": every op's pure-torch path (eager)
    kernels     model.backend = --kernels (default None: each op picks per call, i.e. the
                Triton spatial bias, pair-bias attention and fused vector head on a GPU;
                the head is float32-only, so bf16 runs its reference)
Per path: the score evaluation under no_grad and, with --backward, a forward + backward
(training). Medians (10th / 90th percentiles) of eager calls after a warm-up, structures/s,
peak GPU memory, the backend each op chose, and the largest difference between the two
paths' outputs. No CUDA graph on either side (both eager).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from digfast.models.graphormer3d import Graphormer3D, Graphormer3DConfig
from digfast.ops import _backend

from common import environment, timed, write_json  # noqa: E402  (bench/ is on sys.path)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("spatial_bias", "pair_bias_attention", "fused_vector_head")


def config(size: str) -> Graphormer3DConfig:
    if size == "reference":
        return Graphormer3DConfig.reference_size(n_atom_types=8)
    return Graphormer3DConfig(n_atom_types=8, layers=2, width=64, heads=4, ffn=96, gaussians=16)


def chosen_backends(backend, device, dtype) -> dict:
    """What each op runs for this model.backend (None: the per-call choice)."""
    if backend is not None:
        return {op: backend for op in OPS}
    out = {op: _backend.choose(op, device) for op in OPS}
    if dtype == torch.float64:
        out = {op: "reference" for op in OPS}
    elif dtype != torch.float32:
        out["fused_vector_head"] = "reference"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("reference", "small"), default="reference")
    ap.add_argument("--atoms", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", default=None,
                    help="model.backend of the kernel path (default: per-call choice)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    net = Graphormer3D(config(args.size)).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.atoms)
    B, N = args.batch, args.atoms
    types = torch.randint(0, net.cfg.n_atom_types, (B, N), generator=g).to(device)
    # about liquid density (1.5 A per atom^(1/3)), a few padded atoms in every structure
    x = (1.5 * N ** (1 / 3) * torch.rand(B, N, 3, generator=g)).to(device, dtype)
    t = torch.rand(B, generator=g).to(device, dtype)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[:, N - max(1, N // 16):] = False

    env = environment()
    shape = dict(size=args.size, atoms=N, batch=B, dtype=args.dtype, device=str(device),
                 layers=net.cfg.layers, width=net.cfg.width, heads=net.cfg.heads,
                 gaussians=net.cfg.gaussians, padded_atoms=int((~mask[0]).sum()))
    rows, outputs = [], {}
    for path, backend in (("reference", "reference"), ("kernels", args.kernels)):
        net.backend = backend

        def score():
            with torch.no_grad():
                return net(x, t, types, mask)

        def train():
            xr = x.detach().requires_grad_(True)
            net(xr, t, types, mask).float().square().sum().backward()

        outputs[path] = score().float()
        modes = [("score", score)] + ([("forward+backward", train)] if args.backward else [])
        for mode, fn in modes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = timed(fn, device, args.warmup, args.repeat)
            med = statistics.median(times)
            q = statistics.quantiles(times, n=10) if len(times) >= 10 else sorted(times)
            row = dict(path=path, mode=mode, **shape, backends=chosen_backends(backend, device, dtype),
                       median_s=med, p10_s=q[0], p90_s=q[-1], structures_per_s=B / med)
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            print(f"{path:9s} {mode:16s} N={N} B={B} {args.dtype}: {med * 1e3:9.2f} ms "
                  f"({q[0] * 1e3:.2f}-{q[-1] * 1e3:.2f})  {B / med:9.2f} structures/s  "
                  f"{row['backends']}")
        net.zero_grad(set_to_none=True)
    diff = float((outputs["kernels"] - outputs["reference"]).abs().max())
    scale = float(outputs["reference"].abs().max())
    for mode in {r["mode"] for r in rows}:
        ref = next(r for r in rows if r["path"] == "reference" and r["mode"] == mode)
        ker = next(r for r in rows if r["path"] == "kernels" and r["mode"] == mode)
        print(f"{mode}: kernels / reference speed-up {ref['median_s'] / ker['median_s']:.2f}x")
    print(f"max |eps_kernels - eps_reference| = {diff:.2e} (max |eps| {scale:.2e})")
    rows.append(dict(path="compare", **shape, max_abs_diff=diff, max_abs_eps=scale))
    write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
