"""DW-4 mode populations under exp(-E/kT) by parallel tempering: a check of the reference set.

Replica-exchange Metropolis on the DW-4 energy (kT = 1 at the bottom of a geometric ladder up
to kT = 4, where the pair barrier of 4.4 kT is about one kT), many independent ladders at once.
The populations of k = 0..6 pair distances below d0 = 4 at kT = 1 (the statistic of
digfast.accuracy.dw4_mode_populations) are printed beside the public reference's, with a
standard error from independent groups of ladders.

    OMP_NUM_THREADS=1 python scripts/dw4_parallel_tempering.py --json bench/issue6/dw4_parallel_tempering.json \
        --save runs/dw4_pt.npz
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from digfast.accuracy import dw4_mode_populations, particle_statistics, reference_sets
from digfast.systems import get_system


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ladders", type=int, default=1024, help="independent replica ladders")
    ap.add_argument("--temperatures", type=int, default=8)
    ap.add_argument("--t-max", type=float, default=4.0)
    ap.add_argument("--sweeps", type=int, default=20000)
    ap.add_argument("--burn-in", type=int, default=5000)
    ap.add_argument("--every", type=int, default=20, help="sweeps between recorded structures")
    ap.add_argument("--groups", type=int, default=16, help="groups of ladders for the standard error")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--save", default=None, help="npz: up to 20000 of the kT = 1 structures (positions), "
                    "an equilibrium reference for bench/pidp_reweight.py --equilibrium")
    args = ap.parse_args(argv)
    system = get_system("dw4")
    g = torch.Generator().manual_seed(args.seed)
    kts = torch.logspace(0, np.log10(args.t_max), args.temperatures, dtype=torch.float64)
    L, T = args.ladders, args.temperatures
    ref = system.reference_data().double()
    x = ref[torch.randint(len(ref), (L * T,), generator=g)].reshape(L, T, 4, 2).clone()
    e = system.energy(x.reshape(-1, 4, 2)).reshape(L, T)
    step = 0.3 * kts.sqrt()[None, :, None, None]
    accepted = torch.zeros(T, dtype=torch.float64)
    swaps = torch.zeros(T - 1, dtype=torch.float64)
    kept = []
    t0 = time.perf_counter()
    for sweep in range(args.sweeps):
        # one particle at a time, random-walk Metropolis
        for p in range(4):
            prop = x.clone()
            prop[:, :, p] += step[..., 0, :] * torch.randn(L, T, 2, generator=g, dtype=torch.float64)
            e_prop = system.energy(prop.reshape(-1, 4, 2)).reshape(L, T)
            ok = torch.rand(L, T, generator=g, dtype=torch.float64).log() < -(e_prop - e) / kts
            x = torch.where(ok[..., None, None], prop, x)
            e = torch.where(ok, e_prop, e)
            accepted += ok.double().mean(0) / 4
        # swap neighbours (even or odd pairs, alternating)
        for i in range(sweep % 2, T - 1, 2):
            log_a = (e[:, i] - e[:, i + 1]) * (1 / kts[i] - 1 / kts[i + 1])
            ok = torch.rand(L, generator=g, dtype=torch.float64).log() < log_a
            xi, xj = x[:, i].clone(), x[:, i + 1].clone()
            x[:, i] = torch.where(ok[:, None, None], xj, xi)
            x[:, i + 1] = torch.where(ok[:, None, None], xi, xj)
            ei, ej = e[:, i].clone(), e[:, i + 1].clone()
            e[:, i], e[:, i + 1] = torch.where(ok, ej, ei), torch.where(ok, ei, ej)
            swaps[i] += ok.double().mean()
        if sweep >= args.burn_in and sweep % args.every == 0:
            kept.append(x[:, 0].clone())
    seconds = time.perf_counter() - t0
    samples = torch.stack(kept, 1)  # (L, kept, 4, 2)
    pops = dw4_mode_populations(samples.reshape(-1, 4, 2))
    per_group = np.stack([dw4_mode_populations(s.reshape(-1, 4, 2)) for s in samples.chunk(args.groups)])
    se = per_group.std(0, ddof=1) / np.sqrt(args.groups)
    ref_pops = dw4_mode_populations(ref)
    energy = system.energy(samples.reshape(-1, 4, 2))
    print(f"{L} ladders x {T} temperatures (kT 1..{args.t_max}), {args.sweeps} sweeps, {seconds:.0f} s; "
          f"acceptance {[round(a, 2) for a in (accepted / args.sweeps).tolist()]}, "
          f"swap rate {[round(s, 2) for s in (swaps / (args.sweeps / 2)).tolist()]}")
    print(f"mean energy at kT 1: {float(energy.mean()):.3f} (reference {float(system.energy(ref).mean()):.3f})")
    # the accuracy report's W1s: 2000 PT structures against the reference split as in
    # bench/pidp_reweight.py (seed 0, set A), floor set B
    pick = torch.randperm(samples.shape[0] * samples.shape[1], generator=g)[:2000]
    stats = particle_statistics(system, samples.reshape(-1, 4, 2)[pick], *reference_sets(ref, 2000, seed=0))
    for row in stats[:2]:
        print(f"{row['statistic']} of 2000 PT structures against the reference: {row['value']:.4f} "
              f"(floor {row['floor']:.4f})")
    print(f"{'k':>3} {'PT kT=1':>9} {'+-':>7} {'reference':>9}")
    for k in range(7):
        print(f"{k:3d} {pops[k]:9.4f} {se[k]:7.4f} {ref_pops[k]:9.4f}")
    if args.save:
        flat = samples.reshape(-1, 4, 2)
        keep = torch.randperm(len(flat), generator=g)[:20000]
        np.savez_compressed(args.save, positions=flat[keep].float().numpy())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "seconds": seconds, "populations": pops.tolist(),
                       "standard_error": se.tolist(), "reference": ref_pops.tolist(),
                       "reference_size": len(ref), "w1_against_reference": stats[:2], "mean_energy": float(energy.mean()),
                       "reference_mean_energy": float(system.energy(ref).mean()),
                       "acceptance": (accepted / args.sweeps).tolist(),
                       "swap_rate": (swaps / (args.sweeps / 2)).tolist()}, fh, indent=1)


if __name__ == "__main__":
    main()
