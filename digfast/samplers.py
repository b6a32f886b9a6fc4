"""Reverse-time samplers behind one score interface: score_fn(x, t, mask) -> like x.

x is (B, N, d) float32 in the zero-centre-of-mass subspace, t a (B,) tensor of times,
mask (B, N) bool or None.
Every update goes through the fused ops.sampler_step (a x + b direction + c noise, then
CoM removal), so padded atoms stay zero and noise is keyed by (seed, sample id, step):
a sample's path never depends on its batch.

    ancestral   the paper's discrete chain on the schedule's n-step discretisation
    em          Euler-Maruyama on the reverse SDE
    euler, heun probability-flow ODE
    rk4         the same, fourth order on a log-SNR grid: samples for importance weights
    dpm++2m     DPM-Solver++(2M), multistep in log-SNR, for few steps
    dpm++2m-sde its stochastic form (SDE-DPM-Solver++(2M)): fresh noise each step forgets
                part of the score error that the deterministic solver carries to the end
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from digfast.ops.philox import STEP_NONE, STREAM_PRIOR, philox_normal
from digfast.ops.sampler_step import remove_com, sampler_step
from digfast.schedules import Schedule

ScoreFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class StepContext:
    """What every sampler needs besides the score: seeds, ids, mask, progress hook."""

    seed: int
    sample_ids: torch.Tensor
    mask: torch.Tensor | None = None
    on_step: Callable[[], None] | None = None

    def step(self, x, direction, a, b, c, step):
        return sampler_step(x, direction, a, b, c, seed=self.seed, sample_ids=self.sample_ids,
                            step=step, mask=self.mask)

    def tick(self):
        if self.on_step is not None:
            self.on_step()


def prior_sample(schedule: Schedule, seed: int, sample_ids: torch.Tensor, n_atoms: int, dim: int,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """x_T ~ N(0, prior_std^2 I) on the zero-CoM subspace, keyed by (seed, sample id)."""
    z = philox_normal(seed, sample_ids, STEP_NONE, STREAM_PRIOR, n_atoms * dim)
    z = z.reshape(len(sample_ids), n_atoms, dim)
    return schedule.prior_std * remove_com(z, mask)


def _times(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), float(t), dtype=torch.float32, device=like.device)


def default_t_min(schedule: Schedule) -> float:
    """Where continuous-time samplers stop: VP needs t > 0 (score blows up), VE is fine at 0."""
    return 1e-3 if schedule.kind == "vp" else 0.0


def time_grid(schedule: Schedule, steps: int, t_min: float, spacing: str = "time") -> torch.Tensor:
    """steps + 1 decreasing times from t_max to t_min, uniform in t or in log-SNR."""
    if spacing == "time":
        return torch.linspace(schedule.t_max, t_min, steps + 1, dtype=torch.float64)
    if spacing == "logsnr":
        lam_min = float(schedule.log_snr(t_min))
        if not math.isfinite(lam_min):  # VP at t = 0: the grid would jump from t_max to 0
            raise ValueError(f"t_min {t_min} has an infinite log-SNR; this sampler needs t_min > 0 "
                             f"(default {default_t_min(schedule)})")
        lam = torch.linspace(float(schedule.log_snr(schedule.t_max)), lam_min, steps + 1, dtype=torch.float64)
        t = schedule.t_of_log_snr(lam)
        t[0], t[-1] = schedule.t_max, t_min
        return t
    raise ValueError(f"unknown spacing {spacing!r}")


def ancestral(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int, ctx: StepContext,
              **_) -> torch.Tensor:
    disc = schedule.discrete(steps)
    for i in range(steps, 0, -1):
        s = score_fn(x, _times(disc.t[i], x), ctx.mask)
        a, b, c = disc.ancestral(i)
        x = ctx.step(x, s, a, b, c if i > 1 else 0.0, i)
        ctx.tick()
    return x


def euler_maruyama(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int,
                   ctx: StepContext, t_min: float | None = None, **_) -> torch.Tensor:
    """x <- x - h (f x - g^2 s) + g sqrt(h) z on the reverse SDE; no noise on the last step."""
    ts = time_grid(schedule, steps, default_t_min(schedule) if t_min is None else t_min)
    for k in range(steps):
        t, h = ts[k], float(ts[k] - ts[k + 1])
        f, g2 = float(schedule.drift_coef(t)), float(schedule.diffusion2(t))
        s = score_fn(x, _times(t, x), ctx.mask)
        noise = math.sqrt(g2 * h) if k < steps - 1 else 0.0
        x = ctx.step(x, s, 1.0 - f * h, g2 * h, noise, steps - k)
        ctx.tick()
    return x


def _ode_velocity_coeffs(schedule, t):
    """dx/dt = f x - 1/2 g^2 s: returns (f, -1/2 g^2)."""
    return float(schedule.drift_coef(t)), -0.5 * float(schedule.diffusion2(t))


def ode_euler(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int, ctx: StepContext,
              t_min: float | None = None, **_) -> torch.Tensor:
    ts = time_grid(schedule, steps, default_t_min(schedule) if t_min is None else t_min)
    for k in range(steps):
        t, h = ts[k], float(ts[k] - ts[k + 1])
        f, q = _ode_velocity_coeffs(schedule, t)
        x = ctx.step(x, score_fn(x, _times(t, x), ctx.mask), 1.0 - f * h, -q * h, 0.0, steps - k)
        ctx.tick()
    return x


def ode_heun(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int, ctx: StepContext,
             t_min: float | None = None, **_) -> torch.Tensor:
    """Second order: average the velocities at both ends of each step (2 evaluations a step)."""
    ts = time_grid(schedule, steps, default_t_min(schedule) if t_min is None else t_min)
    for k in range(steps):
        t0, t1 = ts[k], ts[k + 1]
        h = float(t0 - t1)
        f0, q0 = _ode_velocity_coeffs(schedule, t0)
        s0 = score_fn(x, _times(t0, x), ctx.mask)
        x_pred = ctx.step(x, s0, 1.0 - f0 * h, -q0 * h, 0.0, steps - k)
        f1, q1 = _ode_velocity_coeffs(schedule, t1)
        s1 = score_fn(x_pred, _times(t1, x), ctx.mask)
        # x - h/2 (v0 + v1), v = f x + q s, written as a x + 1 * direction
        direction = -0.5 * h * (q0 * s0 + f1 * x_pred + q1 * s1)
        x = ctx.step(x, direction, 1.0 - 0.5 * h * f0, 1.0, 0.0, steps - k)
        ctx.tick()
    return x


def ode_rk4(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int, ctx: StepContext,
            t_min: float | None = None, **_) -> torch.Tensor:
    """Classical fourth-order Runge-Kutta (4 evaluations a step) on a grid uniform in log-SNR,
    which shortens the steps where the ODE stiffens (t -> 0). Accurate enough that the samples
    follow the density log_likelihood computes, as importance weights need (the few-step
    solvers' samples do not)."""
    ts = time_grid(schedule, steps, default_t_min(schedule) if t_min is None else t_min, spacing="logsnr")

    def velocity(y, t):
        f, q = _ode_velocity_coeffs(schedule, t)
        return f * y + q * score_fn(y, _times(t, y), ctx.mask)

    for k in range(steps):
        t0, t1 = float(ts[k]), float(ts[k + 1])
        h = t1 - t0  # negative: backwards in time
        k1 = velocity(x, t0)
        k2 = velocity(remove_com(x + 0.5 * h * k1, ctx.mask), t0 + 0.5 * h)
        k3 = velocity(remove_com(x + 0.5 * h * k2, ctx.mask), t0 + 0.5 * h)
        k4 = velocity(remove_com(x + h * k3, ctx.mask), t1)
        x = ctx.step(x, (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0, 1.0, h, 0.0, steps - k)
        ctx.tick()
    return x


def dpm_solver_2m(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int,
                  ctx: StepContext, t_min: float | None = None, **_) -> torch.Tensor:
    """DPM-Solver++(2M) with data prediction D = (x + sigma^2 s) / alpha, uniform in log-SNR.

    steps - 1 updates x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h_i}) D' from
    t_max to t_min, D' the second-order extrapolation of the last two D's (first order on the
    first update, and on the last one when steps < 15, which keeps few-step runs stable); the
    last of the `steps` score calls returns D at t_min: the step to sigma = 0, which removes
    the noise sigma(t_min) that would otherwise stay in every sample.
    """
    return _dpm_solver_2m(score_fn, schedule, x, steps, ctx, t_min, stochastic=False)


def dpm_solver_2m_sde(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, steps: int,
                      ctx: StepContext, t_min: float | None = None, **_) -> torch.Tensor:
    """SDE-DPM-Solver++(2M): the exact solution of the reverse SDE's linear part over each
    log-SNR step h, x_i = (sigma_i / sigma_{i-1}) e^{-h} x_{i-1} + alpha_i (1 - e^{-2h}) D'
    + sigma_i sqrt(1 - e^{-2h}) z, with the same D' extrapolation and final denoise as dpm++2m.
    """
    return _dpm_solver_2m(score_fn, schedule, x, steps, ctx, t_min, stochastic=True)


def _dpm_solver_2m(score_fn, schedule, x, steps, ctx, t_min, stochastic: bool):
    ts = time_grid(schedule, max(steps - 1, 1), default_t_min(schedule) if t_min is None else t_min, "logsnr")
    if steps == 1:
        ts = ts[:1]  # one call: denoise the prior draw
    alpha, sigma, lam = schedule.alpha(ts), schedule.sigma(ts), schedule.log_snr(ts)
    prev_d, prev_h = None, None
    for k in range(len(ts)):
        s = score_fn(x, _times(ts[k], x), ctx.mask)
        d = (x + float(sigma[k] ** 2) * s) / float(alpha[k])
        if k == len(ts) - 1:
            x = ctx.step(x, d, 0.0, 1.0, 0.0, 1)
            ctx.tick()
            break
        h = float(lam[k + 1] - lam[k])
        last_first_order = k == len(ts) - 2 and steps < 15
        if prev_d is None or last_first_order:
            direction = d
        else:
            # D' = D + (D - D_prev) / (2 r): the ODE and SDE forms share the midpoint rule
            r = prev_h / h
            direction = (1 + 0.5 / r) * d - (0.5 / r) * prev_d
        if stochastic:
            a = float(sigma[k + 1] / sigma[k]) * math.exp(-h)
            b = float(alpha[k + 1]) * -math.expm1(-2 * h)
            c = float(sigma[k + 1]) * math.sqrt(-math.expm1(-2 * h))
        else:
            a, b, c = float(sigma[k + 1] / sigma[k]), float(alpha[k + 1]) * -math.expm1(-h), 0.0
        x = ctx.step(x, direction, a, b, c, steps - k)
        prev_d, prev_h = d, h
        ctx.tick()
    return x


SAMPLERS: dict[str, Callable] = {
    "ancestral": ancestral,
    "em": euler_maruyama,
    "euler": ode_euler,
    "heun": ode_heun,
    "rk4": ode_rk4,
    "dpm++2m": dpm_solver_2m,
    "dpm++2m-sde": dpm_solver_2m_sde,
}

# score evaluations per step, for reporting
EVALS_PER_STEP = {"ancestral": 1, "em": 1, "euler": 1, "heun": 2, "rk4": 4, "dpm++2m": 1, "dpm++2m-sde": 1}


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
