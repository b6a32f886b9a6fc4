"""log p_0 along the probability-flow ODE, and the ODE map between data and latent.

    dx/dt = v(x, t) = f(t) x - 1/2 g(t)^2 s(x, t)
    log p_0(x_0) = log p_T(x_T) + int_0^T div v dt,  div v = D f(t) - 1/2 g(t)^2 div s

with D = d (n_atoms - 1) the dimension of the zero-CoM subspace. div s is exact (the trace of
the Jacobian over all n_atoms d coordinates) or Hutchinson's estimate with K Rademacher probes;
the probes stay fixed along the path so the integrand is smooth.

Two ways to get Jacobian-vector products:
  forward mode ("exact-forward", "hutchinson-forward"): one primal evaluation of the score and
    all tangents (the K probes, or the n_atoms d coordinate directions) pushed through it at
    once, torch.func.jvp under torch.func.vmap; nothing is kept for a backward pass;
  reverse mode ("exact", "hutchinson"; the reference): one backward pass per coordinate of
    one primal, or the primal repeated K times along the batch and one backward pass.
"auto" takes forward-mode exact up to AUTO_EXACT_MAX_COORDS coordinates, forward-mode
Hutchinson above, and the reverse-mode twin if the score function has no forward mode.
Integration is fixed-step (euler, heun, rk4) or adaptive Dormand-Prince 5(4) with a step size
per structure: each structure's path, and so its log p, does not depend on the others in its
batch, and a stiff one does not slow the rest (each step evaluates the structures still short
of the end only).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from digfast.ops.philox import STREAM_PROBE, philox_normal
from digfast.ops.sampler_step import remove_com
from digfast.schedules import Schedule

ScoreFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
log = logging.getLogger("digfast")

DIVERGENCES = ("auto", "exact", "hutchinson", "exact-forward", "hutchinson-forward")
# "auto": exact while it is the cheaper way to a usable log p. bench/bench_divergence.py (4 x 64
# Graphormer-3D, batch 16, one CPU thread): exact-forward costs about 0.7 (coords / 8) times
# Hutchinson with K = 8 (1.25x at 12 coordinates, 5.7x at 66). But K = 8 leaves log p of the
# shipped models scattered by ~6 nats (LJ-13, 39 coordinates) and ~100 nats (alanine dipeptide,
# 66) between probe draws (bench/RESULTS.md); reaching ~1 nat takes hundreds of probes, more
# than the exact trace. So exact up to 192 coordinates (64 atoms in 3-D, ~17x the cost of
# Hutchinson-8), Hutchinson for larger systems, where exact grows as n_atoms.
AUTO_EXACT_MAX_COORDS = 192
# tangents x structures x atom pairs pushed through the network at once: bounds the memory of
# forward-mode exact (a Graphormer keeps ~K Gaussians + H heads floats per pair and tangent)
FORWARD_PAIR_BUDGET = 1 << 21


@dataclass
class LikelihoodResult:
    log_prob: torch.Tensor  # (B,) log p_0 on the zero-CoM subspace
    latent: torch.Tensor    # (B, N, d) x_T, the point the ODE maps x_0 to
    prior_log_prob: torch.Tensor  # (B,) log p_T(x_T)
    n_evals: int            # score evaluations (batched calls) used
    positions: torch.Tensor | None = None  # (B, N, d) the samples, from sample_with_likelihood


def dof(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Degrees of freedom per structure: d (n_real - 1)."""
    n = torch.full((x.shape[0],), x.shape[1], device=x.device) if mask is None else mask.sum(1)
    return (x.shape[2] * (n - 1)).to(x.dtype)


