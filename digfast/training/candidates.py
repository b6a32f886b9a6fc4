"""Candidate structures for PIDP: relevant low-energy structures, not equilibrium samples.

Random compact starts are relaxed by gradient descent on the energy (a few hundred steps of
Adam on the coordinates), then a short Metropolis run at an elevated temperature spreads
them over the wells they found. The run is far too short to equilibrate between wells, so
the mode populations still come from PIDP, not from here; what the candidates give is
coverage: points where the Fokker-Planck residual and the force term are enforced.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from digfast.ops.sampler_step import remove_com
from digfast.systems.mcmc import metropolis

# lattice spacing of the compact starts (random Gaussian starts blow up r^-12 terms)
START_SPACING = {"dw4": 3.0, "lj13": 1.1}


@dataclass
class CandidateReport:
    n: int
    seconds: float
    energy_evaluations: int
    energy_mean: float
    energy_min: float
    settings: dict


def compact_starts(system, n: int, spacing: float, generator: torch.Generator) -> torch.Tensor:
    """(n, N, d) float64: the first N points of a cubic lattice, jittered."""
    side = max(2, round(system.n_atoms ** (1 / system.spatial_dim) + 0.5))
    grid = torch.cartesian_prod(*[torch.arange(side, dtype=torch.float64)] * system.spatial_dim)
    grid = grid.reshape(-1, system.spatial_dim)[: system.n_atoms]
    jitter = 0.1 * torch.randn(n, system.n_atoms, system.spatial_dim, generator=generator, dtype=torch.float64)
    return remove_com(spacing * (grid + jitter))


def relax(energy, x: torch.Tensor, steps: int, lr: float = 0.02) -> torch.Tensor:
    """Gradient descent (Adam on the coordinates) towards the nearest minima."""
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        energy(x).sum().backward()
        opt.step()
    return remove_com(x.detach())


def low_energy_candidates(system, n: int, *, seed: int = 0, relax_steps: int = 300, sweeps: int = 200,
                          temperature: float = 2.0, chains: int = 256) -> tuple[torch.Tensor, CandidateReport]:
    """n candidate structures (float32) and what making them cost.

    `chains` relaxed starts, then `sweeps` Metropolis iterations at `temperature` x kT of which
    the second half is collected (thinned to reach n)."""
    if system.name not in START_SPACING:
        raise ValueError(f"no candidate recipe for {system.name!r}; known: {sorted(START_SPACING)}")
    if n < 1 or sweeps < 2:
        raise ValueError("need n >= 1 and sweeps >= 2")
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    x0 = relax(system.energy, compact_starts(system, chains, START_SPACING[system.name], g), relax_steps)
    burn, rounds = sweeps // 2, -(-n // chains)
    thin = max(1, (sweeps - burn) // rounds)
    samples, _, _ = metropolis(system.energy, x0, n_samples=n, burn_in=burn, thin=thin, step=0.05,
                               kT=temperature, single_atom=system.n_atoms > 8, generator=g)
    samples = samples[:n]
    seconds = time.perf_counter() - start
    e = system.energy(samples.double())
    evaluations = chains * (relax_steps + burn + rounds * thin + 1)
    report = CandidateReport(n=len(samples), seconds=seconds, energy_evaluations=evaluations,
                             energy_mean=float(e.mean()), energy_min=float(e.min()),
                             settings=dict(seed=seed, relax_steps=relax_steps, sweeps=sweeps,
                                           temperature=temperature, chains=chains))
    return samples.float(), report
