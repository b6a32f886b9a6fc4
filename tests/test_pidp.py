"""PIDP: the Fokker-Planck residual, the force term, their derivatives, and a short run."""
import pytest
import torch

import digfast
from digfast.models import Graphormer3D, Graphormer3DConfig
from digfast.models.score_model import ScoreModel
from digfast.ops.sampler_step import remove_com
from digfast.schedules import GeometricVE, LinearVP
from digfast.systems import DoubleWell4
from digfast.training import TrainConfig, Trainer
from digfast.training.pidp import (force_match, fokker_planck_residual, monte_carlo_score, pidp_loss, prior_match,
                                   rademacher_subspace_probes, subspace_basis, time_derivative)


def _noised(mixture, schedule, n, g):
    t = 0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    x0, _ = mixture.sample(n, g)
    eps = remove_com(torch.randn(x0.shape, generator=g, dtype=torch.float64))
    return schedule.alpha(t)[:, None, None] * x0 + schedule.sigma(t)[:, None, None] * eps, t


@pytest.mark.parametrize("schedule", [LinearVP(), GeometricVE(0.01, 50.0)], ids=["vp", "ve"])
def test_residual_vanishes_for_the_exact_score_only(mixture, schedule, rng):
    exact = mixture.model(schedule)
    x, t = _noised(mixture, schedule, 24, rng)
    r, s = fokker_planck_residual(exact.score, schedule, x, t)
    scale = s.norm(dim=(1, 2)).mean()
    assert r.norm(dim=(1, 2)).max() < 1e-9 * scale
    wrong, _ = fokker_planck_residual(lambda x, t: 1.1 * exact.score(x, t), schedule, x, t)
    assert wrong.norm(dim=(1, 2)).min() > 1e-3 * scale
    # a score frozen at another time is a solution at no time but that one
    stale, _ = fokker_planck_residual(lambda x, t: exact.score(x, 0.5 * t), schedule, x, t)
    assert stale.norm(dim=(1, 2)).min() > 1e-3 * scale


def test_hutchinson_residual_is_unbiased(mixture, rng):
    schedule = LinearVP()
    x, t = _noised(mixture, schedule, 3, rng)
    # a score whose Jacobian is far from isotropic, so single probes are noisy
    weights = torch.randn(4, 3, generator=rng, dtype=torch.float64)

    def score(x, t):
        return mixture.model(schedule).score(x, t) + torch.tanh(x * weights) * t[:, None, None]

    exact, _ = fokker_planck_residual(score, schedule, x, t)
    k = 4000
    probes = rademacher_subspace_probes(k, 3, 4, 3, rng)
    single = torch.stack([fokker_planck_residual(score, schedule, x, t, probes=probes[i:i + 1])[0]
                          for i in range(0, 400)])
    assert (single - exact).abs().max() > 1e-3  # the single-probe estimate really is noisy
    many, _ = fokker_planck_residual(score, schedule, x, t, probes=probes)
    se = (single - exact).std(0) / k ** 0.5
    assert ((many - exact).abs() <= 4 * se + 1e-12).all()


def test_subspace_basis_is_orthonormal_and_centred():
    basis = subspace_basis(5, 3)
    flat = basis.reshape(len(basis), -1)
    assert basis.shape == (12, 5, 3)
    torch.testing.assert_close(flat @ flat.T, torch.eye(12, dtype=torch.float64))
    assert basis.sum(1).abs().max() < 1e-12


def test_time_derivative_matches_finite_differences(mixture, rng):
    schedule = LinearVP()
    x, t = _noised(mixture, schedule, 6, rng)
    score = mixture.model(schedule).score
    tt = t.clone().requires_grad_(True)
    ds = time_derivative(score(x, tt), tt)
    h = 1e-6
    fd = (score(x, t + h) - score(x, t - h)) / (2 * h)
    torch.testing.assert_close(ds, fd, rtol=1e-5, atol=1e-6)


def test_force_term_vanishes_for_the_boltzmann_score(rng):
    system, schedule = DoubleWell4(), LinearVP()
    x0 = system.reference_data()[:64].double()
    eps = remove_com(torch.randn(x0.shape, generator=rng, dtype=torch.float64))
    forces = system.force(x0)

    def boltzmann(x, t):
        return system.force(x)

    match = force_match(boltzmann, schedule, x0, eps, forces, 1e-5)
    assert match.mean() < 1e-4
    weak = force_match(lambda x, t: 0.5 * system.force(x), schedule, x0, eps, forces, 1e-5)
    assert weak.mean() > 0.2


