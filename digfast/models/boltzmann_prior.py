"""A score built from the energy, that the network only corrects (models with prior "boltzmann").

In the model's normalised coordinates x = R / position_scale, at kT = 1:

    s_base(x, t) = lam(t) (1/alpha) s_0(x / alpha) + (1 - lam(t)) (-x / (alpha^2 + sigma^2)),
    (1/alpha) s_0(x / alpha) = -grad_x E(position_scale x / alpha),
    lam(t) = exp(-sigma^2 / (2 alpha^2 w^2)),

with w the width of the thermal wells in normalised units. At t = 0 it is the Boltzmann
score exactly, at t_max the prior's; in between the network's share (-eps / sigma, eps from
the network: what DSM and PIDP train) makes up the difference. The gate falls as a Gaussian
in sigma / alpha so that the force at x / alpha, which grows without bound as alpha -> 0,
never enters far from t = 0. Each atom's energy term is softly capped
at `cap` (see capped).

Why: a network must otherwise learn the steep short-range forces (LJ walls) from samples;
with the energy known (every system PIDP trains on), they are free.
"""
from __future__ import annotations

import torch

from digfast.ops.sampler_step import remove_com

# below this gate weight the energy term is dropped (and its argument never evaluated)
GATE_CUTOFF = 1e-6


def base_noise(system, schedule, position_scale: float, width: float, x: torch.Tensor,
               t: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """eps_base = -sigma s_base at (x, t), (B, N, d), zero-CoM; differentiable in x and t
    (to every order the energy allows) when either requires grad."""
    tt = t.double()  # keeps t's graph when PIDP differentiates in t
    alpha, sigma = schedule.alpha(tt), schedule.sigma(tt)
    lam = torch.exp(-sigma**2 / (2.0 * alpha**2 * width**2))
    alpha_, sigma_, lam_ = (v.to(x.dtype)[:, None, None] for v in (alpha, sigma, lam))
    prior = -x / (alpha_**2 + sigma_**2)
    active = (lam > GATE_CUTOFF).to(x.device)
    score = (1.0 - lam_) * prior
    if bool(active.any()):
        idx = active.nonzero().squeeze(1)
        score = score.index_add(0, idx, lam_[idx] * capped(boltzmann_score(system, position_scale, x[idx], alpha_[idx]), cap))
    return -sigma_ * remove_com(score)


def capped(score: torch.Tensor, cap: float) -> torch.Tensor:
    """Each atom's score vector v -> v (1 + (|v| / cap)^8)^(-1/8): unchanged (to 0.1%) below
    cap / 2, where the thermal forces live, and at most `cap` at a clash, where the raw force
    (LJ: r^-13) would throw the atoms apart in one explicit sampler step. Smooth, so PIDP can
    differentiate it.

    Evaluated in float64 as (1/M) (M^-8 + (m/M)^8)^(-1/8) with m = |v| / cap, M = max(1, m):
    the same function, but no power overflows, so a clash gives a finite value and gradient
    (the direct form gave 0 and NaN from |v| ~ 1e5 cap in float32)."""
    v = score.double()
    m2 = v.pow(2).sum(-1, keepdim=True) / cap**2  # m^2; no sqrt, whose gradient is NaN at v = 0
    big = m2.clamp(min=1.0)  # M^2
    scale = big.rsqrt() * (big.pow(-4) + (m2 / big).pow(4)).pow(-0.125)
    return (v * scale).to(score.dtype)


def boltzmann_score(system, position_scale: float, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """-grad_x E(position_scale x / alpha): the score of x / alpha's Boltzmann density, seen at x.
    torch.func.grad rather than autograd.grad: it composes with the likelihood's forward-mode
    divergence (jvp/vmap) as well as with the reverse passes of training and PIDP."""
    def energy(y):
        return system.energy(position_scale * y / alpha).sum()

    return -torch.func.grad(energy)(x)
