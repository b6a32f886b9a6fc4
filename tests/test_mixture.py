import math

import torch

from digfast.ops.sampler_step import remove_com


def test_score_is_gradient_of_log_density(mixture, rng):
    x = 2.0 * torch.randn(16, mixture.n_atoms, 3, generator=rng, dtype=torch.float64)
    alpha, sigma = 0.8, 0.6
    x = remove_com(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(mixture.log_prob(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach(), alpha, sigma), remove_com(grad))


def test_score_lies_in_zero_com_subspace(mixture, rng):
    x = torch.randn(8, mixture.n_atoms, 3, generator=rng)
    s = mixture.score(x, torch.rand(8, generator=rng, dtype=torch.float64), 0.5)
    assert s.sum(1).abs().max() < 1e-5


def test_density_is_normalised_on_the_subspace(mixture):
    """Importance sampling from a broad Gaussian on the subspace: E_q[p / q] = 1."""
    g = torch.Generator().manual_seed(5)
    std, n = 3.0, 200_000
    z = std * remove_com(torch.randn(n, mixture.n_atoms, 3, generator=g, dtype=torch.float64))
    log_q = -0.5 * mixture.dof * math.log(2 * math.pi * std**2) - 0.5 * z.pow(2).sum((1, 2)) / std**2
    ratio = torch.exp(mixture.log_prob(z) - log_q)
    se = float(ratio.std()) / math.sqrt(n)
    assert abs(float(ratio.mean()) - 1.0) < 4 * se + 1e-3


def test_exact_samples_follow_the_weights(mixture):
    x, labels = mixture.sample(20_000, torch.Generator().manual_seed(3))
    assert (mixture.responsibilities(x).argmax(1) == labels).float().mean() > 0.999
    w = torch.bincount(labels, minlength=3).double() / len(labels)
    se = torch.sqrt(mixture.weights * (1 - mixture.weights) / len(labels))
    assert ((w - mixture.weights).abs() < 4 * se).all()


def test_score_runs_on_the_device_of_its_input(mixture):
    """The mixture's parameters follow x to its device (seen on a GPU: CUDA x against CPU
    parameters). The meta device stands in for a GPU here: any CPU tensor mixed in raises."""
    x = torch.randn(5, mixture.n_atoms, mixture.spatial_dim, device="meta")
    t = torch.full((5,), 0.3, device="meta")
    s = mixture.score(x, t, t)
    assert s.device.type == "meta" and s.shape == x.shape
    assert mixture.log_prob(x).device.type == "meta"
