"""DiG protein sampling speed: structures/s of the public 500-step sampler, the public way
against digfast's fast path, in the same run.

(a) "public-style": digfast's reference model (public layout and arithmetic: Linear(256 ->
    768) over all L^2 pairs in every layer, pair bias recomputed every step), one structure
    per call, fp32 - how the public run_inference.py samples.
(b) "fast": per-protein precompute, pair-value rewrite, a batch of structures per call
    sharing the pair data, fp32 or bf16 (on a GPU the fused Triton attention when present,
    and the whole step replayed from one CUDA graph unless --no-cuda-graph).
Both run the full-size public model (768 wide, 12 layers, 32 heads, pair 256) with random
weights. A sampler step costs the same at every t, so each path is timed over --steps
sampler steps (after a warm-up step, interleaved a/b/a/b..., median per step) and
structures/s = batch / (500 x step time). Prints a table; --json writes the rows with the
device, versions, dtype and shapes.

    OMP_NUM_THREADS=1 python bench/protein.py --device cpu --lengths 64 --batch 8
    python bench/protein.py --device cuda --lengths 64 256 512 1000 --dtype bf16 --batch auto
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_json  # noqa: E402

from digfast.models.protein import ProteinConfig, ProteinScoreModel  # noqa: E402
from digfast.models.protein.fast import FastProteinModel  # noqa: E402
from digfast.protein import sampler  # noqa: E402
from digfast.protein.engine import DTYPES, auto_batch_size, reference_score_fn  # noqa: E402
from digfast.protein.graph import GraphedSampler  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(score, tr, rot, first_step, n_steps, device):
    """Seconds of each of n_steps public sampler steps (network + update)."""
    out = []
    for k in range(first_step, first_step + n_steps):
        sync(device)
        t0 = time.perf_counter()
        tr, rot = sampler.run(score, tr, rot, start=k, stop=k + 1)
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bench_length(model, L, args, device, gen):
    cfg = model.cfg
    single = torch.randn(L, 384, generator=gen).to(device)
    pair = torch.randn(L, L, 128, generator=gen).to(device)
    rows = []
    B = auto_batch_size(10**6, L, cfg, device, "fast") if args.batch == "auto" else int(args.batch)
    ref_score = reference_score_fn(model, single, pair) if not args.skip_reference else None
    fast = FastProteinModel(model, dtype=DTYPES[args.dtype])
    t0 = time.perf_counter()
    ctx = fast.context(single, pair)
    sync(device)
    precompute = time.perf_counter() - t0
    fast_score = lambda a, b, s: fast(ctx, a, b, s)  # noqa: E731
    tr1, rot1 = sampler.initial_state(0, torch.arange(1), L, device=device)
    trB, rotB = sampler.initial_state(0, torch.arange(B), L, dtype=torch.float64, device=device)
    graphed = None
    if device.type == "cuda" and not args.no_cuda_graph:  # the whole step replayed from one graph
        graphed = GraphedSampler(fast, ctx, B, sampler="public", steps=500, device=device)
        graphed.load(trB, rotB)
    # warm-up (allocations, kernel compilation); the graph path warms up its own replay: an
    # eager step beside the graph's pool would need as much memory again (an H200 ran out)
    if ref_score:
        timed_steps(ref_score, tr1, rot1, 0, 1, device)
    if graphed is not None:
        graphed.step(0)
    else:
        timed_steps(fast_score, trB, rotB, 0, 1, device)
    ref_t, fast_t = [], []
    for rep in range(args.steps):  # interleaved, so that load changes hit both paths alike
        k = 1 + rep * (498 // max(1, args.steps))
        if ref_score:
            ref_t += timed_steps(ref_score, tr1, rot1, k, 1, device)
        if graphed is not None:
            sync(device)
            t0 = time.perf_counter()
            graphed.step(k)
            sync(device)
            fast_t.append(time.perf_counter() - t0)
        else:
            fast_t += timed_steps(fast_score, trB, rotB, k, 1, device)
    base = dict(L=L, device=str(device), steps_timed=args.steps, sampler="public", n_steps=500,
                model="768x12, 32 heads, pair 256 (random weights)")
    ref_row = None
    if ref_t:
        s = statistics.median(ref_t)
        ref_row = dict(base, path="public-style", dtype="fp32", batch=1, step_s=s,
                       structures_per_s=1 / (500 * s), step_s_min=min(ref_t), step_s_max=max(ref_t))
        rows.append(ref_row)
    s = statistics.median(fast_t)
    fast_row = dict(base, path="fast", dtype=args.dtype, batch=B, step_s=s, structures_per_s=B / (500 * s),
                    cuda_graph=graphed is not None,
                    step_s_min=min(fast_t), step_s_max=max(fast_t), precompute_s=precompute,
                    context_mb=ctx.nbytes() / 2**20)
    if ref_row:
        fast_row["speedup"] = fast_row["structures_per_s"] / ref_row["structures_per_s"]
    rows.append(fast_row)
    if device.type == "cuda":
        fast_row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512, 1000])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", default="auto", help="structures per fast call, or 'auto' (free memory)")
    ap.add_argument("--steps", type=int, default=3, help="sampler steps timed per path")
    ap.add_argument("--skip-reference", action="store_true", help="only the fast path (e.g. L = 1000)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="time the fast step eagerly on a GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    model = ProteinScoreModel(ProteinConfig())  # torch default init: random weights
    model = model.to(device).eval()
    env = environment()
    env["threads"] = torch.get_num_threads()
    env["load_average"] = os.getloadavg()
    rows = []
    print(f"{'L':>5} {'path':>13} {'dtype':>5} {'batch':>5} {'s/step':>9} {'struct/s':>10} {'speedup':>8}")
    for L in args.lengths:
        for r in bench_length(model, L, args, device, gen):
            rows.append(r)
            print(f"{r['L']:>5} {r['path']:>13} {r['dtype']:>5} {r['batch']:>5} {r['step_s']:>9.4f} "
                  f"{r['structures_per_s']:>10.3g} {r.get('speedup', float('nan')):>8.2f}", flush=True)
    env["load_average_end"] = os.getloadavg()
    write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
