"""Protein samplers: the public 500-step update against the public code's trajectory and
against a float64 reference of its rule, the SDE/ODE/DPM options on an exact Gaussian
target, and backbone + PDB/XTC output."""
import math

import numpy as np
import pytest
import torch

from digfast.models.protein import ProteinConfig, load_official_protein
from digfast.models.protein.fast import FastProteinModel
from digfast.protein import sampler, so3
from digfast.protein.backbone import backbone_atoms
from digfast.protein.engine import sample_protein

from protein_helpers import FIXTURE, SMALL, random_inputs, random_model


def public_rule_fp64(model64, single, pair, tr, rot):
    """The public update written out independently in float64: t = linspace(1, 0, 501)[:-1],
    tr += 2 sigma^2 ln(350) dt s_tr, R <- exp(4 sigma_r^2 ln(82.5) dt s_rot) R."""
    t = np.linspace(1, 0, 501)
    tr, rot = tr.double(), rot.double()
    for k in range(500):
        dt = t[k] - t[k + 1]
        sig, rsig = 0.1 ** (1 - t[k]) * 35 ** t[k], 0.02 ** (1 - t[k]) * 1.65 ** t[k]
        with torch.no_grad():
            T_eps, IR_eps = model64(tr, rot, torch.tensor([k]), single.double()[None], pair.double()[None])
        tr = tr + 2 * sig**2 * math.log(350) * dt * T_eps / sig
        v = 4 * rsig**2 * math.log(82.5) * dt * IR_eps * float(so3.score_norm(rsig))
        rot = torch.linalg.matrix_exp(torch.stack([
            torch.zeros_like(v[..., 0]), -v[..., 2], v[..., 1], v[..., 2], torch.zeros_like(v[..., 0]), -v[..., 0],
            -v[..., 1], v[..., 0], torch.zeros_like(v[..., 0])], -1).view(*v.shape, 3)) @ rot
    return tr, rot


def test_public_sampler_fast_fp32_matches_fp64_rule_500_steps(rng):
    """Same initial state, 500 steps: the fast path (network in fp32, frames integrated in
    fp64 as sample_protein does) ends within 1e-4 A (CA) and 1e-5 (rotation entries) of the
    float64 reference of the public rule. (The public code's all-fp32 state drifts further:
    1.2-1.8e-4 A with such random weights.)"""
    model = random_model(SMALL, rng)
    x = random_inputs(1, 7, rng)
    tr0, rot0 = sampler.initial_state(int(rng.initial_seed()) % 2**32, torch.tensor([3]), 7)
    ref_tr, ref_rot = public_rule_fp64(random_model_copy(model, torch.float64), x["single"], x["pair"], tr0, rot0)
    fast = FastProteinModel(model)
    ctx = fast.context(x["single"], x["pair"])
    tr, rot = sampler.run(lambda a, b, s: fast(ctx, a, b, s), tr0.double(), rot0.double(), sampler="public",
                          steps=500)
    moved = (ref_tr - tr0.double()).abs().max()
    assert moved > 1.0, "the structure must actually move"
    err_tr = (tr.double() - ref_tr).abs().max()
    err_rot = (rot.double() - ref_rot).abs().max()
    print(f"CA error {err_tr:.2e} A after moving {moved:.1f} A; rotation error {err_rot:.2e}")
    assert err_tr < 1e-4 and err_rot < 1e-5


def random_model_copy(model, dtype):
    from digfast.models.protein import ProteinScoreModel
    copy = ProteinScoreModel(model.cfg)
    copy.load_state_dict(model.state_dict())
    return copy.to(dtype).eval()


