"""Philox4x32-10 + Box-Muller noise (digfast/ops/philox.py): known answers, statistics, and
the keying that makes a sample's noise independent of the batch it runs in."""
import math

import pytest
import torch

from digfast.ops.philox import (STREAM_PRIOR, STREAM_PROBE, STREAM_STEP, check_seed,
                                philox4x32, philox_normal)

# Random123 known-answer vectors for Philox4x32-10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers_reference(counter, key, expected):
    words = philox4x32(tuple(torch.tensor(c) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def test_philox_known_answers_broadcast():
    # The reference works on broadcast tensors: all three vectors in one call.
    counter = [torch.tensor([kat[0][i] for kat in KNOWN_ANSWERS]) for i in range(4)]
    for i, (_, key, expected) in enumerate(KNOWN_ANSWERS):
        words = philox4x32(tuple(c[i:i + 1] for c in counter), key)
        assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_known_answers_compiled(counter, key, expected):
    C = pytest.importorskip("digfast._C")
    assert C.philox4x32_10(counter, key) == expected


# ---- statistics ------------------------------------------------------------------------
# 64 samples x 4096 elements = 262144 draws per seed. Bounds are ~6 standard errors of each
# statistic for n independent N(0, 1) draws: tight enough that a biased or correlated
# generator fails them, loose enough that a correct one fails with probability ~1e-9.

N_IDS, NUMEL = 64, 4096


def _draws(seed, step=7, stream=STREAM_STEP, ids=None):
    ids = torch.arange(N_IDS) if ids is None else ids
    return philox_normal(seed, ids, step, stream, NUMEL)


@pytest.mark.parametrize("seed", [0, 12345, 2**32 + 1, 2**64 - 1])
def test_normal_moments(seed):
    z = _draws(seed).double().flatten()
    n = z.numel()
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z**3).mean()) < 6 * math.sqrt(15 / n)         # skewness 0
    assert abs((z**4).mean() - 3) < 6 * math.sqrt(96 / n)     # kurtosis 3
    # Kolmogorov-Smirnov against the normal CDF (1.95/sqrt(n) is the 0.1% critical value).
    s, _ = z.sort()
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max()
    assert ks < 1.95 / math.sqrt(n)
    # tails: P(|z| > 3) = 0.0027
    p3 = (z.abs() > 3).double().mean()
    assert abs(p3 - 0.0026998) < 6 * math.sqrt(0.0027 / n)


def test_each_box_muller_lane_is_standard_normal():
    z = _draws(99).double().reshape(-1, 4)  # lanes: r cos, r sin of (w0, w1); of (w2, w3)
    n = z.shape[0]
    assert (z.mean(0).abs() < 6 / math.sqrt(n)).all()
    assert ((z.var(0) - 1).abs() < 6 * math.sqrt(2 / n)).all()
    corr = torch.corrcoef(z.T)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 6 / math.sqrt(n)
    # cos/sin of one pair share the radius: their squares must still be uncorrelated
    sq = torch.corrcoef((z**2).T)[~torch.eye(4, dtype=torch.bool)]
    assert sq.abs().max() < 6 * math.sqrt(2) / math.sqrt(n)


def _max_offdiag_corr(a, b):
    """Largest |correlation| between a row of a and a row of b (rows: one sample each)."""
    a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True)
    b = (b - b.mean(1, keepdim=True)) / b.std(1, keepdim=True)
    c = a.double() @ b.double().T / (a.shape[1] - 1)
    return c


def test_independent_across_sample_ids():
    z = _draws(5)
    c = _max_offdiag_corr(z, z)
    off = c[~torch.eye(N_IDS, dtype=torch.bool)]
    # each entry ~ N(0, 1/NUMEL); 6.5 sigma over 2016 distinct pairs
    assert off.abs().max() < 6.5 / math.sqrt(NUMEL)


