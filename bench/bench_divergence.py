"""Cost of the likelihood's divergence against one score evaluation, forward vs reverse mode.

    python bench/bench_divergence.py [--size small|reference] [--atoms 4 13 22 40] [--batch 16]
                                     [--probes 8] [--methods ...] [--json FILE]
    GPU (gpu_check.sh): --size reference --atoms 256 --methods score hutchinson-forward hutchinson

One ODE right-hand side of digfast.likelihood (the drift's divergence_at) on a Graphormer-3D
score network with random weights, per method:
    score                   one evaluation, no grad (the baseline)
    hutchinson-forward      one primal + K probe tangents (vmapped JVPs)
    hutchinson              reverse mode: the primal repeated K times, one backward pass
    exact-forward           one primal + N d coordinate tangents
    exact                   reverse mode: one backward pass per coordinate (N d <= 66 only)
Times are medians (10th / 90th percentiles) of eager calls after a warm-up, and each is
given as a multiple of the score evaluation. --size small is a 4 x 64 network (CPU);
--size reference the public 12 x 768 (32 heads, FFN 768, 128 Gaussians), for a GPU.
The exact / Hutchinson cost ratio is what digfast.likelihood.AUTO_EXACT_MAX_COORDS rests on.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from digfast.likelihood import _Drift, rademacher_probes
from digfast.models.graphormer3d import Graphormer3D, Graphormer3DConfig
from digfast.schedules import LinearVP

from common import environment, timed, write_json  # noqa: E402  (bench/ is on sys.path)

METHODS = ("score", "hutchinson-forward", "hutchinson", "exact-forward", "exact")
REVERSE_EXACT_MAX_COORDS = 66  # one backward pass per coordinate: slow beyond this


def config(size: str) -> Graphormer3DConfig:
    if size == "reference":
        return Graphormer3DConfig.reference_size(n_atom_types=8)
    return Graphormer3DConfig(n_atom_types=8, layers=4, width=64, heads=4, ffn=128, gaussians=32)


def print_profile(fn, device, label, rows=15):
    """One more call under torch.profiler: the ops that take the time (where a method's cost
    goes, e.g. a vmap fallback or a slow kernel)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"--- profile: {label} (sorted by {key})")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def measure(net, n_atoms, batch, probes, device, warmup, repeat, methods, profile=False):
    g = torch.Generator().manual_seed(n_atoms)
    types = torch.randint(0, net.cfg.n_atom_types, (n_atoms,), generator=g).to(device)
    x = (1.5 * n_atoms ** (1 / 3) * torch.rand(batch, n_atoms, 3, generator=g)).to(device)
    eps = rademacher_probes(probes, 0, torch.arange(batch), (n_atoms, 3)).to(device)

    def score_fn(y, t, mask=None):
        return net(y, t, types, mask)

    rows = []
    base = None
    for method in methods:
        coords = n_atoms * 3
        if method == "exact" and coords > REVERSE_EXACT_MAX_COORDS:
            continue
        drift = _Drift(score_fn, LinearVP(), None, "exact" if method == "score" else method,
                       eps if method.startswith("hutchinson") else None)
        if method == "score":
            def fn():
                with torch.no_grad():
                    drift._score(x, 0.5)
        else:
            def fn():
                drift.divergence_at(x, 0.5)
        try:
            times = timed(fn, device, warmup, repeat)
            if profile:
                print_profile(fn, device, method)
        except (RuntimeError, NotImplementedError) as err:  # e.g. out of memory, no forward mode
            print(f"N={n_atoms:4d} B={batch:3d} {method:>19s} failed: {str(err).splitlines()[0]}")
            rows.append(dict(bench="divergence", method=method, device=str(device), N=n_atoms,
                             B=batch, K=probes, error=str(err).splitlines()[0][:300]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
        med = statistics.median(times)
        base = med if method == "score" else base
        rows.append(dict(bench="divergence", method=method, device=str(device), N=n_atoms,
                         B=batch, K=probes, coords=coords, layers=net.cfg.layers,
                         width=net.cfg.width, ms=med * 1e3, p10_ms=q[0] * 1e3, p90_ms=q[-1] * 1e3,
                         x_score=med / base))
        print(f"N={n_atoms:4d} B={batch:3d} {method:>19s} {med * 1e3:9.2f} ms "
              f"({q[0] * 1e3:.2f}..{q[-1] * 1e3:.2f})  {med / base:6.1f} x score", flush=True)
    return rows


def default_reference_batch(device) -> int:
    """Structures per call for the 12 x 768 network at N = 256: reverse-mode Hutchinson keeps
    the graph of K B structures (about 0.5 GB each at N = 256), so 4 on an 80 GB GPU, fewer
    on smaller ones."""
    total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    return max(1, min(4, int(total_gb // 20)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["small", "reference"], default="small")
    ap.add_argument("--atoms", type=int, nargs="+", default=[4, 8, 13, 22, 40])
    ap.add_argument("--batch", type=int, default=None,
                    help="structures per call (default 16; reference size: by GPU memory)")
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print the top ops of one more call per method")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.size == "reference" and device.type != "cuda":
        raise SystemExit("--size reference is the 12 x 768 network: run it on a GPU")
    if "score" not in args.methods:
        args.methods.insert(0, "score")  # the baseline every ratio refers to
    if args.batch is None:
        args.batch = 16 if args.size == "small" else default_reference_batch(device)
    torch.manual_seed(0)
    net = Graphormer3D(config(args.size)).to(device).eval()
    rows = []
    for n in args.atoms:
        rows += measure(net, n, args.batch, args.probes, device, args.warmup, args.repeat,
                        args.methods, args.profile)
    write_json(args.json, {**environment(), "threads": torch.get_num_threads()}, rows)


if __name__ == "__main__":
    main()