@pytest.mark.skipif(not FIXTURE.exists(), reason="public-code fixture not present")
def test_public_sampler_reproduces_public_code_trajectory():
    d = np.load(FIXTURE)
    cfg = ProteinConfig(d_model=int(d["config:d_model"]), d_pair=int(d["config:d_pair"]),
                        n_layers=int(d["config:n_layer"]), n_heads=int(d["config:n_heads"]))
    state = {k[len("param:"):]: torch.from_numpy(d[k]) for k in d.files if k.startswith("param:")}
    model = load_official_protein({"state_dict": state}, cfg)
    single, pair = torch.from_numpy(d["sample:single"]), torch.from_numpy(d["sample:pair"])
    keep = d["sample:keep_steps"].tolist()
    want_tr, want_rot = torch.from_numpy(d["sample:tr"]), torch.from_numpy(d["sample:rot"])
    fast = FastProteinModel(model)
    ctx = fast.context(single, pair)
    score = lambda a, b, s: fast(ctx, a, b, s)  # noqa: E731
    _, _, kept = sampler.run(score, want_tr[:1], want_rot[:1], keep_steps=keep)
    for i, k in enumerate(keep):  # whole trajectory: rounding drift grows slowly with k
        tol = 1e-5 + 1e-7 * k
        assert (kept[k][0][0] - want_tr[i]).abs().max() < 100 * tol, k
        assert (kept[k][1][0] - want_rot[i]).abs().max() < tol, k
    for i, k in enumerate(keep[:-1]):  # step by step from the public code's saved states
        if keep[i + 1] != k + 1:
            continue
        tr, rot = sampler.run(score, want_tr[i:i + 1], want_rot[i:i + 1], start=k, stop=k + 1)
        assert (tr[0] - want_tr[i + 1]).abs().max() < 2e-5 * max(1.0, float(want_tr[i + 1].abs().max()) / 10)
        assert (rot[0] - want_rot[i + 1]).abs().max() < 2e-6


def gaussian_score(s0):
    """Exact raw outputs for translations drawn from N(0, s0^2) (VE marginal N(0, s0^2 +
    sigma^2)): T_eps = sigma * score in the residue frame's global axes; no rotation signal."""
    sig = {k: s for k, s in zip(sampler.plan(sampler.ProteinSchedule(), 500).index,
                                sampler.plan(sampler.ProteinSchedule(), 500).sigma_tr)}

    def score(tr, rot, step):
        s = sig[step]
        return -tr * s / (s0**2 + s**2), torch.zeros_like(tr)
    return score


@pytest.mark.parametrize("name,steps,tol", [("ode", 500, 0.03), ("dpm2m", 20, 0.01), ("ode", 20, 0.2)])
def test_ode_solvers_follow_the_exact_gaussian_flow(name, steps, tol):
    """For a Gaussian target the probability-flow ODE scales tr by
    sqrt((s0^2 + sigma_min^2) / (s0^2 + sigma_max^2)); DPM++(2M) gets it with 20 steps, Euler
    with 20 steps does not (the test can tell)."""
    s0 = 3.0
    tr0 = torch.randn(2, 5, 3, dtype=torch.float64) * 35
    rot0 = so3.uniform_rotations(torch.randn(2, 5, 4, dtype=torch.float64))
    tr, rot = sampler.run(gaussian_score(s0), tr0, rot0, sampler=name, steps=steps)
    want = tr0 * math.sqrt((s0**2 + 0.1**2) / (s0**2 + 35**2))
    err = float(((tr - want).norm() / want.norm()))
    print(name, steps, err)
    if name == "ode" and steps == 20:
        assert err > 0.05
    else:
        assert err < tol
    assert torch.equal(rot, rot0)


def test_sde_reaches_the_gaussian_target_and_is_seeded(rng):
    """Translations from N(0, s0^2) with the exact score: the reverse SDE ends at variance
    s0^2 + sigma_min^2 (9000 coordinates: standard error 1.5%)."""
    s0 = 3.0
    ids = torch.arange(1500)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tr0 = sampler.initial_state(seed, ids, 2, dtype=torch.float64)[0]
    rot0 = torch.eye(3, dtype=torch.float64).expand(1500, 2, 3, 3)
    tr, rot = sampler.run(gaussian_score(s0), tr0, rot0, sampler="sde", steps=500, seed=seed + 1, sample_ids=ids)
    var = float(tr.var())
    print("variance ratio", var / (s0**2 + 0.01))
    assert abs(var / (s0**2 + 0.01) - 1) < 0.06, var
    # the same sample ids in another batch give the same structures
    tr_part, _ = sampler.run(gaussian_score(s0), tr0[100:110], rot0[100:110], sampler="sde", steps=500,
                             seed=seed + 1, sample_ids=ids[100:110])
    torch.testing.assert_close(tr_part, tr[100:110], rtol=0, atol=1e-12)
    # rotations get noise: no longer the identity
    assert (rot - torch.eye(3, dtype=torch.float64)).abs().max() > 0.1


