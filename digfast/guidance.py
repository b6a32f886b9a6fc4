"""Property guidance: s(x | c) = s(x) + w(t) grad_x log q_t(c | x).

q_t(c | x_t) comes from a user predictor of positions (system units) and time:

    gaussian    predictor -> mean, or (mean, std); q = N(c; mean, std^2 + tau^2)
    classifier  predictor -> logits over classes; q = softmax(logits)[c]
    log_prob    predictor -> log q(c | x) itself (exact noisy likelihoods, tests)

Predictors see every atom of padded batches (mask is not passed on). A predictor trained
only on clean structures sees x_t badly; denoise=True feeds it the Tweedie estimate
x0_hat = (x_t + sigma^2 s(x_t)) / alpha instead and differentiates through it (through the
score network too), with the Gaussian variance inflated by
sigma^2 / (alpha^2 + sigma^2) |grad f|^2, the variance of x_0 given x_t for unit-variance
data (in the model's normalised coordinates): exact for Gaussian data and a linear property.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from digfast.ops.sampler_step import remove_com


@dataclass
class Guidance:
    predictor: Callable  # predictor(positions (B, N, d) in system units, t (B,)) -> see module doc
    target: float | int | torch.Tensor  # c: a value (gaussian) or class index (classifier)
    weight: float | str | Callable = 1.0  # w; w(t) -> float / (B,) tensor; "signal": alpha^2 / (alpha^2 + sigma^2)
    kind: str = "gaussian"
    std: float = 0.0  # tau: extra Gaussian width of q(c | x_0) beyond the predictor's own
    denoise: bool = False  # predictor trained on clean structures: use the Tweedie x0_hat

    def __post_init__(self):
        if self.kind not in ("gaussian", "classifier", "log_prob"):
            raise ValueError(f"guidance kind must be gaussian, classifier or log_prob, got {self.kind!r}")
        if isinstance(self.weight, str) and self.weight != "signal":
            raise ValueError(f"weight must be a number, a function of t or 'signal', got {self.weight!r}")
        if self.std < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")

    def weight_at(self, t: torch.Tensor, schedule=None) -> torch.Tensor:
        if self.weight == "signal":  # fades out where x_t says little about x_0 (and x0_hat is wild)
            a2, s2 = schedule.alpha(t) ** 2, schedule.sigma(t) ** 2
            return (a2 / (a2 + s2)).double()
        w = self.weight(t) if callable(self.weight) else self.weight
        return torch.as_tensor(w, dtype=torch.float64).expand(t.shape[0]).clone()

    def log_q(self, positions: torch.Tensor, t: torch.Tensor, extra_var=None) -> torch.Tensor:
        """(B,) log q(c | positions) (up to a constant in positions)."""
        out = self.predictor(positions, t)
        if self.kind == "log_prob":
            return _per_structure(out, positions)
        if self.kind == "classifier":
            logp = torch.log_softmax(out, dim=-1)
            return logp[..., int(self.target)]
        mean, std = (out if isinstance(out, tuple) else (out, None))
        var = torch.as_tensor(self.std**2, dtype=mean.dtype, device=mean.device)
        if std is not None:
            var = var + std**2
        if extra_var is not None:
            var = var + extra_var
        if not torch.isfinite(var).all() or not torch.isfinite(mean).all():
            raise FloatingPointError(f"guidance predictor gave NaN/inf at t = {float(t.reshape(-1)[0]):.3g}: the "
                                     "denoised structure runs away at high noise; try weight='signal'")
        if not torch.all(var > 0):
            raise ValueError("Gaussian guidance needs a width: give std > 0 or a predictor returning (mean, std)")
        c = torch.as_tensor(self.target, dtype=mean.dtype, device=mean.device)
        return _per_structure(-0.5 * (c - mean) ** 2 / var - 0.5 * torch.log(var), positions)


def _per_structure(v, positions):
    v = v.reshape(positions.shape[0], -1)
    return v.sum(1)  # several properties: independent Gaussians


def guided_score_fn(score_fn, guidance: Guidance, schedule, position_scale: float = 1.0):
    """Wrap score_fn(x, t, mask) (x in the model's coordinates x_sys / position_scale) so that it
    returns the guided score in the same coordinates; autograd supplies the chain rule."""
    def guided(x, t, mask):
        base = None if guidance.denoise else score_fn(x, t, mask)  # no graph: only log q is differentiated
        with torch.enable_grad():
            xg = x.detach().to(torch.float32 if x.dtype == torch.float16 else x.dtype).requires_grad_(True)
            t64 = t.detach().double().cpu()
            if guidance.denoise:
                s = score_fn(xg, t, mask)
                alpha = schedule.alpha(t64).to(x.device, xg.dtype)[:, None, None]
                sigma2 = (schedule.sigma(t64) ** 2).to(x.device, xg.dtype)[:, None, None]
                x0 = (xg + sigma2 * s) / alpha
                logq = guidance.log_q(x0 * position_scale, t,
                                      extra_var=_tweedie_var(guidance, x0, t, schedule, position_scale))
                base = s.detach()
            else:
                logq = guidance.log_q(xg * position_scale, t)
            (g,) = torch.autograd.grad(logq.sum(), xg)
        w = guidance.weight_at(t64, schedule).to(x.device, x.dtype)[:, None, None]
        return base + w * remove_com(g.to(x.dtype), mask)
    return guided


def _tweedie_var(guidance, x0, t, schedule, scale):
    """sigma^2 / (alpha^2 + sigma^2) |grad_x0 f|^2 (in model coordinates): the predictor's extra variance."""
    if guidance.kind != "gaussian":
        return None
    with torch.enable_grad():
        probe = x0.detach().requires_grad_(True)
        out = guidance.predictor(probe * scale, t)
        mean = out[0] if isinstance(out, tuple) else out
        (gf,) = torch.autograd.grad(mean.sum(), probe)
    if mean.dim() != 1:
        raise ValueError("denoised Gaussian guidance takes one property per structure: mean of shape (B,)")
    t64 = t.detach().double().cpu()
    a2, s2 = schedule.alpha(t64) ** 2, schedule.sigma(t64) ** 2
    ratio = s2 / (a2 + s2)
    return (ratio.to(x0.device, x0.dtype) * gf.pow(2).sum((1, 2))).detach()


# built-in properties of positions (B, N, d), for guidance and the CLI


def pair_distance(i: int, j: int) -> Callable:
    def f(x, t=None):  # smooth at zero distance (denoised estimates collapse early on)
        return ((x[:, i] - x[:, j]).pow(2).sum(-1) + 1e-12).sqrt()
    return f


def radius_of_gyration(x, t=None):
    c = x - x.mean(dim=1, keepdim=True)
    return (c.pow(2).sum(-1).mean(-1) + 1e-12).sqrt()


def parse_property(spec: str) -> Callable:
    """'distance:i,j', 'rg' or 'module:function' (a function of (positions, t))."""
    if spec == "rg":
        return radius_of_gyration
    if spec.startswith("distance:"):
        i, j = (int(v) for v in spec.split(":", 1)[1].split(","))
        return pair_distance(i, j)
    if ":" in spec:
        import importlib

        module, name = spec.split(":", 1)
        return getattr(importlib.import_module(module), name)
    raise ValueError(f"unknown property {spec!r}: use rg, distance:i,j or module:function")