def test_prior_anchor_holds_for_the_exact_score_only(mixture, rng):
    """s = 0 solves the Fokker-Planck equation too; the anchor at t_max is what excludes it."""
    schedule = LinearVP()
    exact = mixture.model(schedule)
    x0, _ = mixture.sample(256, rng)
    eps = remove_com(torch.randn(x0.shape, generator=rng, dtype=torch.float64))
    assert prior_match(exact.score, schedule, x0, eps).mean() < 1e-3
    assert prior_match(lambda x, t: 0 * x, schedule, x0, eps).mean() > 0.5
    zero, _ = fokker_planck_residual(lambda x, t: 0 * x, schedule, x0, 0.5 + 0 * eps[:, 0, 0])
    assert zero.abs().max() == 0


def _tiny(seed=0, dtype=torch.float32, prior=None):
    torch.manual_seed(seed)
    net = Graphormer3D(Graphormer3DConfig(layers=1, width=16, heads=2, ffn=16, gaussians=8)).to(dtype)
    return ScoreModel(net, LinearVP(), DoubleWell4(), position_scale=1.8, prior=prior)


@pytest.mark.parametrize("prior", [None, {"name": "boltzmann", "width": 0.15}], ids=["plain", "boltzmann-prior"])
def test_loss_gradient_matches_finite_differences(rng, prior):
    """The third-order autograd path (weights <- grad_x <- divergence) against central
    differences of the loss in one weight, float64; with the energy-built prior, the energy's
    own third derivatives enter the residual too (t small enough that its gate is open)."""
    model = _tiny(dtype=torch.float64, prior=prior)
    x0 = DoubleWell4().reference_data()[:6].double() / 1.8
    t = (0.005 + 0.03 * torch.rand(6, generator=rng, dtype=torch.float64) if prior
         else 0.1 + 0.8 * torch.rand(6, generator=rng, dtype=torch.float64))
    eps = remove_com(torch.randn(x0.shape, generator=rng, dtype=torch.float64))
    forces = DoubleWell4().force(x0 * 1.8) * 1.8
    cfg = TrainConfig(objective="pidp", pidp_probes=0)

    def loss():
        return pidp_loss(model, model.net, x0, t, eps, forces, cfg, None)

    weight = model.net.layers[0].ffn[0].weight
    model.net.zero_grad()
    loss().backward()
    analytic = weight.grad.clone()
    for idx in [(0, 0), (3, 5), (7, 2)]:
        h = 1e-6
        with torch.no_grad():
            weight[idx] += h
        up = float(loss())
        with torch.no_grad():
            weight[idx] -= 2 * h
        down = float(loss())
        with torch.no_grad():
            weight[idx] += h
        fd = (up - down) / (2 * h)
        assert abs(fd - float(analytic[idx])) <= 1e-5 * max(1.0, abs(fd)), (idx, fd, float(analytic[idx]))


