"""The torch Amber energy (digfast.systems.amber) against OpenMM, term by term, and its
derivatives (first and second order: the energy-built prior and PIDP differentiate forces)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from digfast.systems import alanine as ala
from digfast.systems.amber import AmberEnergy, read_prmtop

# OpenMM force class -> AmberEnergy.terms key(s)
TERMS = {"HarmonicBondForce": ("bond",), "HarmonicAngleForce": ("angle",),
         "PeriodicTorsionForce": ("dihedral",), "NonbondedForce": ("lennard_jones", "coulomb")}


@pytest.fixture(scope="module")
def energy():
    return AmberEnergy(ala.PRMTOP_PATH)


def perturbed_reference(n, rng, scale=0.05):
    """Reference structures with every atom moved (bonds off r0, no two structures alike)."""
    x = ala.AlanineDipeptide().reference_samples(n, seed=int(torch.randint(0, 2**31, (1,), generator=rng))).double()
    return x + scale * torch.randn(x.shape, generator=rng, dtype=torch.float64)


def test_prmtop_sections_and_topology(energy):
    p = read_prmtop(ala.PRMTOP_PATH)
    assert p["POINTERS"][0] == 22 and len(p["CHARGE"]) == 22 and p["ATOM_NAME"][:2] == ["HH31", "CH3"]
    assert abs(sum(p["CHARGE"])) < 1e-3  # a neutral molecule (charges are scaled by 18.2223)
    assert sorted(map(tuple, energy.bond_idx.sort(1)[0].tolist())) == sorted(ala.BONDS)
    # every pair is bonded-excluded, 1-4 or nonbonded, exactly once
    pairs = {tuple(p) for p in energy.pair_idx.tolist()}
    pairs14 = {tuple(p) for p in energy.pair14_idx.tolist()}
    assert not pairs & pairs14 and len(pairs) + len(pairs14) + 21 + 36 == 22 * 21 // 2


FIXTURE = Path(__file__).parent / "fixtures" / "alanine_openmm_terms.npz"


def test_terms_match_saved_openmm_terms(energy):
    """Without OpenMM: against its terms saved by scripts/alanine_openmm_terms.py."""
    saved = np.load(FIXTURE)
    terms = energy.terms(torch.from_numpy(saved["positions"]))
    for k, name in enumerate(saved["forces"]):
        got = sum(terms[key] for key in TERMS[str(name)]).numpy()
        np.testing.assert_allclose(got, saved["terms_kj_mol"][:, k], rtol=1e-6, atol=1e-5, err_msg=str(name))


def test_terms_match_openmm(energy, rng):
    pytest.importorskip("openmm")
    x = perturbed_reference(8, rng)
    terms, saved = energy.terms(x), ala.AlanineDipeptide().openmm_terms(x)
    for name, keys in TERMS.items():
        got = sum(terms[key] for key in keys).numpy()
        np.testing.assert_allclose(got, saved[name], rtol=1e-6, atol=1e-5, err_msg=name)


def test_energy_and_force_match_openmm(rng):
    pytest.importorskip("openmm")
    s = ala.AlanineDipeptide()
    x = perturbed_reference(6, rng)
    assert torch.allclose(s.energy(x), s.openmm_energy(x), rtol=0, atol=1e-3)
    f, f_ref = s.force(x), s.openmm_force(x)
    assert f.dtype == torch.float64 and (f - f_ref).abs().max() < 1e-5 * f_ref.abs().max()


def test_float32_energy_is_close_and_graph_follows_dtype(energy, rng):
    x = perturbed_reference(4, rng)
    e64, e32 = energy(x), energy(x.float())
    assert e32.dtype == torch.float32 and (e32.double() - e64).abs().max() < 1e-3  # kJ/mol


def test_second_order_derivatives(energy, rng):
    """gradgradcheck: PIDP and the prior differentiate the force again."""
    x = perturbed_reference(1, rng, scale=0.02).requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (x,))
    assert torch.autograd.gradgradcheck(energy, (x,))


def test_alanine_energy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        ala.AlanineDipeptide().energy(torch.randn(3, 21, 3))
