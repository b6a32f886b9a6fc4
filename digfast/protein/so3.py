"""IGSO(3): the isotropic Gaussian on SO(3) that the DiG protein model diffuses rotations with.

Density of the rotation angle w in (0, pi] at scale eps, as a truncated series (l < 2000):
    f(w, eps) = sum_l (2l + 1) exp(-l (l + 1) eps^2) sin((l + 1/2) w) / sin(w / 2)
    pdf(w) = f (1 - cos w) / pi,   cdf = running sum of pdf * pi / 2000 over the w grid
    score(w) = d/dw log f
    expected score norm E(eps) = sqrt( sum_w score^2 pdf / sum_w pdf / pi )
on the public tables' grids: 1000 eps log-spaced in [0.01, 2], w = pi k / 2000, k = 1..2000.
The public sampler multiplies the network's rotation output by E(eps) looked up at index
round((log10 eps - log10 0.01) / (log10 2 - log10 0.01) * 1000) (clipped to 0..999); that
lookup, quirk included, is score_norm() here.

The public code sums the series in a Python loop (about 6 minutes of CPU on first use).
Here the sums over l are three matrix products in float64 (about a second), and the
tables are cached under $DIGFAST_CACHE or ~/.cache/digfast.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

EPS_MIN, EPS_MAX, N_EPS = 0.01, 2.0, 1000
N_OMEGA = 2000
N_TERMS = 2000
TABLE_VERSION = 1


def eps_grid() -> np.ndarray:
    return 10 ** np.linspace(np.log10(EPS_MIN), np.log10(EPS_MAX), N_EPS)


def omega_grid() -> np.ndarray:
    return np.linspace(0, np.pi, N_OMEGA + 1)[1:]


def compute_tables(eps: np.ndarray | None = None, omega: np.ndarray | None = None,
                   n_terms: int = N_TERMS) -> dict[str, np.ndarray]:
    """cdf (E, W), score (E, W) and expected score norms (E,) on the given grids (default:
    the public ones), float64."""
    eps = eps_grid() if eps is None else np.asarray(eps, dtype=np.float64)
    omega = omega_grid() if omega is None else np.asarray(omega, dtype=np.float64)
    l = np.arange(n_terms, dtype=np.float64)
    weights = (2 * l + 1) * np.exp(-l * (l + 1) * eps[:, None] ** 2)    # (E, l)
    phase = (l + 0.5)[:, None] * omega[None, :]                          # (l, W)
    sin_sum = weights @ np.sin(phase)                                    # sum_l w_l sin((l+1/2) w)
    dsin_sum = weights @ ((l + 0.5)[:, None] * np.cos(phase))            # its derivative in w
    lo, dlo = np.sin(omega / 2), 0.5 * np.cos(omega / 2)
    f = sin_sum / lo
    score = (dsin_sum * lo - sin_sum * dlo) / lo**2 / f
    pdf = f * (1 - np.cos(omega)) / np.pi
    cdf = np.cumsum(pdf, axis=1) / len(omega) * np.pi
    norms = np.sqrt(np.sum(score**2 * pdf, axis=1) / np.sum(pdf, axis=1) / np.pi)
    return {"eps": eps, "omega": omega, "cdf": cdf, "score": score, "exp_score_norm": norms}


def cache_dir() -> Path:
    root = os.environ.get("DIGFAST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "digfast"


@functools.cache
def tables() -> dict[str, np.ndarray]:
    """The public-grid tables, built once per machine and cached on disk (a broken or
    foreign cache file is rebuilt)."""
    path = cache_dir() / f"igso3_tables_v{TABLE_VERSION}.npz"
    try:
        with np.load(path) as data:
            out = {k: data[k] for k in data.files}
        if out["cdf"].shape == (N_EPS, N_OMEGA) and np.isfinite(out["exp_score_norm"]).all():
            return out
    except (OSError, ValueError, KeyError):
        pass
    out = compute_tables()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, **out)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the tables live in memory for this process
    return out


def eps_index(eps) -> np.ndarray:
    """The public tables' row for scale eps (its rounding, N_EPS and not N_EPS - 1, kept)."""
    eps = np.asarray(eps, dtype=np.float64)
    frac = (np.log10(eps) - np.log10(EPS_MIN)) / (np.log10(EPS_MAX) - np.log10(EPS_MIN))
    return np.clip(np.around(frac * N_EPS).astype(np.int64), 0, N_EPS - 1)


def score_norm(eps) -> torch.Tensor:
    """Expected IGSO(3) score norm at scale(s) eps, float32, as the public sampler uses it."""
    return torch.from_numpy(np.asarray(tables()["exp_score_norm"][eps_index(eps)])).float()


def sample_angles(eps: float, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """n rotation angles of IGSO(3) at scale eps (inverse-cdf on the table), float64."""
    t = tables()
    row = eps_index(eps)
    u = torch.rand(n, generator=gen, dtype=torch.float64).numpy()
    return torch.from_numpy(np.interp(u, t["cdf"][row], t["omega"]))


def sample_vectors(eps: float, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """n axis-angle vectors (n, 3) of IGSO(3) at scale eps: uniform axis, IGSO(3) angle."""
    axis = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    return axis * sample_angles(eps, n, gen)[:, None]


def score_vectors(eps: float, vec: torch.Tensor) -> torch.Tensor:
    """Score of IGSO(3) at scale eps for axis-angle vectors vec (n, 3): score(|v|) v / |v|."""
    t = tables()
    om = vec.norm(dim=-1, keepdim=True).double()
    mag = np.interp(om.numpy(), t["omega"], t["score"][eps_index(eps)])
    return (torch.from_numpy(mag) * vec.double() / om).to(vec.dtype)


def expmap(v: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of axis-angle vectors v (..., 3): a turn by |v| radians
    anticlockwise about v / |v| (Rodrigues; a series below 1e-4 rad)."""
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]                     # (..., 1, 1)
    theta = theta2.sqrt()
    small = theta < 1e-4
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1 - theta2 / 6, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(safe)) / (safe * safe))
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(*v.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def uniform_rotations(normals4: torch.Tensor) -> torch.Tensor:
    """Haar-uniform rotation matrices (..., 3, 3) from standard normals (..., 4) (a random
    unit quaternion)."""
    q = normals4 / normals4.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                     2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                     2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)
    return R.view(*q.shape[:-1], 3, 3)
