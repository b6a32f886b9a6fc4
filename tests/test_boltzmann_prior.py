"""The energy-built score that models with prior "boltzmann" correct (models/boltzmann_prior.py)."""
import pytest
import torch

from digfast.io import InputError
from digfast.models import Graphormer3D, Graphormer3DConfig
from digfast.models.boltzmann_prior import base_noise, capped
from digfast.models.score_model import ScoreModel
from digfast.ops.sampler_step import remove_com
from digfast.schedules import LinearVP
from digfast.systems import DoubleWell4, LennardJones13
from digfast.training.pidp import fokker_planck_residual, network_score, time_derivative

SCALE = 1.8


def _model(system=None, width=0.15, dtype=torch.float64, zero_head=True, cap=100.0, onset=0.0):
    torch.manual_seed(0)
    net = Graphormer3D(Graphormer3DConfig(layers=1, width=16, heads=2, ffn=16, gaussians=8)).to(dtype)
    if zero_head:
        torch.nn.init.zeros_(net.head_out.weight)
    return ScoreModel(net, LinearVP(), system or DoubleWell4(), position_scale=SCALE,
                      prior={"name": "boltzmann", "width": width, "cap": cap, "onset": onset})


def _structures(system, n, rng):
    """Reference structures, lightly jittered, in normalised units (float64)."""
    x = system.reference_samples(n, seed=int(torch.randint(0, 2**31, (1,), generator=rng)))
    x = x.double() + 0.02 * torch.randn(x.shape, generator=rng, dtype=torch.float64)
    return remove_com(x) / SCALE


def _score(model, x, t):
    return model.score(x, torch.full((len(x),), t, dtype=torch.float64))


@pytest.mark.parametrize("system", [DoubleWell4(), LennardJones13()], ids=["dw4", "lj13"])
def test_score_is_the_boltzmann_force_at_t_0(system, rng):
    model = _model(system, width=0.1, cap=1e6)  # the cap: test_cap_bends_only_large_scores
    x = _structures(system, 5, rng)
    force = remove_com(SCALE * system.force(SCALE * x))  # grad_x log p in normalised units
    s = _score(model, x, 1e-7)
    torch.testing.assert_close(s, force, rtol=1e-3, atol=1e-3 * float(force.abs().max()))


def test_onset_holds_the_force_at_t_0_whatever_the_weights(rng):
    x = _structures(DoubleWell4(), 5, rng)
    force = remove_com(SCALE * DoubleWell4().force(SCALE * x))
    held = _score(_model(zero_head=False, cap=1e6, onset=0.15), x, 1e-7)
    torch.testing.assert_close(held, force, rtol=1e-3, atol=1e-3 * float(force.abs().max()))
    free = _score(_model(zero_head=False, cap=1e6), x, 1e-7)  # without: the network's -eps / sigma
    assert (free - force).norm() > 10 * force.norm()


def test_score_is_the_priors_at_t_max(rng):
    model = _model()
    x = torch.randn(6, 4, 2, generator=rng, dtype=torch.float64)
    sched = model.schedule
    a, s = sched.alpha(sched.t_max), sched.sigma(sched.t_max)
    torch.testing.assert_close(_score(model, x, sched.t_max), -remove_com(x) / (a**2 + s**2))


def test_gate_switches_the_energy_off_between(rng):
    """Half way between, both terms count: the score is neither the force nor the prior's."""
    model = _model()
    x = _structures(DoubleWell4(), 4, rng)
    t = float(model.schedule.t_of_log_snr(torch.tensor(2.0)))  # sigma / alpha ~ 0.14 ~ width
    s = _score(model, x, t)
    sched = model.schedule
    prior = -remove_com(x) / (sched.alpha(t) ** 2 + sched.sigma(t) ** 2)
    assert (s - prior).norm() > 0.1 * prior.norm()


def test_cap_bends_only_large_scores(rng):
    v = torch.randn(3, 5, 3, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(capped(v, 1e6), v, rtol=1e-10, atol=0)
    half = v / v.norm(dim=-1, keepdim=True) * 5.0  # |v| = cap / 2
    torch.testing.assert_close(capped(half, 10.0), half, rtol=1e-3, atol=0)
    big = 1e8 * v
    assert capped(big, 10.0).norm(dim=-1).max() <= 10.0 + 1e-9
    # direction kept
    cos = (capped(big, 10.0) * big).sum(-1) / (capped(big, 10.0).norm(dim=-1) * big.norm(dim=-1))
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_cap_survives_clashes_in_float32(rng):
    """An LJ clash gives forces far past cap^2 (r^-13): the capped value must be ~cap with a
    finite gradient, not 0 and NaN (what overflowing (|v|/cap)^8 in float32 gave)."""
    direction = torch.nn.functional.normalize(torch.randn(4, 2, 3, generator=rng), dim=-1)
    for size in (1e3, 1e9, 1e25):
        v = (size * direction).requires_grad_(True)
        out = capped(v, 100.0)
        out.sum().backward()
        torch.testing.assert_close(out.norm(dim=-1), torch.full((4, 2), 100.0), rtol=1e-4, atol=0)
        assert torch.isfinite(v.grad).all()
    zero = torch.zeros(1, 1, 3, requires_grad=True)
    capped(zero, 100.0).sum().backward()
    torch.testing.assert_close(zero.grad, torch.ones(1, 1, 3))


def test_cap_gradients_match_finite_differences(rng):
    """Both branches of the stable form (|v| below and above cap), to second order (PIDP)."""
    v = torch.randn(2, 3, 3, generator=rng, dtype=torch.float64) * torch.tensor([0.3, 1.0, 4.0],
                                                                                  dtype=torch.float64)[:, None]
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: capped(u, 2.0), (v,))
    assert torch.autograd.gradgradcheck(lambda u: capped(u, 2.0), (v,))