@pytest.mark.parametrize("other", [dict(step=8), dict(stream=STREAM_PRIOR),
                                   dict(stream=STREAM_PROBE), dict(seed=5 + 2**32)])
def test_independent_across_steps_streams_and_seed_words(other):
    base = dict(seed=5, step=7, stream=STREAM_STEP)
    z1 = _draws(**base)
    z2 = _draws(**{**base, **other})
    assert not torch.equal(z1, z2)
    c = _max_offdiag_corr(z1, z2)  # all N_IDS^2 pairs, including the same sample id
    assert c.abs().max() < 6.5 / math.sqrt(NUMEL)


def test_no_serial_correlation_along_elements():
    z = _draws(17).double()
    n = z[:, :-4].numel()
    for lag in (1, 2, 3, 4, 5, 8):
        r = (z[:, :-lag] * z[:, lag:]).mean()
        assert abs(r) < 6 / math.sqrt(n), lag


# ---- keying: a sample's noise is a function of (seed, id, step, stream, element) ------

def test_noise_does_not_depend_on_row_or_other_rows(rng):
    ids = torch.randint(0, 2**32, (9,), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng)) * 3
    full = philox_normal(seed, ids, 11, STREAM_STEP, 50)
    perm = torch.randperm(9, generator=rng)
    assert torch.equal(philox_normal(seed, ids[perm], 11, STREAM_STEP, 50), full[perm])
    for i in (0, 4, 8):
        alone = philox_normal(seed, ids[i:i + 1], 11, STREAM_STEP, 50)
        assert torch.equal(alone[0], full[i])
    # the other rows' values do not matter, and a repeated id repeats its noise
    dup = philox_normal(seed, torch.stack([ids[3], ids[3], ids[0]]), 11, STREAM_STEP, 50)
    assert torch.equal(dup[0], full[3]) and torch.equal(dup[1], full[3])
    assert torch.equal(dup[2], full[0])


def test_noise_prefix_is_independent_of_numel():
    # element e of a row is fixed by e alone, so a longer row extends a shorter one
    ids = torch.tensor([0, 1, 2**32 - 1])
    long = philox_normal(3, ids, 0, STREAM_STEP, 37)
    for numel in (1, 2, 3, 4, 5, 13):
        assert torch.equal(philox_normal(3, ids, 0, STREAM_STEP, numel), long[:, :numel])


def test_empty_batch_and_shapes():
    z = philox_normal(1, torch.zeros(0, dtype=torch.int64), 0, STREAM_STEP, 7)
    assert z.shape == (0, 7) and z.dtype == torch.float32
    z = philox_normal(1, torch.arange(3), 0, STREAM_STEP, 6)
    assert z.shape == (3, 6) and z.is_contiguous()


def test_rejects_out_of_range_seed_and_ids():
    with pytest.raises(ValueError, match="seed"):
        check_seed(-1)
    with pytest.raises(ValueError, match="seed"):
        check_seed(2**64)
    with pytest.raises(ValueError, match="sample ids"):
        philox_normal(0, torch.tensor([2**32]), 0, STREAM_STEP, 4)
    with pytest.raises(ValueError, match="sample ids"):
        philox_normal(0, torch.tensor([-1]), 0, STREAM_STEP, 4)


# ---- the compiled CPU generator (digfast._C.philox_normal_cpu) ----------------------------