def test_backbone_geometry(rng):
    tr = torch.randn(3, 6, 3, generator=rng, dtype=torch.float64) * 5
    rot = so3.uniform_rotations(torch.randn(3, 6, 4, generator=rng, dtype=torch.float64))
    atoms = backbone_atoms(tr, rot)
    n, ca, c, o = atoms.unbind(-2)
    assert torch.equal(ca, tr)
    torch.testing.assert_close((n - ca).norm(dim=-1), torch.full((3, 6), 1.45597958, dtype=torch.float64))
    torch.testing.assert_close((c - ca).norm(dim=-1), torch.full((3, 6), math.hypot(0.533655602, 1.42752619),
                                                                  dtype=torch.float64))
    torch.testing.assert_close((o - c).norm(dim=-1), torch.full((3, 6), 1.231, dtype=torch.float64))
    # local frame: N along x, C in the xy plane -> rot applied as IR^T
    torch.testing.assert_close(torch.einsum("...ij,...j->...i", rot, n - ca)[..., 1:], torch.zeros(3, 6, 2, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # O of the last residue: 120 +- 5 degrees from CA-C
    cos = ((o - c) * (ca - c)).sum(-1) / ((o - c).norm(dim=-1) * (ca - c).norm(dim=-1))
    ang = torch.rad2deg(torch.arccos(cos[:, -1]))
    assert ((ang > 115) & (ang < 126)).all(), ang


@pytest.mark.parametrize("suffix", [".xtc", ".pdb", ".npz"])
def test_sample_protein_writes_files_mdtraj_reads(tmp_path, rng, suffix):
    import mdtraj
    model = random_model(SMALL, rng)
    x = random_inputs(1, 5, rng)
    seq = "ACDEG"
    out = tmp_path / f"ens{suffix}"
    res = sample_protein(model, x["single"], x["pair"], n=5, steps=4, sampler="public", batch_size=2,
                         out=out, sequence=seq, seed=3)
    assert res.tr.shape == (5, 5, 3) and out.exists()
    if suffix == ".npz":
        data = np.load(out)
        np.testing.assert_allclose(data["tr"], res.tr.numpy())
        return
    traj = mdtraj.load(str(out), top=str(tmp_path / "ens_top.pdb") if suffix == ".xtc" else None)
    assert traj.n_frames == 5 and traj.n_atoms == 20
    assert [r.name for r in traj.topology.residues] == ["ALA", "CYS", "ASP", "GLU", "GLY"]
    # XTC stores 0.001 nm (0.01 A), PDB 0.001 A
    np.testing.assert_allclose(traj.xyz * 10, res.backbone().flatten(1, 2).numpy(),
                               atol=6e-3 if suffix == ".xtc" else 1e-3, rtol=0)
    assert not list(tmp_path.glob(".*partial*"))


def test_sample_protein_fast_equals_reference_path_and_batch_size(rng):
    model = random_model(SMALL, rng)
    x = random_inputs(1, 6, rng)
    kw = dict(n=3, steps=10, sampler="sde", seed=5)
    ref = sample_protein(model, x["single"], x["pair"], path="reference", **kw)
    a = sample_protein(model, x["single"], x["pair"], batch_size=3, **kw)
    b = sample_protein(model, x["single"], x["pair"], batch_size=2, **kw)
    # positions reach ~150 A, where a float32 ulp is 1.5e-5 A: the reference path keeps its state
    # in fp32 (10 roundings), and batch sizes change the GEMM blocking of the fp32 network
    tol = 16 * 2.0**-23 * float(ref.tr.abs().max())
    torch.testing.assert_close(a.tr, ref.tr, rtol=0, atol=tol)
    torch.testing.assert_close(a.tr, b.tr, rtol=0, atol=tol)
    assert a.metadata["batch_size"] == 3 and ref.metadata["batch_size"] == 1


def test_sample_protein_rejects_bad_arguments(rng):
    model = random_model(SMALL, rng)
    x = random_inputs(1, 4, rng)
    with pytest.raises(ValueError, match="unknown protein sampler"):
        sample_protein(model, x["single"], x["pair"], sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match="steps must be in 1..500"):
        sample_protein(model, x["single"], x["pair"], steps=501)
    with pytest.raises(ValueError, match="sequence has 3 residues"):
        sample_protein(model, x["single"], x["pair"], steps=2, sequence="AAA")
    with pytest.raises(ValueError, match=r"pair must be \(4, 4, 128\)"):
        sample_protein(model, x["single"], x["pair"][:3], steps=2)


def test_graph_step_coefficients_are_the_eager_update(rng):
    """The CUDA-graph step applies tr += c_tr T_eps, R <- exp(c_rot IR_eps) R with coefficients
    from step_coefficients: the same update as sampler.run, step by step (CPU check of the
    arithmetic; the capture itself runs on a GPU)."""
    from digfast.protein.graph import GraphedSampler, step_coefficients
    for name in ("public", "ode"):
        coef = step_coefficients(sampler.ProteinSchedule(), 50, name)
        tr = torch.randn(2, 4, 3, generator=rng, dtype=torch.float64) * 20
        rot = so3.uniform_rotations(torch.randn(2, 4, 4, generator=rng, dtype=torch.float64))
        T_eps = torch.randn(2, 4, 3, generator=rng, dtype=torch.float64)
        IR_eps = torch.randn(2, 4, 3, generator=rng, dtype=torch.float64)
        for k in (0, 17, 49):
            want = sampler.run(lambda a, b, s: (T_eps, IR_eps), tr, rot, sampler=name, steps=50, start=k, stop=k + 1)
            torch.testing.assert_close(tr + coef[k, 0] * T_eps, want[0], rtol=1e-13, atol=1e-12)
            torch.testing.assert_close(so3.expmap(coef[k, 1] * IR_eps) @ rot, want[1], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="deterministic samplers"):
        GraphedSampler(None, None, 1, sampler="sde")
    with pytest.raises(ValueError, match="need a CUDA device"):
        GraphedSampler(None, None, 1, device="cpu")


def test_sample_protein_keep_false_streams_only(tmp_path, rng):
    model = random_model(SMALL, rng)
    x = random_inputs(1, 4, rng)
    res = sample_protein(model, x["single"], x["pair"], n=3, steps=2, batch_size=2, out=tmp_path / "e.npz",
                         sequence="AAAA", keep=False)
    assert res.tr.shape[0] == 0 and np.load(tmp_path / "e.npz")["tr"].shape == (3, 4, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_matches_eager(rng):
    model = random_model(SMALL, rng)
    x = random_inputs(1, 37, rng)
    kw = dict(n=5, steps=500, sampler="public", seed=2, device="cuda", batch_size=5)
    eager = sample_protein(model, x["single"], x["pair"], cuda_graph=False, **kw)
    graphed = sample_protein(model, x["single"], x["pair"], **kw)
    assert graphed.metadata["cuda_graph"] and not eager.metadata["cuda_graph"]
    torch.testing.assert_close(graphed.tr, eager.tr, rtol=0, atol=1e-4)
    torch.testing.assert_close(graphed.rot, eager.rot, rtol=0, atol=1e-5)


def test_sde_rotations_reach_igso3_at_sigma_min(rng):
    """Rotations: data at the identity, so the noised IR is IGSO(3)(sigma_r) around it with
    exact score score_vec(sigma_r, log IR) (= IR_eps * E(sigma_r), as the model is trained).
    The reverse SDE from uniform rotations must end at IGSO(3)(0.02): its mean angle (from the
    series) within 6% (Euler-Maruyama at 500 steps is biased by about +2%, 1200 samples add a
    standard error of 1.2%; a wrong noise convention, e.g. g_r^2 = 2 sigma^2 ln(82.5), is off by
    ~30%); the noise-free public update must not (it has no noise to spread)."""
    from scipy.spatial.transform import Rotation
    sched = sampler.ProteinSchedule()
    p = sampler.plan(sched, 500)
    sig = dict(zip(p.index, p.sigma_rot))
    norm = dict(zip(p.index, p.score_norm))

    def score(tr, rot, step):
        v = torch.from_numpy(Rotation.from_matrix(rot.reshape(-1, 3, 3).numpy()).as_rotvec()).view(rot.shape[:-1])
        s = so3.score_vectors(sig[step], v.reshape(-1, 3)).view(v.shape)
        return torch.zeros_like(tr), s / norm[step]

    n = 1200
    ids = torch.arange(n)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tr0, rot0 = sampler.initial_state(seed, ids, 1, dtype=torch.float64)
    t = so3.compute_tables(eps=np.array([0.02]))
    pdf = np.gradient(t["cdf"][0])
    want = float((t["omega"] * pdf).sum() / pdf.sum())
    angles = {}
    for name in ("sde", "public"):
        _, rot = sampler.run(score, tr0, rot0, sampler=name, steps=500, seed=seed + 1, sample_ids=ids)
        angles[name] = float(np.linalg.norm(Rotation.from_matrix(rot.reshape(-1, 3, 3).numpy()).as_rotvec(), axis=-1).mean())
    print(angles, want)
    assert abs(angles["sde"] / want - 1) < 0.06
    assert angles["public"] < 0.5 * want