def test_score_is_differentiable_in_t_and_x(rng):
    """d/dt by autodiff (what PIDP trains on) against central differences, on the prior's share
    (the network's is test_pidp's)."""
    model = _model()
    x = _structures(DoubleWell4(), 3, rng)
    t0 = 0.02 + 0.05 * torch.rand(3, generator=rng, dtype=torch.float64)
    score = network_score(model)
    tt = t0.clone().requires_grad_(True)
    s = score(x, tt)
    analytic = time_derivative(s, tt)
    h = 1e-6
    numeric = (score(x, t0 + h) - score(x, t0 - h)) / (2 * h)
    torch.testing.assert_close(analytic.detach(), numeric, rtol=1e-6, atol=1e-8 * float(numeric.abs().max()))
    residual, _ = fokker_planck_residual(score, model.schedule, x, t0)
    assert torch.isfinite(residual).all() and residual.abs().max() > 0


def test_prior_round_trips_and_checks_its_input(tmp_path):
    model = _model(dtype=torch.float32)
    folder = model.save(tmp_path / "m")
    loaded = ScoreModel.load(folder)
    assert loaded.prior == model.prior
    x, t = torch.randn(4, 4, 2), torch.full((4,), 0.01)
    torch.testing.assert_close(loaded.score(x, t), model.score(x, t))
    with pytest.raises(ValueError, match="width"):
        _model(width=-1.0)
    net = Graphormer3D(Graphormer3DConfig(layers=1, width=16, heads=2, ffn=16, gaussians=8, n_atom_types=4))
    class OutsideEnergy(DoubleWell4):  # e.g. a user's system whose energy comes from another engine
        torch_energy = False

    with pytest.raises(ValueError, match="torch"):
        ScoreModel(net, LinearVP(), OutsideEnergy(), prior={"name": "boltzmann", "width": 0.1})
    with pytest.raises(ValueError, match="prior must be"):
        ScoreModel(net, LinearVP(), DoubleWell4(), prior={"name": "harmonic"})
    config = model.config()
    config["prior"] = {"name": "boltzmann", "width": "wide"}
    with pytest.raises((InputError, ValueError)):
        ScoreModel.from_config(config)


def test_base_noise_skips_the_energy_where_the_gate_is_closed():
    """At t_max the energy is never evaluated: NaN coordinates in the energy's argument would
    otherwise leak in through 0 * NaN."""
    calls = []

    class Spy(DoubleWell4):
        def energy(self, x):
            calls.append(len(x))
            return super().energy(x)

    sched = LinearVP()
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    t = torch.tensor([1e-4, 0.5, sched.t_max], dtype=torch.float64)
    base_noise(Spy(), sched, SCALE, 0.15, x, t)
    assert calls == [1]  # only the sample at t = 1e-4 has an open gate


def test_cli_trains_a_model_with_the_prior(tmp_path, rng, capsys):
    import numpy as np

    import digfast
    from digfast.cli import main

    data = tmp_path / "dw4.npy"
    np.save(data, DoubleWell4().reference_samples(200, seed=int(torch.randint(0, 999, (1,), generator=rng))).numpy())
    out = tmp_path / "m"
    assert main(["train", "--system", "dw4", "--data", str(data), "--out", str(out), "--steps", "4",
                 "--batch-size", "16", "--prior-width", "0.15", "--prior-onset", "0.15", "--quiet"]) == 0, \
        capsys.readouterr().err
    model = digfast.load(str(out))
    assert model.prior == {"name": "boltzmann", "width": 0.15, "cap": 100.0, "onset": 0.15}
    assert model.net.head_out.weight.abs().sum() > 0  # started at zero (the prior's score), then trained
    res = digfast.sample_batch(model, n=8, steps=10, progress=False)
    assert torch.isfinite(res.positions).all()
    # a fine-tune keeps its model's prior
    assert main(["train", "--system", "dw4", "--data", str(data), "--out", str(tmp_path / "x"), "--steps", "2",
                 "--init", str(out), "--prior-width", "0.1", "--quiet"]) == 2
