"""Training data for the particle benchmarks from their energy alone (seeded Metropolis MCMC).

    python scripts/make_particle_data.py --system lj13 --n 50000 --seed 0 --out data/lj13_train.npz

Chains start from a compact configuration (jittered grid; random Gaussian starts blow up
the r^-12 term), move one atom at a time (DW-4: all atoms), burn in with step-size
adaptation, then sample every `thin` iterations. The output holds centred positions
(n, N, d) float32 and a JSON summary (energy mean/std, acceptance), to check against the
shipped reference (LJ-13, seed 0: mean -43.06 / std 6.90 kT against -43.00 / 7.10; the
energy and distance W1 within the noise floor, bench/RESULTS.md session 14).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from digfast.systems import get_system
from digfast.systems.mcmc import metropolis

SETTINGS = {  # chains, burn-in iterations, thinning, initial step, one atom per move
    "dw4": dict(chains=256, burn_in=100_000, thin=500, step=0.3, single_atom=False, spacing=3.0),
    "lj13": dict(chains=256, burn_in=200_000, thin=260, step=0.1, single_atom=True, spacing=1.1),
}


def compact_start(system, chains: int, spacing: float, generator: torch.Generator) -> torch.Tensor:
    side = 3 if system.spatial_dim == 3 else 2
    grid = torch.cartesian_prod(*[torch.arange(side, dtype=torch.float64)] * system.spatial_dim)[: system.n_atoms]
    jitter = 0.05 * torch.randn(chains, system.n_atoms, system.spatial_dim, generator=generator, dtype=torch.float64)
    return spacing * (grid + jitter)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", required=True, choices=sorted(SETTINGS))
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    system = get_system(args.system)
    cfg = SETTINGS[args.system]
    g = torch.Generator().manual_seed(args.seed)
    x0 = compact_start(system, cfg["chains"], cfg["spacing"], g)
    start = time.time()
    x, acc, step = metropolis(system.energy, x0, n_samples=args.n, burn_in=cfg["burn_in"], thin=cfg["thin"],
                              step=cfg["step"], single_atom=cfg["single_atom"], generator=g, progress=True)
    e = system.energy(x)
    summary = {"system": args.system, "n": args.n, "seed": args.seed, **cfg, "acceptance": acc,
               "final_step": step, "energy_mean": float(e.mean()), "energy_std": float(e.std()),
               "seconds": time.time() - start}
    np.savez_compressed(args.out, positions=x.float().numpy(), summary=json.dumps(summary))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
