"""Samplers against the exact Gaussian-mixture target: statistics that fail when broken."""
import pytest
import torch

import digfast
from digfast.schedules import CosineVP, GeometricVE, LinearVP
from digfast.systems.mixture import check_samples

N_SAMPLES = 4000
CASES = [  # (schedule, sampler, steps)
    (LinearVP(), "ancestral", 500),
    (LinearVP(), "em", 500),
    (LinearVP(), "euler", 500),
    (LinearVP(), "heun", 100),
    (LinearVP(), "rk4", 25),
    (LinearVP(), "dpm++2m", 25),
    (LinearVP(), "dpm++2m-sde", 100),
    (CosineVP(), "ancestral", 500),
    (CosineVP(), "dpm++2m", 25),
    (GeometricVE(0.01, 50.0), "ancestral", 500),
    (GeometricVE(0.01, 50.0), "em", 500),
    (GeometricVE(0.01, 50.0), "heun", 100),
    (GeometricVE(0.01, 50.0), "rk4", 25),
    (GeometricVE(0.01, 50.0), "dpm++2m", 25),
    (GeometricVE(0.01, 50.0), "dpm++2m-sde", 100),
]


def _id(case):
    return f"{case[0].config()['name']}-{case[1]}-{case[2]}"


class Perturbed:
    """A model whose score is deliberately wrong, to show the statistics notice."""

    def __init__(self, model, change):
        self.model, self.change = model, change
        self.schedule, self.system = model.schedule, model.system

    def score(self, x, t, mask=None):
        return self.change(self.model.score(x, t, mask))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sampler_reaches_the_mixture(mixture, case):
    schedule, sampler, steps = case
    out = digfast.sample_batch(mixture.model(schedule), n=N_SAMPLES, steps=steps, sampler=sampler,
                               seed=11, progress=False)
    check = check_samples(mixture, out.positions)
    assert check.ok, check
    assert out.positions.sum(1).abs().max() < 1e-4, "samples left the zero-CoM subspace"


@pytest.mark.parametrize("sampler,steps", [("ancestral", 500), ("heun", 100), ("rk4", 25), ("dpm++2m", 25),
                                           ("dpm++2m-sde", 100)])
@pytest.mark.parametrize("change", [lambda s: -s, lambda s: 0.9 * s], ids=["sign-flipped", "10%-weak"])
def test_statistics_catch_a_broken_score(mixture, sampler, steps, change):
    model = Perturbed(mixture.model(LinearVP()), change)
    out = digfast.sample_batch(model, n=N_SAMPLES, steps=steps, sampler=sampler, seed=11, progress=False)
    assert not check_samples(mixture, out.positions).ok


@pytest.mark.parametrize("sampler", ["ancestral", "em", "heun", "rk4", "dpm++2m", "dpm++2m-sde"])
def test_result_does_not_depend_on_batch_size_or_split(mixture, sampler):
    model = mixture.model(LinearVP())
    kw = dict(steps=20, sampler=sampler, seed=3, progress=False)
    whole = digfast.sample_batch(model, n=23, batch_size=23, **kw).positions
    small = digfast.sample_batch(model, n=23, batch_size=5, **kw).positions
    head = digfast.sample_batch(model, n=9, **kw).positions
    tail = digfast.sample_batch(model, n=14, first_sample_id=9, **kw).positions
    torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=1e-5, atol=1e-5)


def test_seeds_are_reproducible_and_distinct(mixture):
    model = mixture.model(LinearVP())
    a = digfast.sample_batch(model, n=8, steps=10, seed=1, progress=False).positions
    b = digfast.sample_batch(model, n=8, steps=10, seed=1, progress=False).positions
    c = digfast.sample_batch(model, n=8, steps=10, seed=2, progress=False).positions
    assert torch.equal(a, b)
    assert (a - c).abs().min() > 0
    assert len({tuple(r.flatten().tolist()) for r in a}) == 8, "samples of one batch must differ"


@pytest.mark.parametrize("sampler", ["ancestral", "em", "euler", "heun", "rk4", "dpm++2m", "dpm++2m-sde"])
def test_padded_batch_gives_the_unpadded_samples(mixture, sampler, rng):
    """Real atoms first, then padding: the same noise reaches the real atoms, padding stays 0."""
    n, pad = 12, 3
    model = mixture.model(LinearVP())
    plain = digfast.sample_batch(model, n=n, steps=15, sampler=sampler, seed=4, progress=False).positions

    class Padded:
        schedule, system = model.schedule, type("S", (), {"n_atoms": mixture.n_atoms + pad, "spatial_dim": 3})()

        def score(self, x, t, mask=None):
            return model.score(x, t, mask)

    mask = torch.zeros(mixture.n_atoms + pad, dtype=torch.bool)
    mask[: mixture.n_atoms] = True
    padded = digfast.sample_batch(Padded(), n=n, steps=15, sampler=sampler, seed=4, progress=False, mask=mask)
    torch.testing.assert_close(padded.positions[:, : mixture.n_atoms], plain, rtol=1e-5, atol=1e-5)
    assert padded.positions[:, mixture.n_atoms:].abs().max() == 0


def test_bad_arguments_are_refused(mixture):
    model = mixture.model(LinearVP())
    with pytest.raises(ValueError, match="unknown sampler"):
        digfast.sample_batch(model, n=2, sampler="leapfrog", progress=False)
    with pytest.raises(ValueError, match="n must be"):
        digfast.sample_batch(model, n=0, progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        digfast.sample_batch(model, n=2, steps=0, progress=False)
    with pytest.raises(ValueError, match="mask must be"):
        digfast.sample_batch(model, n=2, steps=2, mask=torch.ones(3, dtype=torch.bool), progress=False)
    with pytest.raises(ValueError, match="at least one real atom"):
        digfast.sample_batch(model, n=2, steps=2, mask=torch.zeros(4, dtype=torch.bool), progress=False)
    with pytest.raises(ValueError, match="seed"):
        digfast.sample_batch(model, n=2, steps=2, seed=-1, progress=False)
    with pytest.raises(TypeError, match="score"):
        digfast.sample_batch(object(), mixture, n=2, progress=False)


def test_rk4_samples_encode_back_to_their_prior_draw(mixture):
    """rk4 solves the likelihood's ODE: encoding its samples (adaptive, tight tolerance) returns
    the prior draw they started from, far closer than a first-order solver's samples do."""
    from digfast.samplers import prior_sample

    model = mixture.model(LinearVP())
    t_min = 1e-3
    z = prior_sample(model.schedule, 6, torch.arange(40), mixture.n_atoms, 3)

    def latent_error(sampler):
        x = digfast.sample_batch(model, n=40, steps=40, sampler=sampler, seed=6, t_min=t_min, progress=False)
        res = digfast.log_likelihood(model, positions=x.positions, method="dopri5", rtol=1e-7, atol=1e-7,
                                     t_min=t_min)
        return float((res.latent.float() - z).norm(dim=(1, 2)).max() / z.norm(dim=(1, 2)).mean())

    rk4, euler = latent_error("rk4"), latent_error("euler")
    assert rk4 < 1e-3 and rk4 < euler / 50, (rk4, euler)
