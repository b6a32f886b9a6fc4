"""Samplers of the DiG protein model: frames (translations tr, rotations IR) from noise to
structure, t: 1 -> 0.

Diffusion: translations VE with sigma_tr(t) = 0.1^(1-t) 35^t A; rotations IGSO(3) with
sigma_r(t) = 0.02^(1-t) 1.65^t. Squared diffusion coefficients g_tr^2 = 2 sigma_tr^2 ln(350),
g_r^2 = 4 sigma_r^2 ln(82.5) (as the public sampler writes them). Scores from the network's
raw outputs: s_tr = T_eps / sigma_tr, s_rot = IR_eps * E(sigma_r) (so3.score_norm).

Samplers (k-th step from t_k to t_{k+1} = t_k - dt on the grid t = linspace(1, 0, 501);
fewer steps take a subset of that grid, so the network always sees the integer step index
it was trained on):
- "public": the public run_inference update, deterministic:
      tr += g_tr^2 dt s_tr;   IR <- exp(g_r^2 dt s_rot) IR
  With 500 steps and the same initial state it reproduces the public sampler.
- "sde": the reverse SDE (Euler-Maruyama): the same drift plus g sqrt(dt) z on the
  translations and, in the tangent space, on the rotations (z ~ N(0, I), fresh per step).
- "ode": the probability-flow ODE (half the drift, no noise), Euler.
- "dpm2m": few-step ODE solver: translations by DPM-Solver++(2M) on the VE data prediction
  x0 = tr + sigma_tr^2 s_tr in log sigma; rotations by second-order Adams-Bashforth of the
  same probability-flow drift per unit log sigma_r (first step Euler).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from digfast.models.protein.config import N_STEPS, ROT_SIGMA_MAX, ROT_SIGMA_MIN, TR_SIGMA_MAX, TR_SIGMA_MIN
from digfast.ops.philox import STEP_NONE, STREAM_PRIOR, STREAM_STEP, philox_normal
from digfast.protein import so3

SAMPLERS = ("public", "sde", "ode", "dpm2m")


@dataclass(frozen=True)
class ProteinSchedule:
    n_steps: int = N_STEPS
    tr_min: float = TR_SIGMA_MIN
    tr_max: float = TR_SIGMA_MAX
    rot_min: float = ROT_SIGMA_MIN
    rot_max: float = ROT_SIGMA_MAX

    def grid(self) -> np.ndarray:
        """t at the trained step indices 0..n_steps (the last, 0, is where sampling ends)."""
        return np.linspace(1, 0, self.n_steps + 1)

    def sigma_tr(self, t):
        return self.tr_min ** (1 - t) * self.tr_max ** t

    def sigma_rot(self, t):
        return self.rot_min ** (1 - t) * self.rot_max ** t

    def g2_tr(self, t):
        return 2 * self.sigma_tr(t) ** 2 * math.log(self.tr_max / self.tr_min)

    def g2_rot(self, t):
        return 4 * self.sigma_rot(t) ** 2 * math.log(self.rot_max / self.rot_min)

    def step_indices(self, steps: int) -> list[int]:
        """Indices into grid() of the steps' start points, plus n_steps at the end."""
        if not 1 <= steps <= self.n_steps:
            raise ValueError(f"steps must be in 1..{self.n_steps}, got {steps}")
        idx = np.unique(np.round(np.linspace(0, self.n_steps, steps + 1)).astype(int))
        return idx.tolist()


@dataclass
class StepPlan:
    """Per-step constants (host floats computed once; no host work inside the loop)."""
    index: list[int]          # network step index of each step
    sigma_tr: list[float]
    sigma_rot: list[float]
    dt: list[float]
    score_norm: list[float]   # E(sigma_rot) as the public float32 lookup
    next_sigma_tr: list[float]
    next_sigma_rot: list[float]
    g2_tr: list[float]
    g2_rot: list[float]


def plan(schedule: ProteinSchedule, steps: int) -> StepPlan:
    grid = schedule.grid()
    idx = schedule.step_indices(steps)
    start, end = idx[:-1], idx[1:]
    t0, t1 = grid[start], grid[end]
    sig_rot = schedule.sigma_rot(t0)
    return StepPlan(index=list(start), sigma_tr=schedule.sigma_tr(t0).tolist(), sigma_rot=sig_rot.tolist(),
                    dt=(t0 - t1).tolist(), score_norm=so3.score_norm(sig_rot).tolist(),
                    next_sigma_tr=schedule.sigma_tr(t1).tolist(), next_sigma_rot=schedule.sigma_rot(t1).tolist(),
                    g2_tr=schedule.g2_tr(t0).tolist(), g2_rot=schedule.g2_rot(t0).tolist())


