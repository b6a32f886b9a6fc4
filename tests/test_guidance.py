"""Guidance against targets with closed-form conditionals (Gaussian mixture, Gaussian)."""
import math

import pytest
import torch

import digfast
from digfast.guidance import Guidance, pair_distance, parse_property, radius_of_gyration
from digfast.ops.sampler_step import remove_com
from digfast.schedules import LinearVP
from digfast.systems import GaussianMixture

N = 3000
KEEP = torch.tensor([0.15, 0.9, 0.6], dtype=torch.float64)  # q(c = 1 | mode k)


def mode_classifier(mixture, schedule):
    """Exact noisy classifier: c depends on x_0 only through its mode, so
    q_t(c = 1 | x_t) = sum_k P(k | x_t) KEEP_k, with the mixture's posterior at time t."""
    def logits(x, t):
        t = t.double()
        gamma = mixture.responsibilities(x, schedule.alpha(t), schedule.sigma(t))
        p1 = (gamma * KEEP).sum(-1)
        return torch.stack([torch.log1p(-p1), torch.log(p1)], -1).to(x.dtype)
    return logits


def mode_weight_z(mixture, positions, expected):
    labels = mixture.responsibilities(positions).argmax(1)
    w_hat = torch.bincount(labels, minlength=len(expected)).double() / len(labels)
    return (w_hat - expected) / torch.sqrt(expected * (1 - expected) / len(labels))


@pytest.mark.parametrize("sampler,steps", [("ancestral", 300), ("heun", 60), ("dpm++2m", 25)])
def test_classifier_guidance_gives_the_exact_conditional(mixture, sampler, steps):
    model = mixture.model(LinearVP())
    g = Guidance(mode_classifier(mixture, model.schedule), target=1, kind="classifier")
    out = digfast.sample_batch(model, n=N, steps=steps, sampler=sampler, seed=5, progress=False, guidance=g)
    expected = mixture.weights * KEEP / (mixture.weights * KEEP).sum()  # p(k | c = 1)
    z = mode_weight_z(mixture, out.positions, expected)
    assert z.abs().max() < 3.0, (z, expected)


def test_mode_check_notices_missing_guidance(mixture):
    model = mixture.model(LinearVP())
    g = Guidance(mode_classifier(mixture, model.schedule), target=1, kind="classifier", weight=0.0)
    out = digfast.sample_batch(model, n=N, steps=25, sampler="dpm++2m", seed=5, progress=False, guidance=g)
    expected = mixture.weights * KEEP / (mixture.weights * KEEP).sum()
    assert mode_weight_z(mixture, out.positions, expected).abs().max() > 3.0


class Scaled:
    """A model working in coordinates y = x / scale (like the trained ones)."""

    def __init__(self, inner, scale):
        self.inner, self.schedule, self.system, self.position_scale = inner, inner.schedule, inner.system, scale

    def score(self, x, t, mask=None):
        return self.inner.score(x, t, mask)


@pytest.mark.parametrize("sampler,steps", [("ancestral", 300), ("dpm++2m", 25)])
def test_tweedie_gaussian_guidance_is_exact_for_a_linear_property(sampler, steps):
    """Unit-variance Gaussian data (model coordinates), f linear, q(c | x_0) = N(c; f(x_0), tau^2):
    the denoised guidance is exact, so f of the samples has the conditional mean and variance."""
    g = torch.Generator().manual_seed(3)
    mu = 1.5 * torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    gauss = GaussianMixture(mu, stds=[1.0], weights=[1.0])
    scale = 2.0
    model = Scaled(gauss.model(LinearVP()), scale)
    a = remove_com(torch.randn(1, 4, 3, generator=g, dtype=torch.float64))[0]
    a = a / a.norm()

    def f(x, t):  # positions in system units = scale * model coordinates
        return (x * a.to(x.dtype)).sum((1, 2))

    tau, c = 0.5, 4.0
    out = digfast.sample_batch(model, n=N, steps=steps, sampler=sampler, seed=7, progress=False,
                               guidance=Guidance(f, target=c, std=tau, denoise=True))
    vals = f(out.positions.double(), None)
    # in system units f = scale a.y, y ~ N(mu, I): f_0 ~ N(m0, scale^2), conditioned on c
    m0, v0 = scale * float((a * mu[0]).sum()), scale**2
    mean = (tau**2 * m0 + v0 * c) / (tau**2 + v0)
    var = v0 * tau**2 / (tau**2 + v0)
    z_mean = (float(vals.mean()) - mean) / math.sqrt(var / N)
    z_var = (float(vals.var()) / var - 1) / math.sqrt(2 / (N - 1))
    assert abs(z_mean) < 4 and abs(z_var) < 4, (float(vals.mean()), mean, float(vals.var()), var)


def test_builtin_properties():
    x = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]])
    assert torch.allclose(pair_distance(0, 1)(x), torch.tensor([5.0]))
    assert torch.allclose(parse_property("distance:0,2")(x), torch.tensor([1.0]))
    c = x - x.mean(1, keepdim=True)
    assert torch.allclose(radius_of_gyration(x), c.pow(2).sum(-1).mean(-1).sqrt())
    assert parse_property("rg") is radius_of_gyration
    with pytest.raises(ValueError, match="unknown property"):
        parse_property("banana")
    with pytest.raises(ValueError, match="kind"):
        Guidance(radius_of_gyration, 1.0, kind="nope")


def test_guidance_moves_a_dw4_pair_distance_and_keeps_energies_physical():
    model = digfast.load("dw4")
    d01 = pair_distance(0, 1)
    ref = model.system.reference_samples(2000, seed=0).double()
    e_ref = model.system.energy(ref)
    kw = dict(n=200, steps=20, sampler="dpm++2m", seed=1, progress=False)
    base = d01(digfast.sample_batch(model, **kw).positions.double()).mean()
    target = 3.0  # the short well of the pair potential; the unguided mean is ~4.1
    out = digfast.sample_batch(model, **kw, guidance=Guidance(d01, target=target, std=0.1, denoise=True,
                                                              weight="signal"))
    moved = d01(out.positions.double()).mean()
    assert abs(moved - target) < 0.5 * abs(base - target), (float(base), float(moved))
    e = model.system.energy(out.positions.double())
    assert e_ref.quantile(0.05) < e.median() < e_ref.quantile(0.95)
    assert (e < e_ref.max() + 5).float().mean() > 0.95
