"""PIDP: physics-informed diffusion pre-training from the energy alone (DESIGN.md §1).

The score s_t = grad log p_t of the forward process dx = f(t) x dt + g(t) dW obeys the
Fokker-Planck equation, written for the score:

    d/dt s = grad( -f x.s + 1/2 g^2 (|s|^2 + div s) )       (VP: 1/2 beta grad(x.s + |s|^2 + div s))

and at t = 0 it is the Boltzmann force -grad E / kT. PIDP fits a network to both at points
made by pushing low-energy candidate structures (not equilibrium samples) through the forward
process. Everything lives on the zero-centre-of-mass subspace: gradients are projected and the
divergence runs over an orthonormal basis of the subspace (exact) or over projected
Rademacher probes (Hutchinson), differentiated twice by autograd so the loss trains the
weights. d/dt s is exact too: autodiff in t (see time_derivative).

Residual scale: for data of unit variance both sides of the equation are O(g^2 |s|) with
|s| ~ 1 / sqrt(sigma^2 + alpha^2 v); the loss weighs each residual by sqrt(sigma^2 + c^2) / g^2
with c = pidp_floor (the data's finest length scale in normalised units), O(1) at every t.
A weight that falls like sigma^3 near t = 0 lets the network pass from the force at t_min to
s = 0 (which solves the equation at every t) in a thin, unpenalised layer; the floor and an
anchor at t_max, where the forward process has forgotten the data and s = -x / sigma^2 (the
prior's score), rule that out.
"""
from __future__ import annotations

import torch

from digfast.likelihood import helmert_basis
from digfast.ops.sampler_step import remove_com


def subspace_basis(n_atoms: int, dim: int, dtype=torch.float64) -> torch.Tensor:
    """(D', N, d) orthonormal basis of the zero-CoM subspace, D' = (N - 1) d."""
    h = helmert_basis(n_atoms, dtype)  # (N - 1, N) orthonormal rows orthogonal to the ones vector
    eye = torch.eye(dim, dtype=dtype)
    return (h[:, None, :, None] * eye[None, :, None, :]).reshape(-1, n_atoms, dim)


def rademacher_subspace_probes(k: int, b: int, n_atoms: int, dim: int, generator, dtype=torch.float64):
    """(k, b, N, d) projected Rademacher probes: E[e e^T] is the subspace projector."""
    z = torch.randint(0, 2, (k, b, n_atoms, dim), generator=generator).to(dtype) * 2 - 1
    return remove_com(z.reshape(k * b, n_atoms, dim)).reshape(k, b, n_atoms, dim)


def fokker_planck_residual(score, schedule, x: torch.Tensor, t: torch.Tensor, *, probes: torch.Tensor | None = None,
                           create_graph: bool = True):
    """(residual (B, N, d), s (B, N, d)) of the score equation at (x, t).

    score(x, t) -> (B, N, d) must be differentiable in x and t. probes: (K, B, N, d) divergence
    directions, K probe estimates averaged (Hutchinson); None: the exact divergence over the
    subspace basis."""
    b, n, d = x.shape
    exact = probes is None
    if exact:
        basis = subspace_basis(n, d, x.dtype).to(x.device)
        probes = basis[:, None].expand(-1, b, -1, -1)
    k = probes.shape[0]
    x = x.detach().requires_grad_(True)
    tt = t.detach().to(x.dtype).requires_grad_(True)
    # one evaluation on k copies: the first copy is s itself, the rest carry the probes
    xk = x.repeat(k, 1, 1)
    sk = remove_com(score(xk, tt.repeat(k)))
    s = sk[:b]
    ds_dt = time_derivative(s, tt)
    e = probes.reshape(k * b, n, d).to(x.dtype)
    (jac_e,) = torch.autograd.grad((sk * e).sum(), xk, create_graph=True)
    per_probe = (jac_e * e).sum((1, 2)).reshape(k, b)
    div = per_probe.sum(0) if exact else per_probe.mean(0)
    f = schedule.drift_coef(tt.double()).to(x.dtype)
    g2 = schedule.diffusion2(tt.double()).to(x.dtype)
    u = -f * (x * s).sum((1, 2)) + 0.5 * g2 * (s.pow(2).sum((1, 2)) + div)
    (grad_u,) = torch.autograd.grad(u.sum(), x, create_graph=create_graph)
    return remove_com(grad_u) - ds_dt, s


