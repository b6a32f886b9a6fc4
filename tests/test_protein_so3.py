"""IGSO(3) tables (vectorised series vs a plain term-by-term sum, the public score norms,
the disk cache) and rotation helpers."""
import math

import numpy as np
import pytest
import torch

from digfast.protein import so3

from protein_helpers import FIXTURE


def _series_by_terms(omega, eps, n_terms=2000):
    """The series summed one l at a time, as written (the slow way)."""
    f = np.zeros_like(omega)
    d = np.zeros_like(omega)
    lo, dlo = np.sin(omega / 2), 0.5 * np.cos(omega / 2)
    for l in range(n_terms):
        w = (2 * l + 1) * np.exp(-l * (l + 1) * eps**2)
        hi, dhi = np.sin(omega * (l + 0.5)), (l + 0.5) * np.cos(omega * (l + 0.5))
        f += w * hi / lo
        d += w * (lo * dhi - hi * dlo) / lo**2
    return f, d / f


@pytest.mark.parametrize("eps", [0.02, 0.3, 1.65])
def test_tables_match_term_by_term_series(eps):
    omega = so3.omega_grid()
    t = so3.compute_tables(eps=np.array([eps]))
    f, score = _series_by_terms(omega, eps)
    pdf = f * (1 - np.cos(omega)) / np.pi
    np.testing.assert_allclose(t["cdf"][0], np.cumsum(pdf) / len(omega) * np.pi, rtol=1e-9, atol=1e-12)
    dense = pdf > 1e-8 * pdf.max()  # where the density is not rounding noise
    np.testing.assert_allclose(t["score"][0][dense], score[dense], rtol=1e-7, atol=1e-9)
    norm = np.sqrt(np.sum(score**2 * pdf) / np.sum(pdf) / np.pi)
    assert abs(t["exp_score_norm"][0] / norm - 1) < 1e-9


def test_density_and_small_eps_limit():
    t = so3.compute_tables(eps=np.array([0.05, 0.5, 1.5]))
    np.testing.assert_allclose(t["cdf"][:, -1], 1.0, atol=2e-3)  # a probability on [0, pi]
    assert (np.diff(t["cdf"], axis=1) >= -1e-12).all()
    # small eps: IGSO(3) ~ 3-D Gaussian of variance 2 eps^2 per axis; score -w / (2 eps^2)
    omega = t["omega"]
    near = (omega > 0.02) & (omega < 0.1)
    np.testing.assert_allclose(t["score"][0][near], -omega[near] / (2 * 0.05**2), rtol=0.02)


@pytest.mark.skipif(not FIXTURE.exists(), reason="public-code fixture not present")
def test_score_norm_bitwise_as_public():
    d = np.load(FIXTURE)
    got = so3.score_norm(d["igso3:sigma"]).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got, d["igso3:score_norm"])


def test_tables_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGFAST_CACHE", str(tmp_path))
    so3.tables.cache_clear()
    try:
        first = so3.tables()
        files = list(tmp_path.glob("igso3_tables_v*.npz"))
        assert len(files) == 1
        so3.tables.cache_clear()
        again = so3.tables()
        assert np.array_equal(first["exp_score_norm"], again["exp_score_norm"])
        files[0].write_bytes(b"broken")  # a corrupt cache is rebuilt, not trusted
        so3.tables.cache_clear()
        assert np.array_equal(so3.tables()["cdf"], first["cdf"])
    finally:
        so3.tables.cache_clear()


def test_expmap_is_matrix_exponential(rng):
    v = torch.randn(50, 3, generator=rng, dtype=torch.float64) * torch.logspace(-7, 0.4, 50, dtype=torch.float64)[:, None]
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(-1, 3, 3)
    torch.testing.assert_close(so3.expmap(v), torch.linalg.matrix_exp(K), rtol=0, atol=1e-14)


def test_uniform_rotations_and_igso3_samples(rng):
    R = so3.uniform_rotations(torch.randn(4000, 4, generator=rng, dtype=torch.float64))
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(4000, 3, 3))
    assert torch.allclose(torch.linalg.det(R), torch.ones(4000, dtype=torch.float64))
    # Haar: E[R] = 0, and the angle has density (1 - cos w) / pi (mean pi/2 + 2/pi)
    assert R.mean(0).abs().max() < 0.06
    angle = torch.arccos(((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))
    assert abs(angle.mean() - (math.pi / 2 + 2 / math.pi)) < 0.04
    v = so3.sample_vectors(0.05, 4000, rng)
    # small eps: |v|^2 ~ 2 eps^2 chi^2_3 -> mean 6 eps^2
    assert abs(float((v**2).sum(-1).mean()) / (6 * 0.05**2) - 1) < 0.06
