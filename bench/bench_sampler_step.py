"""Benchmark of the fused sampler step: compiled backends against the pure-torch reference.

    OMP_NUM_THREADS=2 python bench/bench_sampler_step.py [--threads 2] [--json out.json]

CPU: the C++ op (digfast._C, std::thread over the batch) vs sampler_step_reference.
CUDA (when a GPU is there): the CUDA kernel and the Triton kernel vs the reference on the GPU.
All candidates run eagerly (no CUDA graphs), after a warm-up; times are medians (with the
10th/90th percentiles) per call. Prints a table and writes one JSON row per measurement
naming the device, versions, dtype and shapes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from digfast.ops import _backend
from digfast.ops.sampler_step import sampler_step

from common import environment, write_json  # noqa: E402  (bench/ is on sys.path)

SHAPES = [(64, 22, 3), (1024, 13, 3), (256, 256, 3), (16, 2000, 3)]
# (label, c, masked): an ODE step draws no noise; an SDE step does.
MODES = [("ode", 0.0, False), ("sde", 0.5, False), ("sde+mask", 0.5, True)]


def make_inputs(B, N, D, masked, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(device)
    d = torch.randn(B, N, D, generator=g).to(device)
    ids = torch.arange(B, dtype=torch.int64).to(device)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=g) < 0.8
        mask[:, 0] = True
        mask = mask.to(device)
    return x, d, ids, mask


def time_cpu(fn, warmup, repeat, min_time=0.2):
    for _ in range(warmup):
        fn()
    times = []
    t_start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - t_start < min_time and len(times) < 10 * repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_cuda(fn, warmup, repeat, inner=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)  # seconds per call
    return times


def quantiles(times):
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return statistics.median(times), q[0], q[-1]


def run(device, backends, shapes, warmup, repeat, threads):
    rows = []
    timer = time_cuda if device == "cuda" else time_cpu
    for B, N, D in shapes:
        for label, c, masked in MODES:
            x, d, ids, mask = make_inputs(B, N, D, masked, device)
            kw = dict(seed=2**40 + 17, sample_ids=ids, step=123, mask=mask)
            results = {}
            for backend in backends:
                with torch.no_grad():
                    fn = lambda: sampler_step(x, d, 0.9, 0.1, c, backend=backend, **kw)  # noqa: E731
                    results[backend] = quantiles(timer(fn, warmup, repeat))
            ref = results["reference"][0]
            elements = B * N * D
            moved = elements * 4 * 3 + B * 8 + (B * N if masked else 0)  # x, d, out; ids; mask
            for backend, (med, p10, p90) in results.items():
                rows.append(dict(op="sampler_step", device=device, backend=backend, B=B, N=N, D=D,
                                 mode=label, c=c, masked=masked, dtype="float32",
                                 threads=threads if device == "cpu" else None,
                                 median_ms=med * 1e3, p10_ms=p10 * 1e3, p90_ms=p90 * 1e3,
                                 speedup_vs_reference=ref / med,
                                 melem_per_s=elements / med / 1e6, gb_per_s=moved / med / 1e9,
                                 samples_per_s=B / med))
    return rows


def print_table(rows):
    head = (f"{'device':6} {'backend':9} {'B':>5} {'N':>5} {'D':>2} {'mode':9} {'median ms':>10} "
            f"{'p10':>8} {'p90':>8} {'x ref':>7} {'Melem/s':>9} {'GB/s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['device']:6} {r['backend']:9} {r['B']:5d} {r['N']:5d} {r['D']:2d} {r['mode']:9} "
              f"{r['median_ms']:10.4f} {r['p10_ms']:8.4f} {r['p90_ms']:8.4f} "
              f"{r['speedup_vs_reference']:7.1f} {r['melem_per_s']:9.1f} {r['gb_per_s']:7.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and C++ op) CPU threads; default: torch's setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", default="bench_sampler_step.json", help="output file ('' to skip)")
    parser.add_argument("--no-gpu", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    rows = []
    cpu_backends = ["reference"] + (["cpp"] if _backend.available("cpp", torch.device("cpu")) else [])
    rows += run("cpu", cpu_backends, SHAPES, args.warmup, args.repeat, threads)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = torch.device("cuda")
        gpu_backends = ["reference"] + [b for b in ("cuda", "triton") if _backend.available(b, gpu)]
        gpu_shapes = SHAPES + [(4096, 22, 3), (1024, 256, 3)]
        rows += run("cuda", gpu_backends, gpu_shapes, args.warmup, max(args.repeat // 3, 5), threads)

    env = environment()
    print(f"# {env['cpu']}, {threads} threads; torch {env['torch']}, triton {env['triton']}"
          + (f"; GPU {env['gpu']}" if "gpu" in env else ""))
    print_table(rows)
    write_json(args.json, env, rows)


if __name__ == "__main__":
    main()