def initial_state(seed: int, sample_ids: torch.Tensor, L: int, schedule: ProteinSchedule = ProteinSchedule(),
                  dtype=torch.float32, device="cpu"):
    """Sample k's start: tr ~ N(0, tr_max^2) per residue, Haar-uniform rotations, from noise
    keyed by (seed, k) (independent of batch composition)."""
    z = philox_normal(seed, sample_ids.cpu(), STEP_NONE, STREAM_PRIOR, 7 * L).double().view(-1, L, 7)
    tr = schedule.tr_max * z[..., :3]
    rot = so3.uniform_rotations(z[..., 3:])
    return tr.to(device, dtype), rot.to(device, dtype)


def run(score_fn, tr: torch.Tensor, rot: torch.Tensor, *, sampler: str = "public", steps: int = N_STEPS,
        schedule: ProteinSchedule = ProteinSchedule(), seed: int = 0, sample_ids=None, on_step=None,
        keep_steps=(), start: int = 0, stop: int | None = None):
    """Integrate frames (B, L, 3) + (B, L, 3, 3) from t = 1 to 0 (or steps start..stop-1 of
    the plan only). score_fn(tr, rot, step_index) returns the raw network outputs (T_eps, IR_eps), each (B, L, 3). Returns (tr, rot), or with
    keep_steps also {k: (tr, rot)} of the states after k updates (0 = initial)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown protein sampler {sampler!r}; choose one of {SAMPLERS}")
    p = plan(schedule, steps)
    kept = {start: (tr.clone(), rot.clone())} if start in keep_steps else {}
    B, L = tr.shape[:2]
    ids = (torch.arange(B) if sample_ids is None else sample_ids).to(tr.device)  # noise made where it is used
    prev = None  # dpm2m: previous step's (data prediction, rotation drift, h)
    for k in range(start, len(p.index) if stop is None else stop):
        step = p.index[k]
        T_eps, IR_eps = score_fn(tr, rot, step)
        T_eps, IR_eps = T_eps.to(tr.dtype), IR_eps.to(tr.dtype)
        s_tr = T_eps / p.sigma_tr[k]
        s_rot = IR_eps * p.score_norm[k]
        g2_tr, g2_rot, dt = p.g2_tr[k], p.g2_rot[k], p.dt[k]
        if sampler == "public":
            tr = tr + (g2_tr * dt) * s_tr
            rot = so3.expmap((g2_rot * dt) * s_rot) @ rot
        elif sampler == "sde":
            z = philox_normal(seed, ids, k, STREAM_STEP, 6 * L).view(B, L, 6).to(tr.device, tr.dtype)
            tr = tr + (g2_tr * dt) * s_tr + math.sqrt(g2_tr * dt) * z[..., :3]
            rot = so3.expmap((g2_rot * dt) * s_rot + math.sqrt(g2_rot * dt) * z[..., 3:]) @ rot
        elif sampler == "ode":
            tr = tr + (0.5 * g2_tr * dt) * s_tr
            rot = so3.expmap((0.5 * g2_rot * dt) * s_rot) @ rot
        else:
            tr, rot, prev = _dpm2m_step(tr, rot, s_tr, s_rot, p, k, prev)
        if on_step is not None:
            on_step()
        if k + 1 in keep_steps:
            kept[k + 1] = (tr.clone(), rot.clone())
    return (tr, rot, kept) if keep_steps else (tr, rot)


def _dpm2m_step(tr, rot, s_tr, s_rot, p: StepPlan, k: int, prev):
    """One DPM-Solver++(2M) step on translations, AB2 in log sigma on rotations.

    Translations: the probability-flow ODE is d tr = sigma^2 s_tr d(log sigma) here, with data
    prediction x0 = tr + sigma^2 s_tr and h = log(sigma / sigma_next):
        tr' = (sigma_next / sigma) tr + (1 - sigma_next / sigma) D,
        D = x0 (first step) or (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h.
    Rotations: the tangent increment per unit decrease of log sigma_r is f = 2 sigma_r^2 s_rot
    (half of g_r^2 dt / dlog sigma_r = 4 sigma_r^2); f * h (first step) or the variable-step
    AB2 combination of f and f_prev."""
    sig, sig_next = p.sigma_tr[k], p.next_sigma_tr[k]
    h = math.log(sig / sig_next)
    x0 = tr + (sig * sig) * s_tr
    rsig, rsig_next = p.sigma_rot[k], p.next_sigma_rot[k]
    rh = math.log(rsig / rsig_next)
    f = (2 * rsig * rsig) * s_rot
    d, rinc = x0, rh * f
    if prev is not None:
        x0_prev, f_prev, h_prev, rh_prev = prev
        r, rr = h_prev / h, rh_prev / rh
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        rinc = rh * ((1 + 1 / (2 * rr)) * f - (1 / (2 * rr)) * f_prev)
    tr_new = (sig_next / sig) * tr + (1 - sig_next / sig) * d
    return tr_new, so3.expmap(rinc) @ rot, (x0, f, h, rh)
