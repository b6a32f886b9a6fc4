"""Noise schedules: the forward process x_t = alpha(t) x_0 + sigma(t) eps, t in [0, t_max].

Every schedule is defined in continuous time; a discretisation with n steps samples it
on t_i = i t_max / n, i = 0..n, so the discrete chain's alpha_i, sigma_i equal the
continuous ones at the grid points exactly.

VP (variance preserving):  dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW, prior N(0, I);
    alpha(t) = exp(-1/2 B(t)), B(t) = int_0^t beta, sigma^2 = 1 - alpha^2,
    discrete beta_i = 1 - alpha_i^2 / alpha_{i-1}^2.
VE (variance exploding):   dx = sqrt(d sigma^2/dt) dW, alpha = 1, prior N(0, sigma_max^2 I),
    sigma(t) = sigma_min (sigma_max / sigma_min)^t.
Times and coefficients are float64 tensors (cast by the caller) so that 1 - alpha^2 near
t = 0 keeps its digits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_F64 = torch.float64


def _t(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=_F64)


class Schedule:
    """Base: subclasses give log_alpha(t), sigma(t), drift_coef f(t) and diffusion g^2(t)."""

    kind: str
    t_max: float = 1.0
    prior_std: float = 1.0

    def log_alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def drift_coef(self, t) -> torch.Tensor:
        """f(t) in the forward drift f(t) x."""
        raise NotImplementedError

    def diffusion2(self, t) -> torch.Tensor:
        """g(t)^2, the forward diffusion squared."""
        raise NotImplementedError

    def log_snr(self, t) -> torch.Tensor:
        """lambda(t) = log(alpha / sigma), decreasing in t."""
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def t_of_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of log_snr by bisection (monotone); exact enough for any schedule."""
        lam = _t(lam)
        lo, hi = torch.zeros_like(lam), torch.full_like(lam, self.t_max)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def grid(self, n_steps: int) -> torch.Tensor:
        """t_0 = 0 < t_1 < ... < t_n = t_max."""
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        return torch.linspace(0.0, self.t_max, n_steps + 1, dtype=_F64)

    def discrete(self, n_steps: int) -> "Discretisation":
        t = self.grid(n_steps)
        return Discretisation(t=t, alpha=self.alpha(t), sigma=self.sigma(t))

    def config(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Discretisation:
    """alpha_i, sigma_i at t_i, i = 0..n (index 0 is data)."""

    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def n_steps(self) -> int:
        return len(self.t) - 1

    @property
    def betas(self) -> torch.Tensor:
        """beta_i = 1 - (alpha_i / alpha_{i-1})^2, i = 1..n (VP); entry i-1 holds beta_i."""
        return 1.0 - (self.alpha[1:] / self.alpha[:-1]) ** 2

    def ancestral(self, i: int) -> tuple[float, float, float]:
        """(a, b, c) of x_{i-1} = a x_i + b s_i + c z for the paper's ancestral update.

        With r = alpha_i / alpha_{i-1} and v = sigma_i^2 - r^2 sigma_{i-1}^2 (the variance
        step i adds): x_{i-1} = (x_i + v s_i) / r + sqrt(v) z. For VP v = beta_i and this is
        (x + beta s) / sqrt(1 - beta) + sqrt(beta) z; for VE r = 1, v = sigma_i^2 - sigma_{i-1}^2.
        """
        r = float(self.alpha[i] / self.alpha[i - 1])
        v = float(self.sigma[i] ** 2 - r**2 * self.sigma[i - 1] ** 2)
        return 1.0 / r, v / r, math.sqrt(max(v, 0.0))


class VPSchedule(Schedule):
    kind = "vp"

    def integrated_beta(self, t) -> torch.Tensor:
        """B(t) = int_0^t beta(s) ds."""
        raise NotImplementedError

    def beta(self, t) -> torch.Tensor:
        raise NotImplementedError

    def _b(self, t):
        # clamp: rounding can leave B(0) a hair below zero
        return self.integrated_beta(_t(t)).clamp_min(0.0)

    def log_alpha(self, t):
        return -0.5 * self._b(t)

    def sigma(self, t):
        # 1 - alpha^2 = -expm1(-B): accurate for small t
        return torch.sqrt(-torch.expm1(-self._b(t)))

    def log_snr(self, t):
        b = self._b(t)
        return -0.5 * b - 0.5 * torch.log(-torch.expm1(-b))

    def drift_coef(self, t):
        return -0.5 * self.beta(_t(t))

    def diffusion2(self, t):
        return self.beta(_t(t))


class LinearVP(VPSchedule):
    """beta(t) = beta_min + t (beta_max - beta_min); 1000 steps give DDPM's 1e-4 .. 2e-2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min <= beta_max:
            raise ValueError(f"need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t):
        return self.beta_min + _t(t) * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        t = _t(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def config(self):
        return {"name": "linear", "beta_min": self.beta_min, "beta_max": self.beta_max}


class CosineVP(VPSchedule):
    """alpha(t)^2 = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2) (Nichol & Dhariwal).

    beta(t) diverges at t = 1, so the process stops at t_max (alpha(t_max) ~ 0.0084 by default).
    """

    def __init__(self, s: float = 0.008, t_max: float = 0.9946):
        if not 0 < t_max < 1:
            raise ValueError(f"cosine schedule needs 0 < t_max < 1, got {t_max}")
        self.s, self.t_max = float(s), float(t_max)

    def _angle(self, t):
        return (_t(t) + self.s) / (1 + self.s) * (math.pi / 2)

    def integrated_beta(self, t):
        return -2.0 * (torch.log(torch.cos(self._angle(t))) - math.log(math.cos(self._angle(0.0))))

    def beta(self, t):
        return math.pi / (1 + self.s) * torch.tan(self._angle(t))

    def config(self):
        return {"name": "cosine", "s": self.s, "t_max": self.t_max}


class SigmoidVP(VPSchedule):
    """DiG's schedule: n_train discrete betas sigmoid(linspace(-6, 6, n)) (end - start) + start.

    In continuous time beta(t) is piecewise constant, -n log(1 - beta_i) on ((i-1)/n, i/n],
    so discretising with the training step count gives back exactly those betas.
    """

    def __init__(self, n_train: int = 500, beta_start: float = 1e-7, beta_end: float = 2e-2):
        if n_train < 2 or not 0 <= beta_start <= beta_end < 1:
            raise ValueError("need n_train >= 2 and 0 <= beta_start <= beta_end < 1")
        self.n_train, self.beta_start, self.beta_end = int(n_train), float(beta_start), float(beta_end)
        betas = torch.sigmoid(torch.linspace(-6, 6, n_train, dtype=_F64)) * (beta_end - beta_start) + beta_start
        self.table_betas = betas
        rates = -torch.log1p(-betas)  # per step
        self._cum = torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(rates, 0)])
        self._rate = rates * n_train

    def _locate(self, t):
        u = (_t(t) * self.n_train).clamp(0, self.n_train)
        i = torch.clamp(torch.ceil(u).long() - 1, 0, self.n_train - 1)
        return u, i

    def beta(self, t):
        return self._rate[self._locate(t)[1]]

    def integrated_beta(self, t):
        u, i = self._locate(t)
        return self._cum[i] + (u - i) * (self._cum[i + 1] - self._cum[i])

    def config(self):
        return {"name": "sigmoid", "n_train": self.n_train, "beta_start": self.beta_start,
                "beta_end": self.beta_end}


class GeometricVE(Schedule):
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1, prior N(0, sigma_max^2 I)."""

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prior_std = self.sigma_max
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t):
        return torch.zeros_like(_t(t))

    def sigma(self, t):
        return self.sigma_min * torch.exp(_t(t) * self._log_ratio)

    def drift_coef(self, t):
        return torch.zeros_like(_t(t))

    def diffusion2(self, t):
        return 2.0 * self._log_ratio * self.sigma(t) ** 2

    def config(self):
        return {"name": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


SCHEDULES = {"linear": LinearVP, "cosine": CosineVP, "sigmoid": SigmoidVP, "ve": GeometricVE}


def make_schedule(config: dict | str) -> Schedule:
    """Build a schedule from its config() dict or a name with default parameters."""
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**config)
