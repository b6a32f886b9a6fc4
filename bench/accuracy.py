"""Accuracy of a model against held-out reference data, each statistic beside its noise floor.

    python bench/accuracy.py --system dw4 [--model dw4] [-n 5000] [--runs ancestral:500,dpm++2m:50]
                             [--json out.json] [--markdown]
    python bench/accuracy.py --all --markdown      # the README table: every shipped model

DW-4 / LJ-13: Wasserstein-1 distance of the energy distribution and of the interatomic-
distance distribution between model samples and reference set A; the floor is the same
statistic between two disjoint reference sets A and B of the same size (the shipped public
validation split, never used for training). `outliers` counts samples above the highest
reference energy (broken structures, which dominate an energy W1). Several sampler settings
can be listed with --runs "ancestral:500,dpm++2m:50".

Alanine dipeptide: Jensen-Shannon divergence of the 36 x 36 phi/psi histogram between model
samples and the held-out part of the reference run (every reweighted frame after the last
training structure); floor: the same divergence for n frames drawn by weight from the run's
training period (an independent reference set of the same size). C5, C7eq and phi >= 0
populations beside the held-out reference's (targets: |diff| <= 0.03; ratio within 2x).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import digfast
from digfast.accuracy import alanine_statistics, particle_statistics, reference_sets
from digfast.systems import get_system


def evaluate(system_name: str, model_name: str, n: int, runs: list[tuple[str, int]], seed: int = 0,
             progress: bool = True, reference: torch.Tensor | None = None, device=None) -> list[dict]:
    """reference: structures to compare with in place of the system's shipped reference data
    (particle systems only; e.g. an equilibrium set from parallel tempering); device: where to
    sample (the statistics are computed on the CPU)."""
    model = digfast.load(model_name)
    system = model.system
    if system_name == "alanine-dipeptide":
        from digfast.systems import alanine as ala

        out = []
        for sampler, steps in runs:
            start = time.perf_counter()
            res = digfast.sample_batch(model, n=n, steps=steps, sampler=sampler, seed=seed, progress=progress,
                                     device=device)
            seconds = time.perf_counter() - start
            broken = int(ala.broken_structures(res.positions).sum())  # a bond off by > 0.5 A
            for row in alanine_statistics(res.positions, n, seed):
                row.update(system=system_name, model=model_name, sampler=sampler, steps=steps, samples=n,
                           seconds=seconds, outliers=broken,
                           nonfinite=res.metadata["n_nonfinite"])
                out.append(row)
        return out
    ref = system.reference_data() if reference is None else structures_of(system, reference)
    ref_a, ref_b = reference_sets(ref, n, seed)
    out = []
    for sampler, steps in runs:
        start = time.perf_counter()
        res = digfast.sample_batch(model, n=n, steps=steps, sampler=sampler, seed=seed, progress=progress,
                                     device=device)
        seconds = time.perf_counter() - start
        # structures above the highest reference energy: broken samples that dominate W1
        outliers = int((system.energy(res.positions.double()) > system.energy(ref.double()).max()).sum())
        for row in particle_statistics(system, res.positions, ref_a, ref_b):
            row.update(system=system_name, model=model_name, sampler=sampler, steps=steps, samples=n,
                       ratio=row["value"] / row["floor"], seconds=seconds, outliers=outliers,
                       nonfinite=res.metadata["n_nonfinite"])
            out.append(row)
    return out


def structures_of(system, positions: torch.Tensor) -> torch.Tensor:
    """positions as (n, atoms, dim) of this system (flat rows are reshaped), or InputError naming
    the mismatch: a file of another system would otherwise fail deep inside the statistics."""
    shape = (system.n_atoms, system.spatial_dim)
    if positions.dim() == 2 and positions.shape[1] == shape[0] * shape[1]:
        positions = positions.reshape(len(positions), *shape)
    if tuple(positions.shape[1:]) != shape:
        raise digfast.io.InputError(f"reference structures are {tuple(positions.shape[1:])} (atoms, dim) each; "
                                    f"{system.name} needs {shape}")
    return positions


def parse_runs(text: str) -> list[tuple[str, int]]:
    """'sampler:steps,...' -> [(sampler, steps), ...]"""
    return [(r.split(":")[0], int(r.split(":")[1])) for r in text.split(",")]


# samples and sampler runs of the README table, per system
DEFAULTS = {"dw4": (5000, "ancestral:500,dpm++2m-sde:50,dpm++2m:50"),
            "lj13": (2000, "ancestral:500,dpm++2m-sde:50,dpm++2m:50"),
            "alanine-dipeptide": (5000, "ancestral:200,dpm++2m-sde:50,dpm++2m:50")}


def _cell(row: dict, *keys) -> str:
    for key in keys:
        if key in row:
            return f"{row[key]:+.4f}" if key == "diff" else f"{row[key]:.4g}"
    return ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", choices=sorted(DEFAULTS))
    ap.add_argument("--all", action="store_true", help="every shipped model with its README settings")
    ap.add_argument("--model", default=None, help="model name or folder (default: the shipped one)")
    ap.add_argument("-n", type=int, default=None, help="samples (default: the README's per system)")
    ap.add_argument("--runs", default=None, help="sampler:steps,... (default: the README's per system)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true", help="print README table rows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="where to sample, e.g. cuda (default: the CPU)")
    ap.add_argument("--reference", default=None,
                    help=".npz/.npy of structures to compare with instead of the shipped reference (DW-4, LJ-13; "
                         "e.g. scripts/dw4_parallel_tempering.py --save)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.all == bool(args.system):
        ap.error("give --system or --all")
    if args.reference and (args.all or args.system == "alanine-dipeptide"):
        ap.error("--reference needs --system dw4 or lj13")
    try:
        reference = digfast.io.load_positions(args.reference) if args.reference else None
        if reference is not None:
            reference = structures_of(get_system(args.system), reference)  # the system, without loading weights
    except (OSError, digfast.io.InputError) as err:
        ap.error(f"--reference: {err}")
    rows = []
    for system in (sorted(DEFAULTS) if args.all else [args.system]):
        n, runs = DEFAULTS[system]
        n = args.n or n
        runs = parse_runs(args.runs or runs)
        rows += evaluate(system, args.model or system, n, runs, args.seed, reference=reference, device=args.device)
    print(f"{'system':17} {'sampler':10} {'steps':>5} {'n':>6} {'statistic':18} {'value':>10} {'floor/ref':>10} "
          f"{'ratio/diff':>10} {'outliers':>8}")
    for r in rows:
        print(f"{r['system']:17} {r['sampler']:10} {r['steps']:5d} {r['samples']:6d} {r['statistic']:18} "
              f"{r['value']:10.4f} {_cell(r, 'floor', 'reference'):>10} {_cell(r, 'ratio', 'diff'):>10} "
              f"{r['outliers']:8d}")
    if args.markdown:
        print("| system | statistic | value | floor / reference | ratio / diff | outliers | sampler | steps | samples |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['system']} | {r['statistic']} | {r['value']:.4g} | {_cell(r, 'floor', 'reference')} | "
                  f"{_cell(r, 'ratio', 'diff')} | {r['outliers']} | {r['sampler']} | {r['steps']} | {r['samples']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
