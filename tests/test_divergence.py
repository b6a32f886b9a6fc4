"""Forward-mode divergence (likelihood): exact and Hutchinson against the autograd Jacobian and
the reverse-mode reference, on the analytic mixture and a small float64 Graphormer-3D."""
import logging
import math

import pytest
import torch

import digfast
from digfast import likelihood
from digfast.likelihood import (AUTO_EXACT_MAX_COORDS, _Drift, log_likelihood, rademacher_probes,
                                resolve_divergence)
from digfast.models.graphormer3d import Graphormer3D, Graphormer3DConfig
from digfast.schedules import LinearVP


@pytest.fixture
def graphormer(rng):
    """A small float64 network with random (not initial) weights, as a score function."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = Graphormer3D(Graphormer3DConfig(n_atom_types=2, layers=2, width=16, heads=2, ffn=16,
                                          gaussians=8)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=rng, dtype=p.dtype))
    types = torch.tensor([0, 1, 1, 0, 1, 0])

    def score(x, t, mask=None):
        return net(x, t, types[: x.shape[1]], mask)
    return score


def _inputs(rng, b, n, masked):
    x = torch.randn(b, n, 3, generator=rng, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, n - 2:] = False
        x = x * mask[..., None]
    return x, mask


def _jacobian_trace(drift, x, t):
    """sum_c d s_c / d x_c per structure from the full autograd Jacobian."""
    b = x.shape[0]
    jac = torch.autograd.functional.jacobian(lambda y: drift._score(y, t), x)
    return torch.stack([jac[i, ..., i, :, :].reshape(x[0].numel(), -1).diagonal().sum()
                        for i in range(b)])


def _drift(score_fn, mask, divergence, probes=None):
    return _Drift(score_fn, LinearVP(), mask, divergence, probes)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "padded"])
def test_forward_exact_is_the_jacobian_trace_graphormer(rng, graphormer, masked):
    x, mask = _inputs(rng, 3, 6, masked)
    expected = _jacobian_trace(_drift(graphormer, mask, "exact"), x, 0.4)
    s, div = _drift(graphormer, mask, "exact-forward").divergence_at(x, 0.4)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-10)
    s_rev, div_rev = _drift(graphormer, mask, "exact").divergence_at(x, 0.4)  # the reference
    torch.testing.assert_close(div_rev, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(s, s_rev.detach(), rtol=0, atol=1e-12)
    assert expected.abs().min() > 1e-3, "a vanishing trace would test nothing"


def test_forward_exact_is_the_jacobian_trace_mixture(rng, mixture):
    model = mixture.model(LinearVP())
    x = mixture.sample(4, rng)[0] + 0.3 * torch.randn(4, 4, 3, generator=rng, dtype=torch.float64)
    expected = _jacobian_trace(_drift(model.score, None, "exact"), x, 0.3)
    _, div = _drift(model.score, None, "exact-forward").divergence_at(x, 0.3)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-10)


def test_forward_and_reverse_hutchinson_agree_with_the_same_probes(rng, graphormer):
    x, mask = _inputs(rng, 3, 6, masked=True)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    eps = rademacher_probes(5, seed, torch.arange(3), x.shape[1:], mask, x.dtype)
    _, fwd = _drift(graphormer, mask, "hutchinson-forward", eps).divergence_at(x, 0.7)
    _, rev = _drift(graphormer, mask, "hutchinson", eps).divergence_at(x, 0.7)
    torch.testing.assert_close(fwd, rev.detach(), rtol=0, atol=1e-10)


def test_forward_hutchinson_is_unbiased(rng, graphormer):
    """The mean over many probes is within 4 standard errors of the exact trace."""
    x, mask = _inputs(rng, 2, 5, masked=True)
    k = 1024
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    eps = rademacher_probes(k, seed, torch.arange(2), x.shape[1:], mask, x.dtype)
    drift = _drift(graphormer, mask, "hutchinson-forward", eps)
    _, jv = drift.jvps(x, 0.5, eps)
    per_probe = (eps * jv).sum(dim=(2, 3))  # (K, B) single-probe estimates
    _, exact = _drift(graphormer, mask, "exact-forward").divergence_at(x, 0.5)
    se = per_probe.std(0) / math.sqrt(k)
    assert (se > 0).all(), "Rademacher estimates without spread test nothing"
    z = (per_probe.mean(0) - exact) / se
    assert z.abs().max() < 4, f"bias of {z.tolist()} standard errors"
    _, div = drift.divergence_at(x, 0.5)  # the drift's own estimate is that mean
    torch.testing.assert_close(div, per_probe.mean(0), rtol=0, atol=1e-10)


def test_auto_equals_exact_on_small_systems(mixture, rng):
    model = mixture.model(LinearVP())
    x = mixture.sample(6, rng)[0]
    assert resolve_divergence("auto", mixture.n_atoms * 3) == "exact"  # reverse mode on the CPU
    auto = digfast.log_likelihood(model, positions=x, steps=8, t_min=1e-3)  # the default
    exact = digfast.log_likelihood(model, positions=x, steps=8, t_min=1e-3, divergence="exact")
    torch.testing.assert_close(auto.log_prob, exact.log_prob, rtol=0, atol=1e-10)
    assert auto.n_evals == exact.n_evals == 32


def test_auto_picks_hutchinson_for_large_systems_and_forward_mode_on_gpus():
    assert resolve_divergence("auto", AUTO_EXACT_MAX_COORDS) == "exact"
    assert resolve_divergence("auto", AUTO_EXACT_MAX_COORDS + 1, "cpu") == "hutchinson"
    assert resolve_divergence("auto", AUTO_EXACT_MAX_COORDS, "cuda") == "exact-forward"
    assert resolve_divergence("auto", AUTO_EXACT_MAX_COORDS + 1, "cuda:0") == "hutchinson-forward"
    assert resolve_divergence("hutchinson", 3) == "hutchinson"
    with pytest.raises(ValueError, match="divergence must be one of"):
        resolve_divergence("skilling", 3)


def test_auto_falls_back_to_reverse_mode(rng, caplog, monkeypatch):
    """A score function without a forward mode (torch.cdist has none) still gets its exact
    divergence under "auto" where that means forward mode (GPUs), by reverse mode, with one
    warning."""
    x = torch.randn(3, 4, 3, generator=rng, dtype=torch.float64)
    on_gpu = likelihood.resolve_divergence
    monkeypatch.setattr(likelihood, "resolve_divergence", lambda d, n, device=None: on_gpu(d, n, "cuda"))

    def score(y, t, mask=None):
        return -y / (1 + 0.1 * torch.cdist(y, y).mean((-1, -2)))[:, None, None]
    with caplog.at_level(logging.WARNING, logger="digfast"):
        auto = log_likelihood(score, LinearVP(), x, steps=3, t_min=1e-3)
    exact = log_likelihood(score, LinearVP(), x, steps=3, t_min=1e-3, divergence="exact")
    torch.testing.assert_close(auto.log_prob, exact.log_prob, rtol=0, atol=1e-10)
    assert sum("no forward mode" in r.message for r in caplog.records) == 1


def test_cli_likelihood_defaults_to_auto(tmp_path, capsys, mixture, rng):
    """The likelihood command's default divergence is "auto": on the mixture, the exact one."""
    import numpy as np

    from digfast.cli import main
    x = mixture.sample(5, rng)[0].numpy()
    np.save(tmp_path / "x.npy", x)
    for divergence in (None, "exact"):
        extra = [] if divergence is None else ["--divergence", divergence]
        out = tmp_path / f"lp_{divergence}.npy"
        assert main(["likelihood", str(tmp_path / "x.npy"), "--steps", "4", "--quiet", "-o",
                     str(out), *extra]) == 0
    assert "(auto," in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "lp_None.npy"), np.load(tmp_path / "lp_exact.npy"),
                               rtol=0, atol=1e-10)


