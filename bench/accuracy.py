"""Accuracy of a model against held-out reference data, each statistic beside its noise floor.

    python bench/accuracy.py --system dw4 [--model dw4] [-n 5000] [--sampler ancestral --steps 500]
                             [--json out.json] [--markdown]

DW-4 / LJ-13: Wasserstein-1 distance of the energy distribution and of the interatomic-
distance distribution between model samples and reference set A; the floor is the same
statistic between two disjoint reference sets A and B of the same size (the shipped public
validation split, never used for training). `outliers` counts samples above the highest
reference energy (broken structures, which dominate an energy W1). Several sampler settings
can be listed with --runs "ancestral:500,dpm++2m:50".
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import digfast
from digfast.report import wasserstein1
from digfast.systems.particles import pair_distances


def particle_statistics(system, samples, ref_a, ref_b) -> list[dict]:
    e = system.energy
    rows = []
    for name, f in (("energy W1", lambda x: e(x.double())), ("distance W1", lambda x: pair_distances(x.double()))):
        rows.append({"statistic": name, "value": wasserstein1(f(samples), f(ref_a)),
                     "floor": wasserstein1(f(ref_b), f(ref_a))})
    return rows


def evaluate(system_name: str, model_name: str, n: int, runs: list[tuple[str, int]], seed: int = 0,
             progress: bool = True) -> list[dict]:
    model = digfast.load(model_name)
    system = model.system
    ref = system.reference_data()
    if 2 * n > len(ref):
        raise ValueError(f"need 2n <= {len(ref)} reference structures for a floor; use -n {len(ref) // 2}")
    perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))
    ref_a, ref_b = ref[perm[:n]], ref[perm[n:2 * n]]
    out = []
    for sampler, steps in runs:
        start = time.perf_counter()
        res = digfast.sample_batch(model, n=n, steps=steps, sampler=sampler, seed=seed, progress=progress)
        seconds = time.perf_counter() - start
        # structures above the highest reference energy: broken samples that dominate W1
        outliers = int((system.energy(res.positions.double()) > system.energy(ref.double()).max()).sum())
        for row in particle_statistics(system, res.positions, ref_a, ref_b):
            row.update(system=system_name, model=model_name, sampler=sampler, steps=steps, samples=n,
                       ratio=row["value"] / row["floor"], seconds=seconds, outliers=outliers,
                       nonfinite=res.metadata["n_nonfinite"])
            out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", required=True, choices=["dw4", "lj13"])
    ap.add_argument("--model", default=None, help="model name or folder (default: the shipped one)")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--runs", default="ancestral:500,dpm++2m:50", help="sampler:steps,...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print README table rows")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
    rows = evaluate(args.system, args.model or args.system, args.n, runs, args.seed)
    print(f"{'system':7} {'sampler':10} {'steps':>5} {'n':>6} {'statistic':12} {'value':>10} {'floor':>8} "
          f"{'ratio':>8} {'outliers':>8}")
    for r in rows:
        print(f"{r['system']:7} {r['sampler']:10} {r['steps']:5d} {r['samples']:6d} {r['statistic']:12} "
              f"{r['value']:10.4f} {r['floor']:8.4f} {r['ratio']:8.2f} {r['outliers']:8d}")
    if args.markdown:
        for r in rows:
            print(f"| {r['system']} | {r['statistic']} | {r['value']:.4g} | {r['floor']:.4f} | {r['ratio']:.3g} | "
                  f"{r['outliers']} | {r['model']} | {r['sampler']} | {r['steps']} | {r['samples']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
