"""Importance reweighting of model samples to the Boltzmann distribution, and free energies.

A sample x ~ p (the model) gets weight w ∝ exp(-E(x)/kT) / p(x), so weighted averages are
averages over exp(-E/kT) whatever the model's errors (if p covers the ensemble). log p comes
from digfast.log_likelihood (exact divergence or Hutchinson). Free-energy differences
between states A and B: dF = F_B - F_A = -kT log(P_B / P_A) with P the weighted populations;
error bars by bootstrap over samples (weights recomputed per resample).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _np(a) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


def log_weights(energy, log_prob, kT: float = 1.0) -> np.ndarray:
    """Normalised log w = -E/kT - log p - logsumexp(...); non-finite terms get weight 0.

    energy in the same unit as kT; log_prob the model's log density of each sample."""
    e, lp = _np(energy).reshape(-1), _np(log_prob).reshape(-1)
    if e.shape != lp.shape:
        raise ValueError(f"one energy per log p: {e.shape} vs {lp.shape}")
    lw = -e / kT - lp
    lw[~np.isfinite(lw)] = -np.inf
    if not np.isfinite(lw).any():
        raise ValueError("no sample has a finite weight")
    return lw - _logsumexp(lw)


def _logsumexp(a: np.ndarray) -> float:
    m = np.max(a)
    return float(m + np.log(np.sum(np.exp(a - m))))


def effective_sample_size(log_w) -> float:
    """Kish's ESS = (sum w)^2 / sum w^2."""
    lw = _np(log_w)
    return float(math.exp(2 * _logsumexp(lw) - _logsumexp(2 * lw)))


def reweighted_mean(values, log_w) -> np.ndarray:
    """sum_i w_i values_i / sum_i w_i over the first axis."""
    v, lw = _np(values), _np(log_w)
    w = np.exp(lw - lw.max())
    return np.tensordot(w / w.sum(), v, axes=(0, 0))


@dataclass
class FreeEnergy:
    delta: float      # F_B - F_A, unit of kT
    error: float      # bootstrap standard error
    p_a: float
    p_b: float
    ess: float        # of the whole weighted set
    ess_a: float      # of the samples in A (B): how many effectively carry each population
    ess_b: float

    @property
    def reliable(self) -> bool:
        """Both states rest on >= 10 effective samples; below that the bootstrap misses the
        error of weights that a few samples dominate."""
        return min(self.ess_a, self.ess_b) >= 10


def free_energy_difference(in_a, in_b, log_w, kT: float = 1.0, n_boot: int = 500, seed: int = 0) -> FreeEnergy:
    """dF = -kT log(P_B / P_A) for boolean state memberships in_a, in_b of the weighted samples."""
    a, b, lw = _np(in_a).astype(bool), _np(in_b).astype(bool), _np(log_w)
    if not (a.shape == b.shape == lw.shape):
        raise ValueError("in_a, in_b and log_w need one entry per sample")
    w = np.exp(lw - lw.max())

    def delta(idx):
        wa, wb = w[idx][a[idx]].sum(), w[idx][b[idx]].sum()
        return -kT * math.log(wb / wa) if wa > 0 and wb > 0 else math.nan

    full = delta(np.arange(len(w)))
    if not math.isfinite(full):
        raise ValueError("a state holds no weighted sample: no free-energy difference")
    rng = np.random.default_rng(seed)
    boots = np.array([delta(rng.integers(0, len(w), len(w))) for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    pa, pb = w[a].sum() / w.sum(), w[b].sum() / w.sum()
    return FreeEnergy(full, float(boots.std(ddof=1)), float(pa), float(pb), effective_sample_size(lw),
                      effective_sample_size(np.where(a, lw, -np.inf)), effective_sample_size(np.where(b, lw, -np.inf)))
