"""End-to-end samples/s of digfast.sample_batch, compiled step op against the reference.

    OMP_NUM_THREADS=2 python bench/bench_sampler.py [--threads 2] [--json out.json]

Model: the analytic Gaussian mixture (4 atoms, 3-D), whose score is cheap, so the numbers
measure the sampler runtime itself (step op, noise, loop overhead), not a network. The same
run, same seed, same shapes, times each backend of the step op (DIGFAST_BACKEND).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import digfast
from common import environment, write_json  # noqa: E402  (bench/ is on sys.path)
from digfast.ops import _backend

CASES = [("ancestral", 100, 4096), ("dpm++2m", 25, 4096), ("heun", 50, 1024)]


def time_run(model, sampler, steps, n, device, repeat):
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        digfast.sample_batch(model, n=n, steps=steps, sampler=sampler, seed=0, device=device, progress=False,
                             batch_size=n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default="bench_sampler.json", help="output file ('' to skip)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    model = digfast.load("mixture")
    for device in devices:
        backends = [b for b in ("reference", "cpp", "cuda", "triton") if _backend.available(b, device)]
        for sampler, steps, n in CASES:
            ref = None
            for backend in backends:
                os.environ["DIGFAST_BACKEND"] = backend
                try:
                    time_run(model, sampler, 2, min(n, 64), device, 1)  # warm-up (and JIT)
                    med, lo, hi = time_run(model, sampler, steps, n, device, args.repeat)
                finally:
                    del os.environ["DIGFAST_BACKEND"]
                ref = med if backend == "reference" else ref
                rows.append(dict(bench="sample_batch", device=str(device), backend=backend, sampler=sampler,
                                 steps=steps, n=n, atoms=4, dim=3, dtype="float32",
                                 threads=torch.get_num_threads(), median_s=med, min_s=lo, max_s=hi,
                                 samples_per_s=n / med, speedup_vs_reference=ref / med))
    env = environment()
    print(f"# {env['cpu']}, {torch.get_num_threads()} threads; torch {env['torch']}")
    print(f"{'device':6} {'backend':9} {'sampler':9} {'steps':>5} {'n':>6} {'median s':>9} {'samples/s':>10} {'x ref':>6}")
    for r in rows:
        print(f"{r['device']:6} {r['backend']:9} {r['sampler']:9} {r['steps']:5d} {r['n']:6d} "
              f"{r['median_s']:9.3f} {r['samples_per_s']:10.1f} {r['speedup_vs_reference']:6.2f}")
    write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