def time_derivative(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d s_b / d t_b for every sample b (s_b depends on its own t_b only), as a graph that
    training can differentiate: the JVP as the derivative of a VJP in its cotangent w, two
    reverse passes instead of forward mode (torch's forward-mode softmax rule breaks the
    reverse pass taken through it)."""
    w = torch.zeros_like(s, requires_grad=True)
    (vjp,) = torch.autograd.grad(s, t, grad_outputs=w, create_graph=True, allow_unused=True)
    if vjp is None:  # the score does not depend on t
        return torch.zeros_like(s)
    (jvp,) = torch.autograd.grad(vjp, w, grad_outputs=torch.ones_like(vjp), create_graph=True)
    return jvp


def residual_weight(schedule, t: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """sqrt(sigma^2 + floor^2) / g^2: the residual O(1) at every t (see the module docstring)."""
    t = t.double()
    return torch.sqrt(schedule.sigma(t) ** 2 + floor**2) / schedule.diffusion2(t)


def network_score(model, net=None):
    """score(x, t) of a ScoreModel (or of `net`, e.g. its EMA copy, in its place) in the
    model's normalised coordinates, differentiable in x and t."""
    return lambda x, t: model.score(x, t, net=net)


def force_match(score, schedule, x0: torch.Tensor, eps: torch.Tensor, forces: torch.Tensor, t_min: float):
    """(B,) |s(x, t_min) - F|^2 / mean |F|^2 at x = alpha x0 + sigma eps, F the Boltzmann force of x0
    (normalised units): at t -> 0 the score is the force."""
    t = torch.full((x0.shape[0],), t_min, dtype=x0.dtype, device=x0.device)
    alpha, sigma = float(schedule.alpha(t_min)), float(schedule.sigma(t_min))
    s = remove_com(score(alpha * x0 + sigma * eps, t))
    f = remove_com(forces)
    # relative to the batch's mean squared force: O(1) like the weighted residual, whatever
    # the energy's scale
    return (s - f).pow(2).sum((1, 2)) / f.pow(2).sum((1, 2)).mean().clamp_min(1e-12)


def pidp_loss(model, net, x0, t, eps, forces, cfg, generator) -> torch.Tensor:
    """The PIDP objective on a batch of candidates x0 (normalised units): weighted Fokker-
    Planck residual at x_t = alpha_t x0 + sigma_t eps, plus pidp_force_weight times the force
    match at t_min when the candidates' forces are given (training, not validation), plus
    pidp_mc_weight times the match to the Monte-Carlo score at x_t (monte_carlo_score)."""
    sched = model.schedule
    score = network_score(model, net)
    tt = t.double()
    alpha, sigma = sched.alpha(tt).to(x0.dtype), sched.sigma(tt).to(x0.dtype)
    xt = alpha[:, None, None] * x0 + sigma[:, None, None] * eps
    b, n, d = x0.shape
    loss, s = x0.new_zeros(()), None
    if cfg.pidp_residual_weight > 0:
        probes = None
        if cfg.pidp_probes > 0:
            probes = rademacher_subspace_probes(cfg.pidp_probes, b, n, d, generator, x0.dtype).to(x0.device)
        residual, s = fokker_planck_residual(score, sched, xt, t, probes=probes)
        w = residual_weight(sched, tt, cfg.pidp_floor).to(x0.dtype)
        loss = cfg.pidp_residual_weight * (w[:, None, None] * residual).pow(2).sum((1, 2)).mean() / ((n - 1) * d)
    if cfg.pidp_mc_weight > 0:
        if s is None:
            s = remove_com(score(xt, t))
        target = monte_carlo_score(model.system.energy, xt, alpha, sigma, cfg.pidp_mc_samples, generator,
                                   model.position_scale, cfg.pidp_floor).to(s.dtype)
        # in noise units, sigma (s - target): O(1) at every t, like the DSM loss
        mc = (sigma[:, None, None] * (s - target)).pow(2).sum((1, 2)).mean() / ((n - 1) * d)
        loss = loss + cfg.pidp_mc_weight * mc
    if forces is not None and cfg.pidp_force_weight > 0:
        loss = loss + cfg.pidp_force_weight * force_match(score, sched, x0, eps, forces, cfg.t_min).mean()
    if cfg.pidp_prior_weight > 0:
        loss = loss + cfg.pidp_prior_weight * prior_match(score, sched, x0, eps).mean()
    return loss


@torch.no_grad()
def monte_carlo_score(energy, xt: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, k: int, generator,
                      scale: float = 1.0, crossover: float = 0.1) -> torch.Tensor:
    """(B, N, d) estimate of the noised score grad log p_t(x_t) from the energy alone.

    The posterior of x0 given x_t is exp(-E(x0)) N(x_t; alpha x0, sigma^2). Proposals come from
    the posterior of a unit Gaussian in place of exp(-E) (the data are normalised to unit
    variance): x0 = m + sqrt(c) z, m = alpha x_t / (alpha^2 + sigma^2), c = sigma^2 / (alpha^2 +
    sigma^2), k antithetic pairs +-z on the zero-CoM subspace; their self-normalised weights are
    exp(-E(x0) + |x0|^2 / 2). Near t = 0 they sit around x_t / alpha; at large noise they cover
    the data, where proposals around x_t / alpha would never land. The weighted mean is then
    taken of either
        -(x_t - alpha x0) / sigma^2   (the noise form: exact as alpha -> 0)
        -grad E(x0) / alpha           (the force form: low variance as sigma / alpha -> 0)
    blended with 1 / (1 + (sigma / (alpha crossover))^2) on the force form: the same
    expectation, different variances.

    energy: the system's energy in kT of real coordinates (normalised x times `scale`);
    xt (B, N, d) normalised, alpha and sigma (B,). Non-finite energies weigh 0."""
    b, n, d = xt.shape
    z = remove_com(torch.randn((k * b, n, d), generator=generator, dtype=torch.float64)).reshape(k, b, n, d)
    z = torch.cat([z, -z]).to(xt.device)
    a = alpha.double()[:, None, None]
    sg = sigma.double()[:, None, None]
    x = remove_com(xt.double())
    total = a**2 + sg**2
    x0 = (a * x / total + (sg / total.sqrt()) * z).reshape(-1, n, d)
    with torch.enable_grad():
        xr = (x0 * scale).requires_grad_(True)
        u = energy(xr)
        (grad,) = torch.autograd.grad(u.sum(), xr)
    log_w = -u + 0.5 * x0.pow(2).sum((1, 2))
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -float("inf")))
    w = torch.softmax(log_w.reshape(2 * k, b), dim=0)
    used = (w > 0).reshape(-1, 1, 1)
    grad = torch.where(used, grad * scale, torch.zeros_like(grad)).reshape(2 * k, b, n, d)
    x0 = x0.reshape(2 * k, b, n, d)
    w = w[..., None, None]
    noise_form = -(x - a * (w * x0).sum(0)) / sg**2
    force_form = -(w * grad).sum(0) / a
    lam = 1.0 / (1.0 + (sg / (a * crossover)) ** 2)
    return remove_com(lam * force_form + (1 - lam) * noise_form)


def prior_match(score, schedule, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(B,) |sigma_T (s(x_T, T) + x_T / sigma_T^2)|^2 / D' at x_T = alpha_T x0 + sigma_T eps: at
    t_max the score is the prior's up to O(alpha_T) (VP: alpha_T ~ 0.007)."""
    t_max = schedule.t_max
    alpha, sigma = float(schedule.alpha(t_max)), float(schedule.sigma(t_max))
    x = alpha * x0 + sigma * eps
    s = remove_com(score(x, torch.full((x0.shape[0],), t_max, dtype=x0.dtype, device=x0.device)))
    dof = (x0.shape[1] - 1) * x0.shape[2]
    return (sigma * s + x / sigma).pow(2).sum((1, 2)) / dof
