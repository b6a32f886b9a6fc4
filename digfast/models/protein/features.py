"""Inputs of the protein model that depend on neither weights nor structure: the sinusoidal
embedding of the sampler's step index and the relative-position buckets of residue pairs."""
from __future__ import annotations

import math

import torch


def step_embedding(step: torch.Tensor, dim: int, max_period: float = 10000.0,
                   dtype=torch.float32) -> torch.Tensor:
    """(B, dim) embedding of step indices (B,) (0 = first sampler step, t = 1):
    [sin(s w_k), cos(s w_k)], w_k = max_period^(-k / (dim/2 - 1)), k = 0 .. dim/2 - 1."""
    half = dim // 2
    k = torch.arange(half, device=step.device, dtype=torch.float32)
    freqs = torch.exp(k * (-math.log(max_period) / (half - 1)))
    angles = step.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def relative_position_buckets(n: int, n_buckets: int = 64, max_distance: int = 128,
                              device=None) -> torch.Tensor:
    """(n, n) int64 bucket of the offset d = i - j (T5 style, two-sided): half the buckets
    for d < 0, half for d >= 0; within a half, |d| < half/2 gets its own bucket and larger
    |d| fall in log-spaced buckets up to max_distance (beyond it: the last bucket)."""
    pos = torch.arange(n, device=device)
    d = pos[:, None] - pos[None, :]
    half = n_buckets // 2
    exact = half // 2
    dist = d.abs()
    # log-spaced part, evaluated only where |d| >= exact (no log(0))
    scaled = torch.log(dist.clamp(min=exact).to(torch.float32) / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (half - exact)).long()).clamp(max=half - 1)
    return (d < 0).long() * half + torch.where(dist < exact, dist, far)