def gaussian_prior_log_prob(x: torch.Tensor, std: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log N(x; 0, std^2 I) on the zero-CoM subspace."""
    d = dof(x, mask)
    return -0.5 * d * math.log(2 * math.pi * std**2) - 0.5 * x.pow(2).sum(dim=(1, 2)) / std**2


class _Drift:
    """The ODE right-hand side for (x, log-density increment), with its divergence."""

    def __init__(self, score_fn, schedule, mask, divergence, probes, fallback=None):
        self.score_fn, self.schedule, self.mask = score_fn, schedule, mask
        self.divergence, self.probes = divergence, probes
        self.fallback = fallback  # reverse-mode twin if the first forward-mode call fails
        self.n_evals = 0

    # Every method takes t as a number (all structures at one time) or a (b,) tensor (each its
    # own), and rows: None (the whole batch) or the batch rows x holds (adaptive steps advance
    # a subset), which picks their mask and probes.

    def _score(self, x, t, rows=None):
        self.n_evals += 1
        tt = _times_of(t, x.shape[0], x)
        mask = self._mask_for(x, rows)
        return remove_com(self.score_fn(x, tt, mask).to(x.dtype), mask)

    def _mask_for(self, x, rows=None):
        mask = self.mask if self.mask is None or rows is None else self.mask[rows]
        if mask is None or x.shape[0] == mask.shape[0]:
            return mask
        return mask.repeat(x.shape[0] // mask.shape[0], 1)

    def _coefficients(self, x, t):
        """f(t), g(t)^2 as (b,) tensors."""
        tt = _times_of(t, x.shape[0], x).double()
        return (self.schedule.drift_coef(tt).to(x.dtype), self.schedule.diffusion2(tt).to(x.dtype))

    def velocity(self, x, t, rows=None):
        f, g2 = self._coefficients(x, t)
        return f[:, None, None] * x - 0.5 * g2[:, None, None] * self._score(x, t, rows)

    def __call__(self, x, t, rows=None):
        """(dx/dt, d logdet/dt) at time t."""
        f, g2 = self._coefficients(x, t)
        s, div = self.divergence_at(x, t, rows)
        v = f[:, None, None] * x - 0.5 * g2[:, None, None] * s.detach()
        return v, dof(x, self._mask_for(x, rows)) * f - 0.5 * g2 * div.detach()

    def divergence_at(self, x, t, rows=None):
        """(s, div s) at (x, t) by this drift's method."""
        if self.fallback is not None:  # "auto": forward mode unless the score function lacks it
            evals = self.n_evals
            try:
                out = self._by_method(x, t, rows)
            except (NotImplementedError, RuntimeError) as err:
                self.n_evals = evals  # the failed call is not an evaluation
                log.warning("digfast: the score function has no forward mode (%s: %s); "
                            "divergence by reverse mode (%s)", type(err).__name__,
                            str(err).splitlines()[0][:200], self.fallback)
                self.divergence = self.fallback
            self.fallback = None
            if self.divergence.endswith("forward"):
                return out
        return self._by_method(x, t, rows)

    def _probes_for(self, rows):
        return self.probes if rows is None else self.probes[:, rows]

    def _by_method(self, x, t, rows=None):
        if self.divergence == "exact-forward":
            return self._forward(x, t, coordinate_directions(x), rows)
        if self.divergence == "hutchinson-forward":
            return self._forward(x, t, self._probes_for(rows), rows)
        with torch.enable_grad():
            if self.divergence == "exact":
                return self._exact(x, t, rows)
            return self._hutchinson(x, t, rows)

    def _forward(self, x, t, tangents, rows=None):
        """Forward mode: s(x) and sum over tangents v of v . (J v), averaged over the K probes
        or summed over the coordinate directions (whose v . J v are the diagonal entries)."""
        x = x.detach()
        count = tangents.shape[0]
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        s = None
        step = max(1, FORWARD_PAIR_BUDGET // (x.shape[0] * x.shape[1] ** 2))
        for lo in range(0, count, step):
            chunk = tangents[lo:lo + step]
            s, jv = self.jvps(x, t, chunk, rows)
            total = total + (chunk * jv).sum(dim=(0, 2, 3))
        exact = self.divergence == "exact-forward"
        return s, total if exact else total / count

    def jvps(self, x, t, tangents, rows=None):
        """s(x) (B, N, d) and J v for each v of tangents (T, B, N, d): one primal evaluation,
        the T tangents batched through it by vmap."""
        with torch.enable_grad():  # forward AD needs grad mode on (the ODE runs in no_grad)
            def one(v):
                return torch.func.jvp(lambda y: self._score(y, t, rows), (x,), (v,))
            return torch.func.vmap(one, out_dims=(None, 0))(tangents)

    def _exact(self, x, t, rows=None):
        x = x.detach().requires_grad_(True)
        s = self._score(x, t, rows)
        flat = s.reshape(x.shape[0], -1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for j in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=j + 1 < flat.shape[1])
            div = div + g.reshape(x.shape[0], -1)[:, j]
        return s, div

    def _hutchinson(self, x, t, rows=None):
        probes = self._probes_for(rows)
        k, b = probes.shape[0], x.shape[0]
        xk = x.detach().repeat(k, 1, 1).requires_grad_(True)  # probe-major: row p*B + i
        eps = probes.reshape(k * b, *x.shape[1:])
        s = self._score(xk, t, rows)
        (g,) = torch.autograd.grad((s * eps).sum(), xk)
        div = (g * eps).sum(dim=(1, 2)).reshape(k, b).mean(0)
        return s[:b], div


def _times_of(t, n: int, like: torch.Tensor) -> torch.Tensor:
    """(n,) times in like's dtype from a number or a (b,) tensor (repeated to n rows: the
    probe-major batches of Hutchinson stack the b structures n / b times)."""
    if torch.is_tensor(t) and t.dim() == 1:
        return t.to(dtype=like.dtype, device=like.device).repeat(n // t.shape[0])
    return torch.full((n,), float(t), dtype=like.dtype, device=like.device)


def coordinate_directions(x: torch.Tensor) -> torch.Tensor:
    """(N d, B, N, d): the unit vector of each coordinate, the same for every structure (the
    structures do not interact, so (J e_c)_c of each is its Jacobian's diagonal entry c)."""
    b, n, d = x.shape
    eye = torch.eye(n * d, dtype=x.dtype, device=x.device).reshape(n * d, 1, n, d)
    return eye.expand(n * d, b, n, d)


def resolve_divergence(divergence: str, n_coords: int, device=None) -> str:
    """The method that "auto" stands for with n_coords = n_atoms d coordinates; others as given.

    Forward mode on a GPU (the fused kernels carry the tangents), reverse mode on the CPU,
    where eager forward mode measured 1.4-2.1x slower (bench/bench_divergence.py, RESULTS.md)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence != "auto":
        return divergence
    method = "exact" if n_coords <= AUTO_EXACT_MAX_COORDS else "hutchinson"
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return f"{method}-forward" if on_gpu else method


def helmert_basis(n: int, dtype=torch.float64) -> torch.Tensor:
    """(n - 1, n) orthonormal rows spanning the vectors over n atoms that sum to zero."""
    h = torch.zeros(max(n - 1, 0), n, dtype=dtype)
    for k in range(1, n):
        h[k - 1, :k] = 1.0
        h[k - 1, k] = -float(k)
        h[k - 1] /= math.sqrt(k * (k + 1))
    return h


def rademacher_probes(k: int, seed: int, sample_ids: torch.Tensor, shape, mask=None, dtype=torch.float32):
    """(K, B, N, d) probes: Rademacher coordinates in an orthonormal basis of each structure's
    zero-CoM subspace (Helmert basis over its real atoms), keyed by (seed, sample id, probe).

    E[eps eps^T] is the projector P, so eps^T J eps is unbiased for tr J when J = P J P (as for
    a projected score), and exact for J proportional to P, which ambient probes are not.
    """
    n_atoms, dim = shape
    b = len(sample_ids)
    signs = torch.stack([torch.sign(philox_normal(seed, sample_ids, p, STREAM_PROBE, n_atoms * dim))
                         for p in range(k)]).reshape(k, b, n_atoms, dim).to(torch.float64)
    signs[signs == 0] = 1.0
    n_real = torch.full((b,), n_atoms) if mask is None else mask.sum(1).cpu()
    probes = torch.zeros(k, b, n_atoms, dim, dtype=torch.float64)
    for n in n_real.unique().tolist():
        rows = (n_real == n).nonzero().flatten()
        basis = helmert_basis(n)  # (n - 1, n)
        sub = signs[:, rows, : n - 1]  # (K, b_n, n - 1, d) coordinates in the basis
        atoms = torch.einsum("ka,pbkd->pbad", basis, sub)  # (K, b_n, n, d)
        if mask is None:
            probes[:, rows] = atoms
        else:
            real = mask.cpu()[rows]
            block = torch.zeros(k, len(rows), n_atoms, dim, dtype=torch.float64)
            block[:, real] = atoms.reshape(k, -1, dim)
            probes[:, rows] = block
    return probes.to(dtype=dtype, device=sample_ids.device)


# Butcher tableaux: (c, A, b) for explicit fixed-step methods
_TABLEAUX = {
    "euler": ([0.0], [[]], [1.0]),
    "heun": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    "rk4": ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}

# Dormand-Prince 5(4): nodes, stage matrix, 5th-order weights, 4th-order weights
_DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_DP_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
         [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
         [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
         [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_DP_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_DP_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]


def _rk_stages(rhs, y, t, h, c, A):
    """Stage derivatives of an explicit RK step on the state tuple y (t, h: numbers or (b,))."""
    ks = []
    for ci, row in zip(c, A):
        yi = tuple(yj + _per_row(h, yj) * sum(a * k[j] for a, k in zip(row, ks)) if row else yj
                   for j, yj in enumerate(y))
        ks.append(rhs(yi, t + ci * h))
    return ks


def _combine(y, h, ks, weights):
    return tuple(yj + _per_row(h, yj) * sum(w * k[j] for w, k in zip(weights, ks) if w) for j, yj in enumerate(y))


def _per_row(h, like: torch.Tensor):
    """A step size broadcast over like's rows: a number as is, a (b,) tensor as (b, 1, ...)."""
    if not torch.is_tensor(h):
        return h
    return h.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def integrate(rhs, y, t0: float, t1: float, *, method: str = "rk4", steps: int = 100,
              rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 100_000, relative=None, times=None):
    """Integrate dy/dt = rhs(y, t, rows) for a tuple of tensors y (batch first) from t0 to t1
    (either direction). Fixed-step methods call rhs with a number t and rows None, and take
    `steps` equal steps or the steps between the given `times` (t0 ... t1); dopri5 calls it
    with a (b,) tensor t, each row's own, and the indices of the rows y holds. relative: per
    tensor of y, whether dopri5's tolerance is atol + rtol |y| (default) or atol alone."""
    if method in _TABLEAUX:
        c, A, b = _TABLEAUX[method]
        ts = times.tolist() if times is not None else [t0 + k * (t1 - t0) / steps for k in range(steps + 1)]
        for ta, tb in zip(ts[:-1], ts[1:]):
            y = _combine(y, tb - ta, _rk_stages(lambda yi, ti: rhs(yi, ti, None), y, ta, tb - ta, c, A), b)
        return y
    if method != "dopri5":
        raise ValueError(f"unknown method {method!r}; known: {sorted(_TABLEAUX) + ['dopri5']}")
    return _dopri5(rhs, y, t0, t1, rtol, atol, max_steps, relative or (True,) * len(y))


def _dopri5(rhs, y, t0: float, t1: float, rtol: float, atol: float, max_steps: int, relative):
    """Dormand-Prince 5(4), a time and step size per row: a row's error alone decides its steps."""
    b, device = y[0].shape[0], y[0].device
    direction = 1.0 if t1 > t0 else -1.0
    t = torch.full((b,), float(t0), dtype=torch.float64, device=device)
    h = torch.full((b,), (t1 - t0) / 100, dtype=torch.float64, device=device)
    y = tuple(v.clone() for v in y)
    for _ in range(max_steps):
        rows = ((t1 - t) * direction > 1e-12).nonzero().flatten()
        if len(rows) == 0:
            return y
        tr = t[rows]
        hr = direction * torch.minimum(h[rows].abs(), (t1 - tr).abs())
        yr = tuple(v[rows] for v in y)
        ks = _rk_stages(lambda yi, ti: rhs(yi, ti, rows), yr, tr, hr, _DP_C, _DP_A)
        y5, y4 = _combine(yr, hr, ks, _DP_B5), _combine(yr, hr, ks, _DP_B4)
        # error norm: RMS over each row's entries, the worst of the state's tensors
        err = torch.stack([((a - b_) / (atol + rel * rtol * torch.maximum(a.abs(), y0.abs()))).pow(2)
                           .reshape(a.shape[0], -1).mean(1).sqrt().double()
                           for a, b_, y0, rel in zip(y5, y4, yr, relative) if a[0].numel()]).amax(0)
        ok = err <= 1.0
        t[rows[ok]] = (tr + hr)[ok]
        for v, new in zip(y, y5):
            v[rows[ok]] = new[ok]
        h[rows] = hr * (0.9 * err.clamp(min=1e-10) ** -0.2).clamp(0.2, 5.0)
    raise RuntimeError(f"dopri5 did not reach t={t1} in {max_steps} steps (at t={float(t.min())}..{float(t.max())})")


def _check(x, mask):
    if x.dim() != 3:
        raise ValueError(f"positions must be (batch, atoms, dim), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"positions contain NaN or inf (structures {bad[:10]})")
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be {tuple(x.shape[:2])}, got {tuple(mask.shape)}")


def _flow_with_log_det(score_fn, schedule, x, t_from: float, t_to: float, mask, divergence, probes, seed,
                       sample_ids, method, steps, rtol, atol, times=None):
    """Carry x (zero CoM) along the probability-flow ODE from t_from to t_to, and int div v dt
    along the same path (negative when t_to < t_from)."""
    chosen = resolve_divergence(divergence, x.shape[1] * x.shape[2], x.device)
    eps = None
    if chosen.startswith("hutchinson"):
        if probes < 1:
            raise ValueError(f"probes must be >= 1, got {probes}")
        ids = torch.arange(x.shape[0], device=x.device) if sample_ids is None else sample_ids
        eps = rademacher_probes(probes, seed, ids, x.shape[1:], mask, x.dtype)
    fallback = chosen.removesuffix("-forward") if divergence == "auto" and chosen.endswith("-forward") else None
    drift = _Drift(score_fn, schedule, mask, chosen, eps, fallback)
    acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    # log p's error counts in nats whatever its size (a weight is exp(log p)): atol alone
    x_end, acc = integrate(lambda y, t, rows: drift(y[0], t, rows), (x, acc), t_from, t_to,
                           method=method, steps=steps, rtol=rtol, atol=atol, relative=(True, False), times=times)
    return x_end, acc, drift.n_evals


def log_likelihood(score_fn: ScoreFn, schedule: Schedule, x0: torch.Tensor, *, mask=None,
                   divergence: str = "auto", probes: int = 8, seed: int = 0, sample_ids=None,
                   method: str = "rk4", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
                   t_min: float = 0.0, prior_log_prob: Callable | None = None) -> LikelihoodResult:
    """log p_0(x0) per structure under the model's probability-flow ODE.

    divergence: one of DIVERGENCES (see the module doc); "auto" picks by the number of
    coordinates. prior_log_prob(x_T) defaults to the schedule's Gaussian prior; pass the exact
    marginal at t_max to measure the integration error alone.
    """
    _check(x0, mask)
    xT, acc, n_evals = _flow_with_log_det(score_fn, schedule, remove_com(x0, mask), t_min, schedule.t_max, mask,
                                          divergence, probes, seed, sample_ids, method, steps, rtol, atol)
    prior = (prior_log_prob(xT) if prior_log_prob is not None
             else gaussian_prior_log_prob(xT, schedule.prior_std, mask))
    return LikelihoodResult(log_prob=prior + acc, latent=xT, prior_log_prob=prior, n_evals=n_evals)


def decode_log_likelihood(score_fn: ScoreFn, schedule: Schedule, z: torch.Tensor, *, mask=None,
                          divergence: str = "auto", probes: int = 8, seed: int = 0, sample_ids=None,
                          method: str = "rk4", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
                          t_min: float = 0.0, times=None) -> tuple[torch.Tensor, LikelihoodResult]:
    """Decode prior draws z (t_max -> t_min) and the log density of the structures they land on.

    log q(x_0) = log p_T(z) - int_{t_min}^{t_max} div v dt along the decoding path itself. An
    importance weight needs the density of the samples as drawn; integrating back from x_0
    (log_likelihood) can leave a stiff path elsewhere and put its log p tens of nats off.
    times: the fixed-step grid (t_max ... t_min), uniform when None. Returns (x_0, result)
    with result.latent = z.
    """
    _check(z, mask)
    z = remove_com(z, mask)
    x0, acc, n_evals = _flow_with_log_det(score_fn, schedule, z, schedule.t_max, t_min, mask,
                                          divergence, probes, seed, sample_ids, method, steps, rtol, atol, times)
    prior = gaussian_prior_log_prob(z, schedule.prior_std, mask)
    return x0, LikelihoodResult(log_prob=prior - acc, latent=z, prior_log_prob=prior, n_evals=n_evals)


def ode_map(score_fn: ScoreFn, schedule: Schedule, x: torch.Tensor, t_from: float, t_to: float, *,
            mask=None, method: str = "rk4", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5):
    """Carry x along the probability-flow ODE from t_from to t_to (encode: 0 -> T, decode: T -> 0)."""
    _check(x, mask)
    drift = _Drift(score_fn, schedule, mask, "exact", None)
    with torch.no_grad():
        (out,) = integrate(lambda y, t, rows: (drift.velocity(y[0], t, rows),), (remove_com(x, mask),), t_from, t_to,
                           method=method, steps=steps, rtol=rtol, atol=atol)
    return out