def _spec_normals_f64(seed, ids, step, stream, numel):
    """The specification in float64: u and theta rounded to float32 as specified, then exact
    log, sqrt, cos and sin. Returns (z, radius) of shape (len(ids), numel)."""
    n_blocks = (numel + 3) // 4
    w = philox4x32((torch.arange(n_blocks).reshape(1, -1), torch.tensor(step),
                    ids.reshape(-1, 1), torch.tensor(stream)), (seed & 0xFFFFFFFF, seed >> 32))
    w = torch.broadcast_tensors(*w)
    zs, rs = [], []
    for w_r, w_t in ((w[0], w[1]), (w[2], w[3])):
        u = (w_r.to(torch.float32) + 1.0) * 2.0**-32
        theta = (w_t.to(torch.float32) * 2.0**-32) * 6.2831855
        r = torch.sqrt(-2.0 * torch.log(u.double()))
        zs += [r * torch.cos(theta.double()), r * torch.sin(theta.double())]
        rs += [r, r]
    z = torch.stack(zs, -1).reshape(len(ids), -1)[:, :numel]
    r = torch.stack(rs, -1).reshape(len(ids), -1)[:, :numel]
    return z, r


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 63, 64, 65, 1000])
def test_compiled_normals_are_accurate(rng, numel):
    """Both the torch reference (Sleef) and the C++ generator (vectorized log/sincos) are within
    4 float32 rounding units (2^-24) of the radius of the float64 specification; that is the
    float32 floor here (the rounding of u, r, and the products alone gives ~3)."""
    C = pytest.importorskip("digfast._C")
    ids = torch.randint(0, 2**32, (16,), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng)) * 4 + 1
    step = int(torch.randint(0, 2**32, (), generator=rng))
    out = torch.empty(16, numel)
    C.philox_normal_cpu(out=out, seed=seed, sample_ids=ids, step=step, stream=STREAM_PROBE,
                        num_threads=2)
    ref = philox_normal(seed, ids, step, STREAM_PROBE, numel)
    z64, radius = _spec_normals_f64(seed, ids, step, STREAM_PROBE, numel)
    bound = 4 * 2.0**-24 * radius + 1e-30
    assert ((ref.double() - z64).abs() <= bound).all()
    assert ((out.double() - z64).abs() <= bound).all()


def test_compiled_normals_many_draws(rng):
    C = pytest.importorskip("digfast._C")
    ids = torch.arange(8) * 1000003
    out = torch.empty(8, 50_000)
    C.philox_normal_cpu(out=out, seed=2**64 - 1, sample_ids=ids, step=0, stream=STREAM_STEP,
                        num_threads=2)
    z64, radius = _spec_normals_f64(2**64 - 1, ids, 0, STREAM_STEP, 50_000)
    assert ((out.double() - z64).abs() <= 4 * 2.0**-24 * radius + 1e-30).all()
    # and the threads split rows without changing them
    one = torch.empty_like(out)
    C.philox_normal_cpu(out=one, seed=2**64 - 1, sample_ids=ids, step=0, stream=STREAM_STEP,
                        num_threads=1)
    assert torch.equal(one, out)


def test_compiled_normals_check_inputs():
    C = pytest.importorskip("digfast._C")
    ids = torch.arange(3)
    with pytest.raises(ValueError, match=r"out must be \(batch, numel\)"):
        C.philox_normal_cpu(out=torch.empty(3), seed=0, sample_ids=ids, step=0, stream=0,
                            num_threads=1)
    with pytest.raises(TypeError, match="out must have dtype torch.float32"):
        C.philox_normal_cpu(out=torch.empty(3, 4, dtype=torch.float64), seed=0, sample_ids=ids,
                            step=0, stream=0, num_threads=1)
    with pytest.raises(ValueError, match=r"sample_ids must have shape \(2,\)"):
        C.philox_normal_cpu(out=torch.empty(2, 4), seed=0, sample_ids=ids, step=0, stream=0,
                            num_threads=1)
    with pytest.raises(ValueError, match=r"stream must be in \[0, 2\*\*32\)"):
        C.philox_normal_cpu(out=torch.empty(3, 4), seed=0, sample_ids=ids, step=0, stream=-1,
                            num_threads=1)
    with pytest.raises(ValueError, match=r"sample_ids must lie in \[0, 2\*\*32\)"):
        C.philox_normal_cpu(out=torch.empty(3, 4), seed=0, sample_ids=ids - 1, step=0,
                            stream=0, num_threads=1)