def test_shipped_score_model_auto_equals_exact():
    """A trained Graphormer-3D ScoreModel (DW-4, 8 coordinates) through digfast.log_likelihood,
    the network in float64: forward-mode exact (what "auto" runs on a GPU) equals reverse mode."""
    model = digfast.load("dw4")
    model.net.double()
    x = digfast.sample_batch(model, n=3, steps=20, progress=False, seed=4).positions
    kw = dict(positions=x, steps=3, dtype=torch.float64)
    auto = digfast.log_likelihood(model, divergence="exact-forward", **kw)
    exact = digfast.log_likelihood(model, divergence="exact", **kw)
    assert torch.isfinite(auto.log_prob).all()
    torch.testing.assert_close(auto.log_prob, exact.log_prob, rtol=0, atol=1e-9)
    assert auto.n_evals == exact.n_evals


def test_fallback_does_not_count_the_failed_call(rng):
    x = torch.randn(2, 3, 3, generator=rng, dtype=torch.float64)

    def score(y, t, mask=None):
        return -y / (1 + torch.cdist(y, y).mean((-1, -2)))[:, None, None]
    res = log_likelihood(score, LinearVP(), x, steps=2, method="euler", t_min=1e-3)
    assert res.n_evals == 2


def test_forward_exact_in_chunks_equals_one_chunk(rng, graphormer, monkeypatch):
    """A memory budget that splits the 18 directions into chunks changes nothing but the
    number of calls."""
    x, mask = _inputs(rng, 2, 6, masked=True)
    whole = _drift(graphormer, mask, "exact-forward")
    _, expected = whole.divergence_at(x, 0.6)
    monkeypatch.setattr(likelihood, "FORWARD_PAIR_BUDGET", 2 * 36 * 5)  # 5 directions a call
    chunked = _drift(graphormer, mask, "exact-forward")
    _, got = chunked.divergence_at(x, 0.6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (whole.n_evals, chunked.n_evals) == (1, 4)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson", "exact-forward", "hutchinson-forward"])
def test_adaptive_log_p_does_not_depend_on_the_batch(rng, divergence):
    """dopri5 steps each structure by its own error: in a padded batch, each log p and the work
    done on it are what that structure gets alone (the batch makes as many calls as its
    slowest structure, and evaluates each structure only as often as it needs)."""
    x, mask = _inputs(rng, 3, 6, masked=True)
    x[2] *= 2.5  # a structure with other dynamics than the rest
    w = 0.5 + torch.rand(6, 3, generator=rng, dtype=torch.float64)
    rows = []

    def score(y, t, m=None):  # smooth and nonlinear, coupled within each atom, zero on padding
        rows.append(y.shape[0])
        s = -y * w * (1.0 + 0.5 * torch.tanh(y.sum(-1, keepdim=True) + t[:, None, None]))
        return s if m is None else s * m[..., None]

    def run(idx):
        rows.clear()
        res = log_likelihood(score, LinearVP(), x[idx], mask=mask[idx], divergence=divergence, probes=3,
                             seed=7, sample_ids=torch.as_tensor(idx), method="dopri5", rtol=1e-6, atol=1e-6)
        return res, sum(rows)

    batch, batch_rows = run([0, 1, 2])
    alone = [run([i]) for i in range(3)]
    torch.testing.assert_close(batch.log_prob, torch.cat([r.log_prob for r, _ in alone]), rtol=0, atol=1e-9)
    torch.testing.assert_close(batch.latent, torch.cat([r.latent for r, _ in alone]), rtol=0, atol=1e-9)
    assert batch.n_evals == max(r.n_evals for r, _ in alone)
    assert batch_rows == sum(n for _, n in alone)
    assert len({r.n_evals for r, _ in alone}) > 1, "the structures should need different numbers of steps"
