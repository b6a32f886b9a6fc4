"""Numerical faults and validity filters in sample_batch: detection per sample, reproducible
redraws with derived seeds, dropping, counting, and out-of-memory batch back-off."""
import logging

import pytest
import torch

import digfast
from digfast.validity import BondLengths, Clashes, EnergyCutoff, all_of, redraw_seed

STEPS = 8


class Unstable:
    """The exact mixture score, except NaN for the whole trajectory of any sample whose prior
    draw has x[0, 0] > 0.8 (~20% of samples). The fault depends on the sample alone, as a
    real instability would, never on its batch."""

    def __init__(self, threshold=0.8):
        self.inner = digfast.load("mixture")
        self.schedule, self.system, self.threshold = self.inner.schedule, self.inner.system, threshold

    def score(self, x, t, mask=None):
        s = self.inner.score(x, t)
        at_start = t >= self.schedule.t_max - 1e-6
        if at_start.all():
            self.doomed = x[:, 0, 0] > self.threshold
        return torch.where(self.doomed[:, None, None], torch.nan, s)


def plain(n, seed, first=0):
    return digfast.sample_batch(digfast.load("mixture"), n=n, steps=STEPS, seed=seed, first_sample_id=first,
                                progress=False).positions


def failing_ids(n, seed):
    """Which samples Unstable breaks on the first draw: decided by the prior alone."""
    from digfast.samplers import prior_sample

    model = digfast.load("mixture")
    x0 = prior_sample(model.schedule, seed, torch.arange(n), 4, 3)
    return torch.nonzero(x0[:, 0, 0] > 0.8).flatten()


def test_nonfinite_samples_are_redrawn_with_derived_seeds():
    n, seed = 40, 3
    bad = failing_ids(n, seed)
    assert 0 < len(bad) < n // 2
    out = digfast.sample_batch(Unstable(), n=n, steps=STEPS, seed=seed, batch_size=7, progress=False)
    assert out.positions.shape == (n, 4, 3) and torch.isfinite(out.positions).all()
    meta = out.metadata
    assert meta["n_redrawn"] == len(bad) and meta["n_dropped"] == 0 and meta["n_nonfinite"] >= len(bad)
    good = torch.ones(n, dtype=torch.bool)
    good[bad] = False
    assert torch.equal(out.positions[good], plain(n, seed)[good])  # untouched samples are the plain ones
    for k in bad.tolist():  # a redrawn sample is sample k of the first derived seed that works
        for attempt in range(1, meta["max_attempts"]):
            s = redraw_seed(seed, attempt)
            if k not in (failing_ids(k + 1, s)).tolist():
                assert torch.equal(out.positions[k], plain(1, s, first=k)[0])
                break


def test_redraws_do_not_depend_on_batch_size_or_split():
    kw = dict(steps=STEPS, seed=5, progress=False)
    whole = digfast.sample_batch(Unstable(), n=30, batch_size=30, **kw).positions
    small = digfast.sample_batch(Unstable(), n=30, batch_size=4, **kw).positions
    head = digfast.sample_batch(Unstable(), n=11, **kw).positions
    tail = digfast.sample_batch(Unstable(), n=19, first_sample_id=11, **kw).positions
    assert torch.equal(whole, small) and torch.equal(whole, torch.cat([head, tail]))


def test_drop_removes_and_lists_broken_samples():
    n, seed = 40, 3
    bad = failing_ids(n, seed)
    out = digfast.sample_batch(Unstable(), n=n, steps=STEPS, seed=seed, on_nonfinite="drop", progress=False)
    assert len(out) == n - len(bad) and out.metadata["dropped_sample_ids"] == bad.tolist()
    assert out.metadata["n_nonfinite"] == len(bad) and out.metadata["n_redrawn"] == 0


def test_keep_returns_broken_samples_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="digfast"):
        out = digfast.sample_batch(Unstable(), n=20, steps=STEPS, seed=3, on_nonfinite="keep", progress=False)
    n_bad = len(failing_ids(20, 3))
    assert int((~torch.isfinite(out.positions)).flatten(1).any(1).sum()) == n_bad == out.metadata["n_nonfinite"]
    assert "NaN/inf" in caplog.text


