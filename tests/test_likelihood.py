"""log p along the probability-flow ODE against the mixture's closed-form density."""
import math

import pytest
import torch

import digfast
from digfast.likelihood import gaussian_prior_log_prob, helmert_basis, ode_map, rademacher_probes
from digfast.schedules import GeometricVE, LinearVP


def _exact_prior(mixture, schedule):
    """The true marginal at t_max, so the test measures the integration error alone."""
    a, s = schedule.alpha(schedule.t_max), schedule.sigma(schedule.t_max)
    return lambda z: mixture.log_prob(z, a, s)


@pytest.fixture(scope="module")
def data(mixture):
    return mixture.sample(96, torch.Generator().manual_seed(21))[0]


@pytest.mark.parametrize("schedule", [LinearVP(), GeometricVE(0.01, 50.0)], ids=["vp", "ve"])
def test_exact_divergence_matches_closed_form(mixture, data, schedule):
    res = digfast.log_likelihood(mixture.model(schedule), positions=data, divergence="exact",
                                 method="rk4", steps=200, t_min=0.0,
                                 prior_log_prob=_exact_prior(mixture, schedule))
    a0, s0 = schedule.alpha(0.0), schedule.sigma(0.0)  # VE keeps sigma_min at t = 0
    err = res.log_prob - mixture.log_prob(data, a0, s0)
    assert err.abs().mean() < 0.01, f"mean abs error {float(err.abs().mean()):.2e} nats"


def test_default_gaussian_prior_is_close(mixture, data):
    """With the N(0, I) prior the only extra error is alpha(1) ~ 7e-3 of signal left at t = 1."""
    res = digfast.log_likelihood(mixture.model(LinearVP()), positions=data, steps=200, t_min=0.0)
    assert (res.log_prob - mixture.log_prob(data)).abs().mean() < 0.05


def test_adaptive_integration(mixture, data):
    schedule = LinearVP()
    res = digfast.log_likelihood(mixture.model(schedule), positions=data, method="dopri5", rtol=1e-6,
                                 atol=1e-6, t_min=0.0, prior_log_prob=_exact_prior(mixture, schedule))
    assert (res.log_prob - mixture.log_prob(data)).abs().mean() < 0.01
    assert res.n_evals < 4 * 200, "adaptive steps should beat a fine fixed grid"


def test_hutchinson_is_unbiased(mixture, data):
    schedule = LinearVP()
    exact = mixture.log_prob(data)
    res = digfast.log_likelihood(mixture.model(schedule), positions=data, divergence="hutchinson", probes=4,
                                 steps=100, t_min=0.0, seed=5, prior_log_prob=_exact_prior(mixture, schedule))
    err = res.log_prob - exact
    se = float(err.std()) / math.sqrt(len(err))
    assert abs(float(err.mean())) < 3 * se + 2e-3, f"bias {float(err.mean()):.3f} vs SE {se:.3f}"
    assert float(err.std()) > 0, "a stochastic estimate with zero spread is not Hutchinson"
    # more probes, less spread
    res16 = digfast.log_likelihood(mixture.model(schedule), positions=data, divergence="hutchinson", probes=16,
                                   steps=100, t_min=0.0, seed=5, prior_log_prob=_exact_prior(mixture, schedule))
    assert (res16.log_prob - exact).std() < err.std()


def test_encode_then_decode_returns_the_input(mixture, data):
    schedule = LinearVP()
    model = mixture.model(schedule)
    res = digfast.log_likelihood(model, positions=data, steps=200, t_min=0.0)
    back = ode_map(model.score, schedule, res.latent, schedule.t_max, 0.0, steps=200)
    torch.testing.assert_close(back, data, atol=1e-4, rtol=0)
    enc = ode_map(model.score, schedule, data, 0.0, schedule.t_max, steps=200)
    torch.testing.assert_close(enc, res.latent, atol=1e-6, rtol=0)
    # the latent looks like the prior: roughly unit variance per degree of freedom
    assert 0.7 < float(res.latent.pow(2).sum((1, 2)).mean()) / mixture.dof < 1.3


