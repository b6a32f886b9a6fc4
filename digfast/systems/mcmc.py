"""Metropolis random-walk MCMC on a batched energy: many independent chains at once.

Used to make training data for the particle systems from their energy alone. Each chain
moves all atoms at once with Gaussian proposals; the step size adapts to an acceptance
near `target_accept` during burn-in only, so the production phase is a proper Markov chain.
"""
from __future__ import annotations

from typing import Callable

import torch

from digfast.ops.sampler_step import remove_com


@torch.no_grad()
def metropolis(energy: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *, n_samples: int,
               burn_in: int = 2000, thin: int = 50, step: float = 0.1, target_accept: float = 0.4,
               kT: float = 1.0, single_atom: bool = False, generator: torch.Generator | None = None,
               progress: bool = False):
    """Run len(x0) chains; return (samples (n_samples, N, d), acceptance rate, final step size).

    single_atom: each proposal moves one atom (cycling through them), which mixes dense
    clusters far better than moving all atoms at once. Samples are collected from every
    chain every `thin` iterations after burn-in, centred.
    """
    x = x0.clone().to(torch.float64)
    e = energy(x)
    chains = x.shape[0]
    step_size = torch.full((chains, 1, 1), step, dtype=torch.float64)
    rounds = -(-n_samples // chains)
    total = burn_in + rounds * thin
    out, accepted, proposed = [], 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="mcmc", unit="sweep", leave=False, mininterval=1.0)
    for it in range(total):
        move = step_size * torch.randn(x.shape, dtype=x.dtype, generator=generator)
        if single_atom:
            only = torch.zeros(x.shape[1], 1, dtype=x.dtype)
            only[it % x.shape[1]] = 1.0
            move = move * only
        prop = x + move
        e_prop = energy(prop)
        u = torch.rand(chains, dtype=x.dtype, generator=generator)
        accept = torch.log(u) < -(e_prop - e) / kT
        accept &= torch.isfinite(e_prop)
        x = torch.where(accept[:, None, None], prop, x)
        e = torch.where(accept, e_prop, e)
        if it < burn_in:  # Robbins-Monro on log step size, per chain
            step_size *= torch.exp(0.05 * (accept.to(x.dtype) - target_accept))[:, None, None]
        else:
            accepted += int(accept.sum())
            proposed += chains
            if (it - burn_in + 1) % thin == 0:
                out.append(remove_com(x).clone())
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    samples = torch.cat(out)[:n_samples] if out else x[:0]
    return samples, accepted / max(proposed, 1), float(step_size.mean())
