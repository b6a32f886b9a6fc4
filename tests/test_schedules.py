import math

import pytest
import torch

from digfast.schedules import CosineVP, GeometricVE, LinearVP, SigmoidVP, make_schedule

VP = [LinearVP(), CosineVP(), SigmoidVP()]
ALL = VP + [GeometricVE(0.01, 50.0)]


def test_sigmoid_discrete_betas_are_digs_table():
    n = 500
    expected = torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (0.02 - 1e-7) + 1e-7
    got = SigmoidVP(n_train=n).discrete(n).betas
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-15)


def test_linear_discretisation_is_ddpm_linear():
    betas = LinearVP(0.1, 20.0).discrete(1000).betas
    # beta_i = 1 - exp(-int beta) ~ beta(t_mid) / N: DDPM's 1e-4 .. 2e-2
    mid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    torch.testing.assert_close(betas, (0.1 + mid * 19.9) / 1000, rtol=2e-2, atol=0)


def test_cosine_closed_form():
    s = CosineVP()
    t = torch.rand(50, dtype=torch.float64) * s.t_max
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(s.alpha(t) ** 2, f(t) / f(torch.zeros(1, dtype=torch.float64)))


@pytest.mark.parametrize("sched", VP, ids=lambda s: s.config()["name"])
def test_vp_is_variance_preserving_and_monotone(sched):
    t = torch.linspace(0, sched.t_max, 301, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
    assert float(a[0]) == 1.0 and float(s[0]) == 0.0
    assert (a.diff() <= 0).all() and (s.diff() >= 0).all()
    assert float(a[-1]) < 0.1, "the process must forget the data by t_max"


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.config()["name"])
def test_continuous_coefficients_match_marginals(sched):
    """f = d log alpha / dt and g^2 = d sigma^2/dt - 2 f sigma^2 (finite differences)."""
    t = torch.linspace(0.05, sched.t_max - 0.05, 40, dtype=torch.float64)
    if isinstance(sched, SigmoidVP):  # piecewise constant beta: stay inside one piece
        t = (torch.floor(t * sched.n_train) + 0.5) / sched.n_train
    h = 1e-6
    dlog_alpha = (sched.log_alpha(t + h) - sched.log_alpha(t - h)) / (2 * h)
    dsigma2 = (sched.sigma(t + h) ** 2 - sched.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(sched.drift_coef(t), dlog_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sched.diffusion2(t), dsigma2 - 2 * sched.drift_coef(t) * sched.sigma(t) ** 2,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.config()["name"])
def test_discretisation_matches_continuous_at_grid(sched):
    d = sched.discrete(37)
    torch.testing.assert_close(d.alpha, sched.alpha(d.t))
    torch.testing.assert_close(d.sigma, sched.sigma(d.t))
    if sched.kind == "vp":  # alpha_i = prod sqrt(1 - beta_j)
        torch.testing.assert_close(d.alpha[1:], torch.cumprod(torch.sqrt(1 - d.betas), 0))


def test_ancestral_coefficients_are_the_papers_update():
    d = LinearVP().discrete(100)
    for i in (1, 2, 50, 100):
        beta = float(d.betas[i - 1])
        a, b, c = d.ancestral(i)
        assert a == pytest.approx(1 / math.sqrt(1 - beta), rel=1e-12)
        assert b == pytest.approx(beta / math.sqrt(1 - beta), rel=1e-9)
        assert c == pytest.approx(math.sqrt(beta), rel=1e-9)


def test_ve_ancestral_adds_the_variance_gap():
    sched = GeometricVE(0.01, 50.0)
    d = sched.discrete(10)
    a, b, c = d.ancestral(5)
    gap = float(d.sigma[5] ** 2 - d.sigma[4] ** 2)
    assert (a, b) == (pytest.approx(1.0), pytest.approx(gap)) and c == pytest.approx(math.sqrt(gap))
    assert float(sched.sigma(0.0)) == pytest.approx(0.01) and float(sched.sigma(1.0)) == pytest.approx(50.0)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.config()["name"])
def test_log_snr_inverse(sched):
    t = torch.linspace(0.01, sched.t_max, 17, dtype=torch.float64)
    torch.testing.assert_close(sched.t_of_log_snr(sched.log_snr(t)), t, atol=1e-9, rtol=0)


@pytest.mark.parametrize("sched", ALL, ids=lambda s: s.config()["name"])
def test_config_round_trip(sched):
    again = make_schedule(sched.config())
    t = torch.linspace(0, sched.t_max, 11, dtype=torch.float64)
    torch.testing.assert_close(again.alpha(t), sched.alpha(t))
    torch.testing.assert_close(again.sigma(t), sched.sigma(t))


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("quadratic")
    with pytest.raises(ValueError):
        LinearVP(1.0, 0.5)
    with pytest.raises(ValueError):
        GeometricVE(0.0, 1.0)
    with pytest.raises(ValueError):
        LinearVP().discrete(0)
