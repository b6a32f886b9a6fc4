"""A Gaussian mixture over (N, d) configurations in the zero-centre-of-mass subspace.

Component k is N(mu_k, s_k^2 I) on the D = d (N - 1) dimensional subspace. Under a
forward process x_t = alpha x_0 + sigma eps the mixture stays a mixture, with means
alpha mu_k and variances alpha^2 s_k^2 + sigma^2, so densities, scores and samples are
known in closed form at every t: the exact target for samplers and likelihoods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from digfast.ops.sampler_step import remove_com
from digfast.systems.checks import check_structures


class GaussianMixture:
    def __init__(self, means: torch.Tensor, stds, weights, name: str = "mixture"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 3:
            raise ValueError(f"means must be (components, atoms, dim), got {tuple(means.shape)}")
        self.means = remove_com(means)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        k = means.shape[0]
        if self.stds.shape != (k,) or w.shape != (k,):
            raise ValueError("need one std and one weight per component")
        if (self.stds <= 0).any() or (w <= 0).any():
            raise ValueError("stds and weights must be positive")
        self.weights = w / w.sum()
        self.name = name
        self.n_atoms, self.spatial_dim = means.shape[1], means.shape[2]
        self.atom_types = torch.zeros(self.n_atoms, dtype=torch.long)
        self._on_device = {}

    def _params(self, device):
        """(means, stds, weights) on device, copied once per device (the score runs every step)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.means, self.stds, self.weights
        if device not in self._on_device:
            self._on_device[device] = tuple(t.to(device) for t in (self.means, self.stds, self.weights))
        return self._on_device[device]

    @classmethod
    def default(cls) -> "GaussianMixture":
        """4 atoms in 3-D (D = 9), three unequal, well separated modes."""
        g = torch.Generator().manual_seed(20261127)
        means = 1.5 * torch.randn(3, 4, 3, generator=g, dtype=torch.float64)
        return cls(means, stds=[0.45, 0.6, 0.35], weights=[0.5, 0.3, 0.2])

    @property
    def dof(self) -> int:
        """Dimension of the zero-CoM subspace."""
        return self.spatial_dim * (self.n_atoms - 1)

    def config(self) -> dict:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(),
                "weights": self.weights.tolist(), "name": self.name}

    # closed forms at time t of a schedule (t = 0 with alpha = 1, sigma = 0 is the data)
    def _moments(self, alpha, sigma, device):
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=device).reshape(-1, 1)  # (B or 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1, 1)
        var = alpha**2 * self._params(device)[1] ** 2 + sigma**2  # (B, K)
        return alpha, var

    def _log_components(self, x, alpha, sigma):
        """log w_k + log N(x; alpha mu_k, var_k I_D) for each component: (B, K)."""
        x = x.to(torch.float64)
        means, _, weights = self._params(x.device)
        alpha, var = self._moments(alpha, sigma, x.device)
        diff = x[:, None] - alpha[..., None, None] * means[None]  # (B, K, N, d)
        sq = diff.pow(2).sum(dim=(-1, -2))
        return torch.log(weights) - 0.5 * self.dof * torch.log(2 * math.pi * var) - 0.5 * sq / var

    def log_prob(self, x, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """log density on the subspace of the marginal with coefficients (alpha, sigma): (B,)."""
        self._check(x)
        return torch.logsumexp(self._log_components(remove_com(x.to(torch.float64)), alpha, sigma), dim=-1)

    def energy(self, x) -> torch.Tensor:
        """-log p_0 in units of kT."""
        return -self.log_prob(x)

    def responsibilities(self, x, alpha=1.0, sigma=0.0) -> torch.Tensor:
        return torch.softmax(self._log_components(remove_com(x.to(torch.float64)), alpha, sigma), dim=-1)

    def score(self, x, alpha, sigma) -> torch.Tensor:
        """grad log p of the marginal, in the subspace, same dtype as x."""
        x64 = remove_com(x.to(torch.float64))
        gamma = torch.softmax(self._log_components(x64, alpha, sigma), dim=-1)  # (B, K)
        alpha_, var = self._moments(alpha, sigma, x.device)
        diff = x64[:, None] - alpha_[..., None, None] * self._params(x.device)[0][None]
        s = -(gamma / var)[..., None, None] * diff
        return s.sum(dim=1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None):
        """Exact samples and their component labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.n_atoms, self.spatial_dim, dtype=torch.float64, generator=generator)
        x = self.means[labels] + self.stds[labels, None, None] * remove_com(eps)
        return x, labels

    def reference_samples(self, n: int, seed: int = 0) -> torch.Tensor:
        """Independent exact samples, for reports and noise floors."""
        return self.sample(n, torch.Generator().manual_seed(seed))[0].float()

    def summary(self, positions: torch.Tensor) -> dict:
        return mixture_summary(self, positions)

    def model(self, schedule) -> "AnalyticScore":
        return AnalyticScore(self, schedule)

    def _check(self, x):
        check_structures(self, x)


class AnalyticScore:
    """The exact score of a mixture under a schedule, behind the model interface."""

    def __init__(self, mixture: GaussianMixture, schedule):
        self.mixture, self.schedule = mixture, schedule
        self.system = mixture

    def score(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t = t.to(torch.float64)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        if mask is None:
            return self.mixture.score(x, alpha, sigma)
        # padded batch: every structure holds exactly the mixture's atoms, in order
        real = x[mask].reshape(x.shape[0], self.mixture.n_atoms, x.shape[2])
        out = torch.zeros_like(x)
        out[mask] = self.mixture.score(real, alpha, sigma).reshape(-1, x.shape[2])
        return out

    __call__ = score


@dataclass
class MixtureCheck:
    """How far samples are from the mixture, each statistic beside its bound."""

    weight_z: list[float]      # (w_hat - w) / SE per mode; bound n_se
    mean_chi2: list[float]     # n_k |mean_k - mu_k|^2 / s_k^2 ~ chi2_D; bound chi2 quantile
    mean_bound: float
    var_z: list[float]         # (v_hat_k / s_k^2 - 1) / SE per mode; v_hat the mean variance
    cov_err: list[float]       # max |C_k / s_k^2 - P| over entries; bound cov_bound
    cov_bound: list[float]
    n_se: float

    @property
    def ok(self) -> bool:
        return (all(abs(z) < self.n_se for z in self.weight_z + self.var_z)
                and all(c < self.mean_bound for c in self.mean_chi2)
                and all(e < b for e, b in zip(self.cov_err, self.cov_bound)))


def check_samples(mixture: GaussianMixture, x: torch.Tensor, n_se: float = 3.0, p_tail: float = 1e-4) -> MixtureCheck:
    """Mode weights, means and covariances of samples against the mixture's, with bounds
    that a correct sampler exceeds with small probability (statistics of n exact samples)."""
    from scipy.stats import chi2

    x = remove_com(x.to(torch.float64))
    n, dof = x.shape[0], mixture.dof
    labels = mixture.responsibilities(x).argmax(1)
    w = mixture.weights
    w_hat = torch.bincount(labels, minlength=len(w)).double() / n
    weight_z = ((w_hat - w) / torch.sqrt(w * (1 - w) / n)).tolist()
    proj = torch.eye(x.shape[1] * x.shape[2], dtype=torch.float64) - torch.kron(
        torch.full((x.shape[1], x.shape[1]), 1.0 / x.shape[1], dtype=torch.float64),
        torch.eye(x.shape[2], dtype=torch.float64))
    mean_chi2, var_z, cov_err, cov_bound = [], [], [], []
    for k in range(len(w)):
        xk = x[labels == k].reshape(-1, proj.shape[0])
        nk, s2 = xk.shape[0], float(mixture.stds[k] ** 2)
        if nk < 10:
            mean_chi2.append(float("inf")), var_z.append(float("inf"))
            cov_err.append(float("inf")), cov_bound.append(0.0)
            continue
        mu = mixture.means[k].reshape(-1)
        mean_chi2.append(float(nk * (xk.mean(0) - mu).pow(2).sum() / s2))
        dev = xk - xk.mean(0)
        cov = dev.T @ dev / (nk - 1) / s2
        var_z.append(float((torch.trace(cov) / dof - 1.0) / math.sqrt(2.0 / ((nk - 1) * dof))))
        cov_err.append(float((cov - proj).abs().max()))
        cov_bound.append(5.0 * math.sqrt(2.0 / nk))
    return MixtureCheck(weight_z, mean_chi2, float(chi2.ppf(1 - p_tail, dof)), var_z, cov_err, cov_bound, n_se)


def mixture_summary(mixture: GaussianMixture, positions: torch.Tensor) -> dict:
    """Mode weights of samples (by highest responsibility) beside the true weights."""
    labels = mixture.responsibilities(positions).argmax(1)
    found = torch.bincount(labels, minlength=len(mixture.weights)).double() / len(labels)
    return {"mode_weights": found.tolist(), "true_weights": mixture.weights.tolist()}