def test_exhausted_redraws_are_dropped():
    always = Unstable(threshold=-1e9)
    out = digfast.sample_batch(always, n=5, steps=STEPS, max_attempts=3, progress=False)
    assert len(out) == 0 and out.metadata["n_dropped"] == 5 and out.metadata["n_nonfinite"] == 15


def test_energy_cutoff_keeps_sampling_until_n_valid():
    model = digfast.load("mixture")
    reference = plain(60, 9)
    cutoff = float(model.system.energy(reference).median())  # rejects about half
    out = digfast.sample_batch(model, n=60, steps=STEPS, seed=9, validity=EnergyCutoff(cutoff),
                               on_invalid="redraw", max_attempts=50, progress=False)
    assert len(out) == 60 and (model.system.energy(out.positions) <= cutoff).all()
    n_high = int((model.system.energy(reference) > cutoff).sum())
    assert out.metadata["n_redrawn"] == n_high and out.metadata["n_invalid"] >= n_high
    dropped = digfast.sample_batch(model, n=60, steps=STEPS, seed=9, validity=EnergyCutoff(cutoff), progress=False)
    assert len(dropped) == 60 - n_high
    assert torch.equal(dropped.positions, reference[model.system.energy(reference) <= cutoff])


class Chain:
    """Three atoms bonded 0-1-2 plus a free atom 3, for bond and clash checks."""
    name, n_atoms, spatial_dim = "chain", 4, 3
    bonds = torch.tensor([[0, 1], [1, 2]])

    def structure(self):
        return torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [0.0, 3.0, 0]]])


def test_bond_and_clash_checks():
    system = Chain()
    ok = system.structure()
    stretched = ok.clone()
    stretched[0, 2, 0] = 2.8  # bond 1-2 at 1.8
    clash = ok.clone()
    clash[0, 3] = torch.tensor([2.0, 0.3, 0.0])  # atom 3 (unbonded) 0.3 from atom 2
    near_13 = ok.clone()
    near_13[0, 2] = torch.tensor([1.0 - 0.8660254, 0.5, 0.0])  # bond 1-2 still 1, but 0.52 from atom 0:
    assert (near_13[0, 2] - near_13[0, 0]).norm() < 0.8       # 1-3 neighbours, so not a clash
    x = torch.cat([ok, stretched, clash, near_13])
    assert BondLengths(0.5)(x, system).tolist() == [True, False, True, True]
    assert Clashes(0.8)(x, system).tolist() == [True, True, False, True]
    both = all_of(BondLengths(0.5), Clashes(0.8))
    assert both(x, system).tolist() == [True, False, False, True]
    nan = ok.clone()
    nan[0, 0, 0] = torch.nan
    assert not BondLengths(0.5)(nan, system).item() and not Clashes(0.8)(nan, system).item()


def test_validity_check_must_return_one_bool_per_sample():
    model = digfast.load("mixture")
    with pytest.raises(TypeError, match=r"must return a \(4,\) bool tensor"):
        digfast.sample_batch(model, n=4, steps=2, validity=lambda x, s: torch.ones(3, dtype=torch.bool),
                             progress=False)
    with pytest.raises(TypeError, match="has no energy function"):
        EnergyCutoff(1.0)(torch.zeros(1, 4, 3), Chain())


def test_redraw_seeds_are_distinct_and_reproducible():
    seeds = [redraw_seed(0, a) for a in range(100)]
    assert seeds[0] == 0 and len(set(seeds)) == 100 and all(0 <= s < 2**64 for s in seeds)
    assert redraw_seed(2**64 - 1, 3) == redraw_seed(2**64 - 1, 3) != redraw_seed(2**64 - 2, 3)


def test_out_of_memory_halves_the_batch_and_keeps_the_samples():
    class SmallMemory:
        def __init__(self):
            self.inner = digfast.load("mixture")
            self.schedule, self.system = self.inner.schedule, self.inner.system

        def score(self, x, t, mask=None):
            if x.shape[0] > 5:
                raise torch.OutOfMemoryError("fake: batch too large")
            return self.inner.score(x, t)

    out = digfast.sample_batch(SmallMemory(), n=23, steps=STEPS, seed=2, batch_size=23, progress=False)
    assert out.metadata["batch_size"] == 5
    assert torch.equal(out.positions, plain(23, 2))
