"""Alanine dipeptide helpers and shipped reference (no MD here: the data come from
scripts/alanine_reference.py)."""
import json
import math

import mdtraj
import numpy as np
import pytest
import torch

from digfast.systems import alanine as ala


def _angle_diff(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


@pytest.fixture(scope="module")
def pdb():
    return mdtraj.load(str(ala.PDB_PATH))


@pytest.fixture(scope="module")
def conformations(pdb):
    """The PDB plus randomly rotated phi/psi bonds: many angles, all quadrants."""
    rng = np.random.default_rng(7)
    base = pdb.xyz[0].astype(np.float64) * 10.0
    out = [base]
    # atoms moving with a rotation about N-CA (phi) and CA-C (psi): those past the bond
    phi_side = [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    psi_side = [15, 16, 17, 18, 19, 20, 21]
    for _ in range(200):
        x = base.copy()
        for (a, b), side in (((6, 8), phi_side), ((8, 14), psi_side)):
            axis = x[b] - x[a]
            axis /= np.linalg.norm(axis)
            t = rng.uniform(-math.pi, math.pi)
            v = x[side] - x[b]
            x[side] = (x[b] + v * math.cos(t) + np.cross(axis, v) * math.sin(t)
                       + axis * (v @ axis)[:, None] * (1 - math.cos(t)))
        out.append(x)
    return np.stack(out)


def test_phi_psi_of_shipped_pdb_matches_mdtraj(pdb):
    phi, psi = ala.phi_psi(pdb.xyz * 10.0)
    idx_phi, md_phi = mdtraj.compute_phi(pdb)
    idx_psi, md_psi = mdtraj.compute_psi(pdb)
    assert tuple(idx_phi[0]) == ala.PHI_ATOMS and tuple(idx_psi[0]) == ala.PSI_ATOMS
    assert _angle_diff(phi, np.degrees(md_phi[:, 0])).max() < 1e-3
    assert _angle_diff(psi, np.degrees(md_psi[:, 0])).max() < 1e-3


def test_phi_psi_numpy_torch_mdtraj_agree(pdb, conformations):
    traj = mdtraj.Trajectory((conformations / 10.0).astype(np.float32), pdb.topology)
    md_phi = np.degrees(mdtraj.compute_phi(traj)[1][:, 0])
    md_psi = np.degrees(mdtraj.compute_psi(traj)[1][:, 0])
    phi, psi = ala.phi_psi(conformations)
    assert phi.shape == (len(conformations),)
    assert phi.min() >= -180 and phi.max() < 180 and psi.min() >= -180 and psi.max() < 180
    assert _angle_diff(phi, md_phi).max() < 1e-2 and _angle_diff(psi, md_psi).max() < 1e-2
    # all quadrants are visited by the random rotations
    assert (phi > 0).any() and (phi < 0).any() and (psi > 0).any() and (psi < 0).any()
    x = torch.tensor(conformations, requires_grad=True)
    tphi, tpsi = ala.phi_psi(x)
    assert isinstance(tphi, torch.Tensor)
    assert _angle_diff(tphi.detach().numpy(), phi).max() < 1e-8
    assert _angle_diff(tpsi.detach().numpy(), psi).max() < 1e-8
    (torch.sin(torch.deg2rad(tphi)).sum() + torch.cos(torch.deg2rad(tpsi)).sum()).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        ala.phi_psi(np.zeros((3, 21, 3)))


def test_basins_on_hand_made_angles():
    cases = {  # (phi, psi) -> basin
        (-150, 160): "C5", (-170, -170): "C5", (-130, 125): "C5", (-179.9, 179.9): "C5",
        (-80, 70): "C7eq", (-100, 140): "C7eq", (-150, 80): "C7eq", (-10, 40): "C7eq",
        (-70, 160): "PII", (-60, -175): "PII", (-110, 150): "PII",
        (-70, -40): "alphaR", (-150, -60): "alphaR",
        (70, -70): "C7ax", (60, -160): "C7ax", (60, 40): "alphaL", (100, 170): "alphaL",
        (179, 170): "other", (130, -60): "other",
    }
    phi = np.array([k[0] for k in cases], float)
    psi = np.array([k[1] for k in cases], float)
    labels = [ala.BASINS[i] for i in ala.basin_labels(phi, psi)]
    assert labels == list(cases.values())
    # periodicity: the same points shifted by 360 degrees
    assert (ala.basin_labels(phi + 360, psi - 360) == ala.basin_labels(phi, psi)).all()
    pops = ala.basin_populations(phi, psi)
    assert abs(sum(pops[b] for b in ala.BASINS) - 1) < 1e-12
    n = len(cases)
    assert pops["C5"] == pytest.approx(4 / n) and pops["C7eq"] == pytest.approx(4 / n)
    assert pops["phi_pos"] == pytest.approx(6 / n)
    assert pops["phi_pos_0_120"] == pytest.approx(4 / n)  # (179, 170), (130, -60) are not
    # weights: all mass on one point; torch input works too
    w = np.zeros(len(phi))
    w[list(cases).index((-80, 70))] = 5.0
    pw = ala.basin_populations(torch.tensor(phi), torch.tensor(psi), torch.tensor(w))
    assert pw["C7eq"] == 1.0 and pw["C5"] == 0.0
    with pytest.raises(ValueError):
        ala.basin_populations(phi, psi, np.ones(3))
    with pytest.raises(ValueError):
        ala.basin_populations(phi, psi, -np.ones(len(phi)))


def test_js_divergence_properties():
    rng = np.random.default_rng(0)
    a, b = rng.random((36, 36)), rng.random((36, 36))
    assert ala.js_divergence(a, a) == pytest.approx(0.0, abs=1e-15)
    assert ala.js_divergence(a, 3.0 * a) == pytest.approx(0.0, abs=1e-12)  # normalised
    assert ala.js_divergence(a, b) == pytest.approx(ala.js_divergence(b, a), rel=1e-12)
    assert 0 < ala.js_divergence(a, b) < math.log(2)
    p, q = np.array([1.0, 0, 0]), np.array([0, 0.5, 0.5])  # disjoint supports: the bound
    assert ala.js_divergence(p, q) == pytest.approx(math.log(2), rel=1e-12)
    assert ala.js_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(
        0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75))
    with pytest.raises(ValueError):
        ala.js_divergence(np.ones(3), np.ones(4))
    # histogram + floor: two samples of one distribution are closer than disjoint ones
    phi, psi = rng.uniform(-180, 180, 20000), rng.normal(0, 30, 20000)
    h = ala.ramachandran_histogram(phi, psi)
    assert h.shape == (36, 36) and h.sum() == pytest.approx(1.0)
    floor, sd = ala.js_noise_floor(phi, psi, 2000, repeats=5)
    assert 0 < floor < 0.2 and sd >= 0
    half = len(phi) // 2
    js = ala.js_divergence(ala.ramachandran_histogram(phi[:half], psi[:half]),
                           ala.ramachandran_histogram(phi[half:], psi[half:]))
    assert js < 3 * ala.js_noise_floor(phi, psi, half, repeats=5)[0]


def test_system_attributes(pdb):
    s = ala.AlanineDipeptide()
    assert (s.name, s.n_atoms, s.spatial_dim, s.length_unit_nm) == ("alanine-dipeptide", 22, 3, 0.1)
    assert s.atom_types.shape == (22,) and s.atom_types.dtype == torch.long
    assert [ala.ELEMENTS[i] for i in s.atom_types] == [a.element.symbol for a in pdb.topology.atoms]
    assert s.bonds.shape == (21, 2)
    assert sorted(map(tuple, s.bonds.tolist())) == sorted(
        (min(a.index, b.index), max(a.index, b.index)) for a, b in s.topology.bonds)
    assert s.topology.n_atoms == 22 and s.structure().shape == (1, 22, 3)
    x = s.reference_samples(7, seed=1)
    assert x.shape == (7, 22, 3) and torch.equal(x, s.reference_samples(7, seed=1))


def test_shipped_reference_shapes_and_populations():
    ref = ala.load_reference()
    n = ref["positions"].shape[0]
    assert ref["positions"].shape == (n, 22, 3) and ref["positions"].dtype == np.float32
    assert 10000 <= n <= 20000
    for k in ("phi", "psi", "energy_kT"):
        assert ref[k].shape == (n,)
    m = ref["all_phi"].shape[0]
    assert m >= n and ref["all_psi"].shape == (m,) and ref["all_log_weight"].shape == (m,)
    assert np.abs(ref["positions"].mean(axis=1)).max() < 1e-4  # centred
    # stored angles are those of the stored positions
    phi, psi = ala.phi_psi(ref["positions"][:500])
    assert _angle_diff(phi, ref["phi"][:500]).max() < 0.05
    assert _angle_diff(psi, ref["psi"][:500]).max() < 0.05
    # bond lengths are physical (Angstrom)
    b = ala.AlanineDipeptide().bonds.numpy()
    d = np.linalg.norm(ref["positions"][:, b[:, 0]] - ref["positions"][:, b[:, 1]], axis=-1)
    assert 0.9 < d.min() and d.max() < 1.7
    info = json.loads(str(ref["info"]))
    conv = info["convergence"]
    # the equally weighted positions reproduce the weighted populations of the whole run
    pos = ala.basin_populations(ref["phi"], ref["psi"])
    weighted = ala.basin_populations(ref["all_phi"], ref["all_psi"],
                                     np.exp(ref["all_log_weight"] - ref["all_log_weight"].max()))
    for k in ("C5", "C7eq"):
        assert abs(pos[k] - conv["populations"][k]["all"]) < 0.03
        assert abs(weighted[k] - conv["populations"][k]["all"]) < 0.01
    assert 0.003 < conv["populations"]["phi_pos_0_120"]["all"] < 0.05
    # the packed set is stratified by basin: its shares equal the weighted ones to 1/n
    for k in ala.BASINS + ("phi_pos",):
        assert abs(pos[k] - weighted[k]) < 2.0 / n
    assert conv["converged"]


@pytest.fixture(scope="module")
def openmm_mod():
    openmm = pytest.importorskip("openmm")
    import openmm.app  # noqa: F401
    import openmm.unit  # noqa: F401

    return openmm


def test_energy_of_pdb_matches_openmm(openmm_mod, pdb):
    app, unit = openmm_mod.app, openmm_mod.unit
    prmtop = app.AmberPrmtopFile(str(ala.PRMTOP_PATH))
    system = prmtop.createSystem(nonbondedMethod=app.NoCutoff)
    assert not any("GB" in f.__class__.__name__ for f in system.getForces())
    ctx = openmm_mod.Context(system, openmm_mod.VerletIntegrator(0.001),
                             openmm_mod.Platform.getPlatformByName("Reference"))
    ctx.setPositions(app.PDBFile(str(ala.PDB_PATH)).getPositions())
    e_kj = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    kT = (unit.MOLAR_GAS_CONSTANT_R * 300 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    assert ala.KT_KJ_MOL == pytest.approx(kT, rel=1e-12)
    s = ala.AlanineDipeptide()
    x = s.structure()
    e = s.energy(x)
    assert e.shape == (1,) and e.dtype == torch.float64
    assert float(e[0]) == pytest.approx(e_kj / kT, abs=1e-4)  # mdtraj reads float32
    assert -60 < float(e[0]) < -40  # the minimised ff96 structure, about -118.4 kJ/mol
    # force = -grad energy (central differences on a few coordinates)
    f = s.force(x)[0]
    h = 1e-4
    for atom, dim in ((4, 0), (8, 1), (16, 2)):
        xp, xm = x.clone(), x.clone()
        xp[0, atom, dim] += h
        xm[0, atom, dim] -= h
        fd = -(s.energy(xp) - s.energy(xm)) / (2 * h)
        assert float(fd[0]) == pytest.approx(float(f[atom, dim]), rel=1e-3, abs=1e-3)
    with pytest.raises(ValueError):
        s.energy(torch.zeros(2, 21, 3))


def test_reference_energies_match_energy_function():
    """The torch energy against the MD run's own (OpenMM) energies, stored with the reference."""
    ref = ala.load_reference()
    s = ala.AlanineDipeptide()
    idx = np.linspace(0, len(ref["positions"]) - 1, 20).astype(int)
    e = s.energy(torch.from_numpy(ref["positions"][idx]).double()).numpy()
    # MD energies with HBonds constraints (X-H at r0: no bond energy) = flexible energy
    assert np.abs(e - ref["energy_kT"][idx]).max() < 1e-2


def test_thermalised_bonds_follow_the_flexible_force_field(openmm_mod):
    """Constrained X-H bonds (exactly r0 in the reference) spread to their harmonic 300 K width
    sqrt(kT / k) (OpenMM: E = k/2 (r - r0)^2); the conformation stays; a seed repeats."""
    ref = ala.load_reference()["positions"]
    frames = ref[np.linspace(0, len(ref) - 1, 60).astype(int)]
    _, system = ala.openmm_system()
    bonds = next(f for f in system.getForces() if isinstance(f, openmm_mod.HarmonicBondForce))
    i, j, r0, k = bonds.getBondParameters(next(b for b in range(bonds.getNumBonds())
                                               if 0 in bonds.getBondParameters(b)[:2]))  # HH31-CH3
    r0, k = r0.value_in_unit(openmm_mod.unit.angstrom), k.value_in_unit(
        openmm_mod.unit.kilojoule_per_mole / openmm_mod.unit.angstrom**2)
    before = np.linalg.norm(frames[:, i] - frames[:, j], axis=-1)
    assert np.abs(before - r0).max() < 1e-3  # constrained
    out = ala.thermalise_bonds(frames, seed=3)
    length = np.linalg.norm(out[:, i] - out[:, j], axis=-1)
    width = np.sqrt(ala.KT_KJ_MOL / k)
    # 60 draws: the sample std is within ~25% of the true one (chi-square, far beyond 3 sigma)
    assert 0.7 * width < length.std() < 1.3 * width, (length.std(), width)
    assert abs(length.mean() - r0) < 4 * width / np.sqrt(60)
    phi0, _ = ala.phi_psi(frames.astype(np.float64))
    phi1, _ = ala.phi_psi(out)
    assert np.median(np.abs((phi1 - phi0 + 180) % 360 - 180)) < 20  # degrees
    np.testing.assert_array_equal(ala.thermalise_bonds(frames[:3], seed=3), out[:3])
    with pytest.raises(ValueError, match="positions"):
        ala.thermalise_bonds(frames[:, :21])


def test_chirality_canonicalise_and_broken_bonds(rng):
    system = ala.AlanineDipeptide()
    x = system.reference_samples(200, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    assert (ala.chirality(x) == 1).all()  # the reference is L-alanine throughout
    flip = torch.rand(200, generator=rng) < 0.5
    mixed = torch.where(flip[:, None, None], -x, x)
    assert torch.equal(ala.chirality(mixed) == -1, flip)
    fixed, n = system.canonicalise(mixed)
    assert n == int(flip.sum()) and torch.equal(fixed, x)
    offset = system.canonical_log_density_offset(mixed)
    assert torch.all(offset[~flip] == math.log(2.0)) and torch.all(torch.isinf(offset[flip]))
    assert not ala.broken_structures(x).any()
    bad = x.clone()
    bad[3, 8] += torch.tensor([0.8, 0.0, 0.0])  # pull CA away from its neighbours
    assert ala.broken_structures(bad).tolist() == [i == 3 for i in range(200)]


def test_training_split_and_heldout_reference_do_not_overlap():
    ref = ala.load_reference()
    train, later = ala.training_split()
    assert train.shape == (ala.TRAIN_FRAMES, 22, 3) and len(train) + len(later) == len(ref["positions"])
    held = ala.heldout_reference()
    first = held["first_frame"]
    # the last training structure is frame first - 1 of the run; held-out frames come after it
    assert ref["phi"][ala.TRAIN_FRAMES - 1] == ref["all_phi"][first - 1]
    assert ref["psi"][ala.TRAIN_FRAMES - 1] == ref["all_psi"][first - 1]
    assert len(held["phi"]) == len(ref["all_phi"]) - first > 0.15 * len(ref["all_phi"])
    assert abs(held["weights"].sum() - 1.0) < 1e-9
    pops = ala.basin_populations(held["phi"], held["psi"], held["weights"])
    assert 0.004 < pops["phi_pos"] < 0.02 and abs(pops["C5"] - 0.5) < 0.05


def test_ramachandran_accuracy_passes_the_reference_and_fails_mirror_images():
    from digfast.accuracy import alanine_statistics

    _, later = ala.training_split()
    rows = {r["statistic"]: r for r in alanine_statistics(later, len(later), repeats=5)}
    assert rows["phi/psi JS"]["ratio"] < 2.0
    assert abs(rows["C7eq population"]["diff"]) < 0.03 and abs(rows["C5 population"]["diff"]) < 0.03
    assert 0.5 < rows["phi>=0 population"]["ratio"] < 2.0
    # D-alanine (what an uncorrected O(3)-equivariant model gives for half its samples) fails
    mirrored = torch.cat([later[: len(later) // 2], -later[len(later) // 2:]])
    bad = {r["statistic"]: r for r in alanine_statistics(mirrored, len(mirrored), repeats=5)}
    assert bad["phi/psi JS"]["ratio"] > 10 and bad["phi>=0 population"]["ratio"] > 10


@pytest.fixture(scope="module")
def tiny_alanine_model():
    from digfast.models import Graphormer3D, Graphormer3DConfig
    from digfast.models.score_model import ScoreModel
    from digfast.schedules import LinearVP

    torch.manual_seed(0)
    net = Graphormer3D(Graphormer3DConfig(n_atom_types=4, layers=1, width=16, heads=2, ffn=16, gaussians=8,
                                          max_path=3))
    return ScoreModel(net, LinearVP(), ala.AlanineDipeptide(), position_scale=2.0, default_steps=4)


def test_sampled_alanine_is_l_and_reported(tiny_alanine_model, tmp_path):
    import digfast
    from digfast.report import ensemble_report, format_report, plot_ensemble

    out = digfast.sample_batch(tiny_alanine_model, n=24, seed=5, progress=False)
    assert (ala.chirality(out.positions) == 1).all()
    assert 0 < out.metadata["n_inverted"] < 24  # an untrained model draws both mirror images
    rep = ensemble_report(out)
    text = format_report(rep)
    assert "C7eq" in text and "phi >= 0" in text and "mirror images" in text
    assert abs(sum(rep["basins"][b] for b in ala.BASINS) - 1.0) < 1e-9
    png = plot_ensemble(out, None, tmp_path / "rama.png")
    assert png.stat().st_size > 10_000


def test_likelihood_of_mirror_image_is_zero(tiny_alanine_model):
    import digfast

    x = ala.AlanineDipeptide().reference_samples(2, seed=3)
    lik = digfast.log_likelihood(tiny_alanine_model, positions=torch.cat([x, -x]), divergence="hutchinson",
                                 probes=2, method="euler", steps=3)
    assert torch.isfinite(lik.log_prob[:2]).all() and torch.isinf(lik.log_prob[2:]).all()


def test_sample_with_likelihood_returns_the_canonical_ensemble(tiny_alanine_model):
    import digfast

    drawn = digfast.sample_with_likelihood(tiny_alanine_model, n=6, divergence="hutchinson", probes=2,
                                           steps=20)
    assert (ala.chirality(drawn.positions) > 0).all(), "D structures must come back inverted"
    # the same probes (seed, sample ids): integrating back from the samples gives the same log p,
    # log 2 of the canonical ensemble included (rk4 x20 on a rough tiny model: a few 0.01 nats apart)
    again = digfast.log_likelihood(tiny_alanine_model, positions=drawn.positions, divergence="hutchinson",
                                   probes=2, steps=20)
    torch.testing.assert_close(drawn.log_prob, again.log_prob, atol=0.2, rtol=0)


def test_report_without_the_energy_package(monkeypatch, tiny_alanine_model):
    import digfast
    from digfast.report import ensemble_report, format_report

    def missing_package(self, x):
        raise ImportError("this energy needs a package that is not installed")

    monkeypatch.setattr(ala.AlanineDipeptide, "energy", missing_package)
    out = digfast.sample_batch(tiny_alanine_model, n=4, progress=False)
    text = format_report(ensemble_report(out, ala.AlanineDipeptide().reference_samples(4)))
    assert "needs a package that is missing" in text and "C5" in text
