"""Reweighting model samples (with their ODE likelihoods) to another exact target."""
import math

import numpy as np
import pytest
import torch

import digfast
from digfast import reweight
from digfast.report import wasserstein1
from digfast.systems import GaussianMixture

TARGET_WEIGHTS = [0.15, 0.25, 0.6]  # the model samples the default mixture (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def weighted_samples(mixture):
    model = digfast.load("mixture")
    out = digfast.sample_batch(model, n=1000, steps=25, sampler="dpm++2m", seed=2, progress=False)
    lik = digfast.log_likelihood(model, positions=out.positions, divergence="exact", steps=50)
    target = GaussianMixture(mixture.means, mixture.stds, TARGET_WEIGHTS)
    energy = -target.log_prob(out.positions)  # kT units
    labels = mixture.responsibilities(out.positions).argmax(1).numpy()
    return reweight.log_weights(energy, lik.log_prob), labels, target


@pytest.mark.parametrize("a,b", [(0, 1), (0, 2), (1, 2)])
def test_free_energy_between_modes_matches_the_target(weighted_samples, a, b):
    lw, labels, target = weighted_samples
    fe = reweight.free_energy_difference(labels == a, labels == b, lw)
    exact = -math.log(TARGET_WEIGHTS[b] / TARGET_WEIGHTS[a])
    assert abs(fe.delta - exact) < 3 * fe.error, (fe, exact)
    assert 0.02 < fe.error < 0.3  # the bootstrap error is of the size sampling implies
    assert fe.reliable


def test_ess_and_reweighted_mean(weighted_samples, mixture):
    lw, labels, target = weighted_samples
    ess = reweight.effective_sample_size(lw)
    # exact weights would give n / sum_k w'_k^2 / w_k; likelihood errors only lower it
    ideal = 1000 / sum(t**2 / w for t, w in zip(TARGET_WEIGHTS, mixture.weights.tolist()))
    assert 0.7 * ideal < ess <= 1.05 * ideal
    onehot = np.eye(3)[labels]
    pops = reweight.reweighted_mean(onehot, lw)
    se = np.sqrt(np.array(TARGET_WEIGHTS) * (1 - np.array(TARGET_WEIGHTS)) / ess)
    assert np.all(np.abs(pops - TARGET_WEIGHTS) < 3.5 * se), (pops, se)


def test_weights_refuse_bad_input():
    assert reweight.effective_sample_size(np.log(np.full(10, 0.1))) == pytest.approx(10)
    assert reweight.effective_sample_size(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1)
    with pytest.raises(ValueError, match="one energy"):
        reweight.log_weights(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        reweight.log_weights(np.zeros(2), np.array([np.inf, np.nan]))
    with pytest.raises(ValueError, match="no weighted sample"):
        reweight.free_energy_difference(np.array([1, 0]), np.array([0, 0]), np.zeros(2))
    lw = reweight.log_weights(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert np.allclose(np.exp(lw), [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])


def test_weighted_wasserstein1_matches_repeated_points():
    """Integer weights k_i are the same distribution as a with point i repeated k_i times:
    the general (CDF) path must give what the sorted-gap path gives on the repeated set."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    a = torch.randn(23, generator=g, dtype=torch.float64) * 1.7 + 0.4
    k = torch.randint(1, 5, (23,), generator=g)
    b = torch.randn(int(k.sum()), generator=g, dtype=torch.float64)
    repeated = torch.repeat_interleave(a, k)
    assert wasserstein1(a, b, k.double()) == pytest.approx(wasserstein1(repeated, b), rel=1e-12)
    # a translate is |shift| away, whatever the (equal) sizes; scaling the weights changes nothing
    shift = float(torch.randn((), generator=g))
    assert wasserstein1(a, a + shift, 3 * torch.ones(23)) == pytest.approx(abs(shift), rel=1e-12)
    assert wasserstein1(a, b, k.double()) == pytest.approx(wasserstein1(a, b, 0.1 * k.double()), rel=1e-12)
    with pytest.raises(ValueError):
        wasserstein1(a, b, -k.double())