def test_monte_carlo_score_matches_the_exact_noised_score(rng):
    """The energy-only estimate against the closed form of a two-mode mixture at every noise
    level; the same mixture with its weights swapped is far off at middle noise, so the
    tolerance tells the two apart."""
    from digfast.systems import GaussianMixture

    means = torch.tensor([[[-0.6, 0.0], [0.6, 0.0]], [[0.0, -0.9], [0.0, 0.9]]], dtype=torch.float64)
    mixture = GaussianMixture(means, [0.3, 0.4], [0.7, 0.3])
    swapped = GaussianMixture(means, [0.3, 0.4], [0.3, 0.7])
    schedule = LinearVP()
    t = torch.tensor([0.002, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64).repeat(3)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x0, _ = mixture.sample(len(t), rng)
    xt = alpha[:, None, None] * x0 + sigma[:, None, None] * remove_com(
        torch.randn(x0.shape, generator=rng, dtype=torch.float64))
    exact = mixture.score(xt, alpha, sigma)

    def relative(s):  # per noise level, pooled over its 3 points (one point alone can sit where s ~ 0)
        def per_level(v):
            return v.pow(2).sum((1, 2)).reshape(3, -1).sum(0).sqrt()
        return per_level(s - exact) / per_level(exact)

    # worst over 150 seeds: 0.041 for the estimate, at least 0.23 for the swapped mixture
    estimate = monte_carlo_score(mixture.energy, xt, alpha, sigma, 4096, rng)
    assert relative(estimate).max() < 0.08
    assert relative(swapped.score(xt, alpha, sigma)).max() > 0.15
    # the scale maps normalised coordinates to the energy's: the same estimate in other units
    scaled = monte_carlo_score(lambda x: mixture.energy(x / 2.0), xt, alpha, sigma, 4096, rng, scale=2.0)
    assert relative(scaled).max() < 0.08


@pytest.mark.parametrize("terms", ["residual", "monte_carlo"])
def test_short_pidp_run_lowers_the_loss(rng, terms):
    system = DoubleWell4()
    from digfast.training.candidates import low_energy_candidates

    cand, report = low_energy_candidates(system, 256, relax_steps=50, sweeps=20, chains=64)
    assert report.n == 256 and report.energy_evaluations > 0 and torch.isfinite(cand).all()
    model = _tiny(seed=2)
    # the Monte-Carlo term alone falls more slowly at first: a faster EMA shows it within the run
    weights = dict(pidp_residual_weight=0.0, pidp_mc_weight=1.0, pidp_mc_samples=64,
                   ema_decay=0.9) if terms == "monte_carlo" else {}
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=2, val_every=20, val_batches=2, seed=5,
                      objective="pidp", pidp_probes=1, **weights)
    trainer = Trainer(model, cand, cand[:64], cfg, forces=system.force(cand.double()).float())
    assert trainer.model.net.backend == trainer.ema.backend == "reference"  # kernels: once-differentiable
    before = trainer.validate()
    trainer.fit(progress=False)
    assert trainer.validate() < 0.95 * before
    with pytest.raises(ValueError, match="PIDP need forces"):
        Trainer(_tiny(), cand, None, cfg)


def test_cli_pidp_then_dsm(tmp_path, rng, capsys):
    import numpy as np

    from digfast.cli import main

    data = tmp_path / "few.npy"
    np.save(data, DoubleWell4().reference_data()[:50].numpy())
    code = main(["train", "--system", "dw4", "--pidp", "--pidp-steps", "2", "--candidates", "64", "--data",
                 str(data), "--steps", "2", "--batch-size", "8", "--out", str(tmp_path / "m"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "PIDP candidates" in out.out
    pre = digfast.load(str(tmp_path / "m" / "pidp"))
    assert pre.info["train_config"]["objective"] == "pidp" and "no samples" in pre.info["data"]
    tuned = digfast.load(str(tmp_path / "m"))
    assert tuned.info["init"] == str(tmp_path / "m" / "pidp") and tuned.info["train_config"]["objective"] == "dsm"
    assert main(["train", "--system", "alanine-dipeptide", "--pidp", "--out", str(tmp_path / "x")]) == 2
    # with the energy-built prior, the DSM stage goes on from the PIDP model and keeps its prior
    assert main(["train", "--system", "dw4", "--pidp", "--pidp-steps", "2", "--candidates", "64", "--data", str(data),
                 "--steps", "2", "--batch-size", "8", "--prior-width", "0.15", "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0, capsys.readouterr().err
    assert digfast.load(str(tmp_path / "p")).prior == digfast.load(str(tmp_path / "p" / "pidp")).prior is not None
    # the loss's terms from the command line, recorded in the model; refused without --pidp
    assert main(["train", "--system", "dw4", "--pidp", "--pidp-steps", "2", "--candidates", "64", "--mc-weight", "0.5",
                 "--mc-samples", "8", "--residual-weight", "0", "--out", str(tmp_path / "mc"), "--quiet"]) == 0
    cfg = digfast.load(str(tmp_path / "mc")).info["train_config"]
    assert (cfg["pidp_mc_weight"], cfg["pidp_mc_samples"], cfg["pidp_residual_weight"]) == (0.5, 8, 0.0)
    capsys.readouterr()
    assert main(["train", "--system", "dw4", "--mc-weight", "1", "--out", str(tmp_path / "y")]) == 2
    assert "add --pidp" in capsys.readouterr().err


def test_cli_pidp_trains_on_the_device_asked_for(tmp_path, monkeypatch):
    """--device reaches the PIDP stage too, not only the DSM one (a GPU run must not train on the CPU)."""
    from digfast.cli import main

    moved = []
    to = Trainer.to
    monkeypatch.setattr(Trainer, "to", lambda self, device: moved.append((self.cfg.objective, str(device))) or to(self, device))
    assert main(["train", "--system", "dw4", "--pidp", "--pidp-steps", "2", "--candidates", "64", "--device", "cpu",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert moved == [("pidp", "cpu")]