def test_sample_with_likelihood_is_the_density_of_its_samples(mixture):
    """Decode and log density in one integration: the closed form at the samples, the encoding
    integration's log p, and sample_batch's rk4 samples from the same prior draws."""
    model = mixture.model(LinearVP())
    res = digfast.sample_with_likelihood(model, n=48, steps=200, seed=3, first_sample_id=5)
    assert res.positions.shape == (48, mixture.n_atoms, mixture.spatial_dim)
    # t_min = 1e-3 leaves a little noise on the data: compare with the marginal there
    a, s = LinearVP().alpha(1e-3), LinearVP().sigma(1e-3)
    err = res.log_prob - mixture.log_prob(res.positions.double(), a, s)
    assert err.abs().mean() < 0.05, f"mean abs error {float(err.abs().mean()):.3f} nats"
    enc = digfast.log_likelihood(model, positions=res.positions, steps=200, t_min=1e-3)
    torch.testing.assert_close(res.log_prob, enc.log_prob, atol=1e-3, rtol=0)
    drawn = digfast.sample_batch(model, n=48, steps=200, sampler="rk4", seed=3, first_sample_id=5,
                                 progress=False)
    torch.testing.assert_close(res.positions, drawn.positions, atol=1e-5, rtol=0)  # same grid
    with pytest.raises(ValueError, match="method"):
        digfast.sample_with_likelihood(model, n=2, method="rk5")
    with pytest.raises(ValueError, match="log-SNR"):  # VP: t = 0 is off the log-SNR grid
        digfast.sample_with_likelihood(model, n=2, t_min=0.0)


def test_padded_likelihood_equals_unpadded(mixture, data):
    model = mixture.model(LinearVP())
    x = data[:10]
    plain = digfast.log_likelihood(model, positions=x, steps=50, divergence="hutchinson", probes=3, seed=2)
    pad = torch.zeros(10, mixture.n_atoms + 2, 3, dtype=x.dtype)
    pad[:, : mixture.n_atoms] = x
    mask = torch.zeros(mixture.n_atoms + 2, dtype=torch.bool)
    mask[: mixture.n_atoms] = True

    class Padded:
        schedule, system = model.schedule, type("S", (), {"n_atoms": mixture.n_atoms + 2, "spatial_dim": 3})()

        def score(self, x, t, mask=None):
            return model.score(x, t, mask)

    padded = digfast.log_likelihood(Padded(), positions=pad, steps=50, divergence="hutchinson", probes=3,
                                    seed=2, mask=mask)
    torch.testing.assert_close(padded.log_prob, plain.log_prob)


def test_probes_span_the_subspace(rng):
    h = helmert_basis(5)
    torch.testing.assert_close(h @ h.T, torch.eye(4, dtype=h.dtype))
    assert h.sum(1).abs().max() < 1e-12
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    p = rademacher_probes(3, 9, torch.tensor([0, 1]), (7, 3), mask, torch.float64)
    assert p[:, 0, 5:].abs().max() == 0
    assert p.sum(2).abs().max() < 1e-12  # zero centre of mass
    torch.testing.assert_close(p.pow(2).sum((2, 3)), torch.tensor([[12.0, 18.0]] * 3, dtype=torch.float64))


def test_prior_log_prob_is_normalised():
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    expected = -4.5 * math.log(2 * math.pi) - 0.5 * x.pow(2).sum((1, 2))
    torch.testing.assert_close(gaussian_prior_log_prob(x, 1.0), expected)


def test_bad_input_is_refused(mixture, data):
    model = mixture.model(LinearVP())
    bad = data[:4].clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        digfast.log_likelihood(model, positions=bad)
    with pytest.raises(ValueError, match="positions must be"):
        digfast.log_likelihood(model, positions=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="divergence"):
        digfast.log_likelihood(model, positions=data[:2], divergence="skilling")
    with pytest.raises(ValueError, match="unknown method"):
        digfast.log_likelihood(model, positions=data[:2], method="rk45")
