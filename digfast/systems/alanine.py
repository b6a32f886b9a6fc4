"""Alanine dipeptide (Ace-Ala-Nme, 22 atoms) in vacuum at 300 K, Amber ff96.

The force field files are the prmtop/crd that the PyPI package openmmtools ships under
openmmtools/data/alanine-dipeptide-gbsa/ (copied, unchanged, to ``data/``; see
``data/alanine-dipeptide.README.md``). The system is built with ``createSystem(nonbondedMethod=NoCutoff)``
and no implicit solvent: the prmtop's GB radii are only used when ``implicitSolvent`` is
passed, so this is the vacuum potential.

This module needs only numpy/torch (mdtraj for the topology): the energy is the prmtop's,
evaluated in torch (:mod:`digfast.systems.amber`, differentiable, so the energy-built prior,
force targets and PIDP work). OpenMM is imported lazily, by :meth:`AlanineDipeptide.openmm_energy`
(the cross-check), :func:`openmm_system` and :func:`thermalise_bonds` alone.

Conventions
-----------
* Positions in Angstrom (``length_unit_nm = 0.1``), shape (..., 22, 3), atoms in prmtop order.
* Dihedrals in degrees in [-180, 180); ``phi = C(Ace)-N-CA-C``, ``psi = N-CA-C-N(Nme)``, sign
  as mdtraj (IUPAC).
* Energies in kT at 300 K.

Helpers for the accuracy report: :func:`phi_psi`, :func:`basin_populations` (the basin
definitions live there and only there), :func:`ramachandran_histogram`,
:func:`js_divergence`, :func:`js_noise_floor` and :func:`load_reference` (the shipped
reference, made by ``scripts/alanine_reference.py``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from digfast.systems.checks import check_structures, force_from_energy
from digfast.systems.geometry import dihedral

DATA = Path(__file__).parent / "data"
PDB_PATH = DATA / "alanine-dipeptide.pdb"
PRMTOP_PATH = DATA / "alanine-dipeptide.prmtop"
CRD_PATH = DATA / "alanine-dipeptide.crd"
REFERENCE_PATH = DATA / "alanine_reference.npz"

N_ATOMS = 22
TEMPERATURE_K = 300.0
# kT at 300 K in kJ/mol: R T with openmm.unit.MOLAR_GAS_CONSTANT_R = 8.31446261815324 J/(mol K).
KT_KJ_MOL = 8.31446261815324e-3 * TEMPERATURE_K

# Atom order of the prmtop (0-based): 0 HH31, 1 CH3, 2 HH32, 3 HH33, 4 C, 5 O (Ace);
# 6 N, 7 H, 8 CA, 9 HA, 10 CB, 11-13 HB1-3, 14 C, 15 O (Ala); 16 N, 17 H, 18 CH3, 19-21 H (Nme).
PHI_ATOMS = (4, 6, 8, 14)
PSI_ATOMS = (6, 8, 14, 16)
# L-alanine: det[N - CA, C - CA, CB - CA] > 0 (every reference frame; |det| >= 1.7 A^3 there)
CHIRAL_ATOMS = (6, 8, 14, 10)  # N, CA, C, CB

ELEMENTS = ("H", "C", "N", "O")
# Element index (into ELEMENTS) of each atom, prmtop order.
ATOM_TYPES = (0, 1, 0, 0, 1, 3, 2, 0, 1, 0, 1, 0, 0, 0, 1, 3, 2, 0, 1, 0, 0, 0)
# Covalent bonds of the prmtop topology, (i, j) with i < j.
BONDS = ((0, 1), (1, 2), (1, 3), (1, 4), (4, 5), (4, 6), (6, 7), (6, 8), (8, 9), (8, 10),
         (8, 14), (10, 11), (10, 12), (10, 13), (14, 15), (14, 16), (16, 17), (16, 18),
         (18, 19), (18, 20), (18, 21))

# Basins on the Ramachandran plane, degrees in [-180, 180); the labels partition the plane.
# In vacuum at 300 K the phi < 0 half holds ~99%: one broad region with wells at C5
# (-155, 165) and C7eq (-80, 75) joined by ~2 kT saddles through PII; phi >= 0 holds the rare
# C7ax well (70, -70) and a trace of alphaL.
#   C5     : phi < -120 and (psi >= 120 or psi < -150)           extended, beta
#   PII    : -120 <= phi < 0 and (psi >= 150 or psi < -150)      polyproline II
#   C7eq   : phi < 0 and 30 <= psi < 150, not C5                  (so phi < -120 only up to psi 120)
#   alphaR : phi < 0 and -150 <= psi < 30                         right-handed helix
#   C7ax   : 0 <= phi < 120 and psi < 30
#   alphaL : 0 <= phi < 120 and psi >= 30
#   other  : 120 <= phi < 180 (mostly C5 frames crossing phi = +-180, ~0.1%)
# Also reported: "phi_pos" = fraction with phi >= 0 (= C7ax + alphaL + other), the "phi > 0"
# population of the accuracy report, and "phi_pos_0_120" = C7ax + alphaL.
BASINS = ("C5", "PII", "C7eq", "alphaR", "C7ax", "alphaL", "other")

# Held-out split of the shipped reference (time order): models train on the first TRAIN_FRAMES
# equally weighted structures (the first 80% of the 700 ns run); accuracy is measured against
# every weighted frame saved after the last of them (:func:`heldout_reference`).
TRAIN_FRAMES = 12_000


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _wrap_deg(a: np.ndarray) -> np.ndarray:
    """Angles to [-180, 180)."""
    return (np.asarray(a, dtype=np.float64) + 180.0) % 360.0 - 180.0


def phi_psi(positions_angstrom, degrees: bool = True):
    """(phi, psi) of positions (..., 22, 3) in prmtop atom order; degrees in [-180, 180).

    Any length unit works (angles are scale free); numpy or torch in, same type out.
    """
    shape = tuple(positions_angstrom.shape)
    if len(shape) < 2 or shape[-2:] != (N_ATOMS, 3):
        raise ValueError(f"expected (..., {N_ATOMS}, 3) positions, got {shape}")
    return dihedral(positions_angstrom, PHI_ATOMS, degrees), dihedral(positions_angstrom, PSI_ATOMS, degrees)


def chirality(positions) -> torch.Tensor:
    """+1 for L-alanine, -1 for its mirror image (D), per structure of (..., 22, 3)."""
    x = torch.as_tensor(positions).double()
    n, ca, c, cb = CHIRAL_ATOMS
    frame = torch.stack([x[..., n, :] - x[..., ca, :], x[..., c, :] - x[..., ca, :], x[..., cb, :] - x[..., ca, :]], -2)
    return torch.where(torch.linalg.det(frame) >= 0, 1, -1)


def broken_structures(positions, tolerance: float = 0.5) -> torch.Tensor:
    """(n,) bool: some covalent bond is longer or shorter than in the minimised PDB by more than
    tolerance (Angstrom): chemically broken samples."""
    import mdtraj

    x = torch.as_tensor(positions).double()
    ref = torch.from_numpy(mdtraj.load(str(PDB_PATH)).xyz[0].astype(np.float64) * 10.0)
    i, j = torch.tensor(BONDS).T
    lengths = (x[..., i, :] - x[..., j, :]).norm(dim=-1)
    return ((lengths - (ref[i] - ref[j]).norm(dim=-1)).abs() > tolerance).any(-1)


def basin_labels(phi, psi) -> np.ndarray:
    """Index into BASINS of each (phi, psi) pair, angles in degrees (any period)."""
    phi, psi = _wrap_deg(_np(phi)), _wrap_deg(_np(psi))
    if phi.shape != psi.shape:
        raise ValueError(f"phi and psi shapes differ: {phi.shape} vs {psi.shape}")
    ext_psi = (psi >= 150.0) | (psi < -150.0)
    lab = np.full(phi.shape, BASINS.index("other"), dtype=np.int64)
    neg, pos = phi < 0.0, (phi >= 0.0) & (phi < 120.0)
    c5 = (phi < -120.0) & ((psi >= 120.0) | (psi < -150.0))
    lab[neg & (psi >= -150.0) & (psi < 30.0)] = BASINS.index("alphaR")
    lab[neg & (psi >= 30.0) & (psi < 150.0) & ~c5] = BASINS.index("C7eq")
    lab[neg & (phi >= -120.0) & ext_psi] = BASINS.index("PII")
    lab[c5] = BASINS.index("C5")
    lab[pos & (psi < 30.0)] = BASINS.index("C7ax")
    lab[pos & (psi >= 30.0)] = BASINS.index("alphaL")
    return lab


def _normalised_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / max(n, 1))
    w = _np(weights).astype(np.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"need one weight per angle pair: {w.shape[0]} weights for {n} pairs")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w / w.sum()


def basin_populations(phi, psi, weights=None) -> dict:
    """Population of each basin of BASINS, plus "phi_pos" (phi >= 0) and "phi_pos_0_120".

    phi, psi in degrees (numpy or torch, any shape, flattened); weights: optional per-pair
    non-negative weights (e.g. exp(log_weight) of a biased run), normalised here.
    """
    phi, psi = _wrap_deg(_np(phi)).reshape(-1), _wrap_deg(_np(psi)).reshape(-1)
    w = _normalised_weights(weights, phi.shape[0])
    lab = basin_labels(phi, psi)
    out = {name: float(w[lab == i].sum()) for i, name in enumerate(BASINS)}
    out["phi_pos"] = float(w[phi >= 0.0].sum())
    out["phi_pos_0_120"] = float(w[(phi >= 0.0) & (phi < 120.0)].sum())
    return out


def ramachandran_histogram(phi, psi, weights=None, bins: int = 36) -> np.ndarray:
    """(bins, bins) probability histogram over [-180, 180)^2 (phi rows, psi columns), sums to 1."""
    phi, psi = _wrap_deg(_np(phi)).reshape(-1), _wrap_deg(_np(psi)).reshape(-1)
    w = _normalised_weights(weights, phi.shape[0])
    edges = np.linspace(-180.0, 180.0, bins + 1)
    h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=w)
    return h / h.sum()


def js_divergence(hist_a, hist_b) -> float:
    """Jensen-Shannon divergence (natural log, so in [0, ln 2]) of two histograms.

    Inputs are non-negative arrays of the same shape (counts or probabilities), each
    normalised here; empty bins are fine.
    """
    p, q = _np(hist_a).astype(np.float64).ravel(), _np(hist_b).astype(np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"histogram shapes differ: {p.shape} vs {q.shape}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("histograms must be non-negative with positive mass")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return float(min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), math.log(2.0)))


def js_noise_floor(phi, psi, n: int, weights=None, bins: int = 36, repeats: int = 20,
                   seed: int = 0) -> tuple[float, float]:
    """JS divergence between two independent n-sample sets drawn from a reference.

    Both sets are drawn with replacement, with probability proportional to weights, from the
    reference (phi, psi); the mean and standard deviation over repeats are returned. This is
    the noise floor of :func:`js_divergence` for a model sample of size n compared with the
    reference, when reference frames are (near) independent and n is well below their number.
    """
    phi, psi = _wrap_deg(_np(phi)).reshape(-1), _wrap_deg(_np(psi)).reshape(-1)
    w = _normalised_weights(weights, phi.shape[0])
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(repeats):
        a = rng.choice(phi.shape[0], size=n, p=w)
        b = rng.choice(phi.shape[0], size=n, p=w)
        vals.append(js_divergence(ramachandran_histogram(phi[a], psi[a], bins=bins),
                                  ramachandran_histogram(phi[b], psi[b], bins=bins)))
    return float(np.mean(vals)), float(np.std(vals))


def load_reference(path=None) -> dict:
    """The shipped reference (numpy arrays; see scripts/alanine_reference.py, --pack).

    Keys: ``positions`` (n, 22, 3) float32 Angstrom, centred (zero mean over atoms), equally
    weighted 300 K samples in time order (a systematic resample of the weighted frames,
    stratified by basin) with their ``phi``, ``psi`` (degrees), ``energy_kT`` and ``t_ps``;
    ``all_phi``, ``all_psi``, ``all_log_weight``, ``all_energy_kT`` for every saved frame (5 ps
    stride) of the biased production run: exact 300 K averages with weights
    exp(all_log_weight), e.g. ``basin_populations(all_phi, all_psi, np.exp(all_log_weight))``;
    ``info``: JSON text (``json.loads(str(ref["info"]))``) of the settings, timings and
    convergence check.
    """
    path = Path(path) if path is not None else REFERENCE_PATH
    if not path.exists():
        raise FileNotFoundError(f"alanine dipeptide reference missing: {path} "
                                "(made by scripts/alanine_reference.py --pack)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def training_split(path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, later) structures (n, 22, 3) Angstrom: the first TRAIN_FRAMES of the shipped
    reference and the rest (later in time; used for validation loss only)."""
    pos = torch.from_numpy(load_reference(path)["positions"])
    return pos[:TRAIN_FRAMES], pos[TRAIN_FRAMES:]


def heldout_reference(path=None) -> dict:
    """phi, psi (degrees) and normalised weights of the run's frames saved after the last
    training structure: the held-out 300 K reference of the accuracy report."""
    ref = load_reference(path)
    cut_ps = float(ref["t_ps"][TRAIN_FRAMES - 1])
    info = json.loads(str(ref["info"]))
    # all_* frame k was saved at discard + (k + 1) frame_ps (scripts/alanine_reference.py)
    t_all = info["discard_ns"] * 1e3 + info["frame_ps"] * np.arange(1, len(ref["all_phi"]) + 1)
    first = int(np.searchsorted(t_all, cut_ps, side="right"))
    logw = ref["all_log_weight"][first:].astype(np.float64)
    w = np.exp(logw - logw.max())
    return {"phi": ref["all_phi"][first:], "psi": ref["all_psi"][first:], "weights": w / w.sum(),
            "first_frame": first}


def _require_openmm():
    try:
        import openmm  # noqa: F401
        import openmm.app  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without openmm
        raise ImportError("AlanineDipeptide.energy/force need OpenMM: pip install openmm "
                          "(or conda install -c conda-forge openmm)") from e
    import openmm

    return openmm


def openmm_system(constraints: str | None = None):
    """(topology, System) in vacuum from the shipped prmtop: NoCutoff, no implicit solvent.

    constraints: None (all bonds flexible; the energy model of :class:`AlanineDipeptide`) or
    "HBonds" (the MD setting of the reference run; constrained X-H bonds then carry no
    bond energy term, and their lengths equal the bond r0, so both systems give the same
    energy on constrained structures).
    """
    openmm = _require_openmm()
    app = openmm.app
    prmtop = app.AmberPrmtopFile(str(PRMTOP_PATH))
    cons = {None: None, "HBonds": app.HBonds}[constraints]
    system = prmtop.createSystem(nonbondedMethod=app.NoCutoff, constraints=cons, implicitSolvent=None)
    return prmtop.topology, system


def thermalise_bonds(positions, steps: int = 200, dt_fs: float = 0.5, friction_per_ps: float = 50.0,
                     seed: int = 0) -> np.ndarray:
    """positions (n, 22, 3) Angstrom after `steps` of flexible-bond Langevin MD at 300 K each.

    The shipped reference ran with X-H bonds constrained (fixed lengths) while this system's
    energy has flexible bonds. Bond lengths and angles relax in tens of fs at this friction
    (1/50 ps = 20 fs), torsions in ps to ns: 100 fs (the default) brings the stiff coordinates
    to their flexible 300 K distribution and leaves the conformation where it was. Returned
    centred (zero mean over atoms), float64."""
    openmm = _require_openmm()
    unit = openmm.unit
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 3 or positions.shape[1:] != (N_ATOMS, 3) or not np.isfinite(positions).all():
        raise ValueError(f"positions must be finite, (n, {N_ATOMS}, 3) Angstrom; got shape {positions.shape}")
    _, system = openmm_system(constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 dt_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    out = np.empty_like(positions)
    for k, frame in enumerate(positions):
        context.setPositions(frame * 0.1)  # nm
        context.setVelocitiesToTemperature(TEMPERATURE_K * unit.kelvin, seed * 1_000_003 + k + 1)
        integrator.step(steps)
        out[k] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    return out - out.mean(1, keepdims=True)


class AlanineDipeptide:
    """Alanine dipeptide in vacuum, Amber ff96, 300 K; positions in Angstrom, energies in kT.

    n_atoms = 22, spatial_dim = 3, atom_types = element index into ELEMENTS (H, C, N, O),
    bonds = (21, 2) covalent bonds; topology = mdtraj Topology of the shipped PDB.
    """

    name = "alanine-dipeptide"
    n_atoms = N_ATOMS
    spatial_dim = 3
    length_unit_nm = 0.1
    temperature = TEMPERATURE_K
    kT_kj_mol = KT_KJ_MOL
    elements = ELEMENTS

    def __init__(self):
        self.atom_types = torch.tensor(ATOM_TYPES, dtype=torch.long)
        self.bonds = torch.tensor(BONDS, dtype=torch.long)
        self._topology = None
        self._context = None
        self._amber = None

    def __getstate__(self):  # copies and pickles rebuild the OpenMM context lazily
        return {**self.__dict__, "_context": None}

    @classmethod
    def default(cls) -> "AlanineDipeptide":
        return cls()

    @property
    def dof(self) -> int:
        return self.spatial_dim * (self.n_atoms - 1)

    @property
    def topology(self):
        if self._topology is None:
            import mdtraj

            self._topology = mdtraj.load_topology(str(PDB_PATH))
        return self._topology

    def structure(self) -> torch.Tensor:
        """The shipped PDB structure (energy-minimised), (1, 22, 3) Angstrom float64."""
        import mdtraj

        return torch.from_numpy(mdtraj.load(str(PDB_PATH)).xyz.astype(np.float64) * 10.0)

    def reference_data(self) -> torch.Tensor:
        """Equally weighted 300 K reference structures (n, 22, 3), Angstrom, centred, float32."""
        return torch.from_numpy(load_reference()["positions"])

    def training_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, later) structures of the shipped reference (see :func:`training_split`)."""
        return training_split()

    def reference_samples(self, n: int, seed: int = 0) -> torch.Tensor:
        """n structures drawn without replacement from the reference (fewer if it is smaller)."""
        data = self.reference_data()
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return data[idx]

    def _check(self, x):
        check_structures(self, x)

    def canonicalise(self, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Invert (x -> -x) the D-alanine structures; returns (positions, number inverted).

        An O(3)-equivariant score model cannot tell mirror images apart, so it samples both
        with equal probability; the force field is mirror symmetric, so inverting the D copies
        turns the model's ensemble into the L ensemble exactly (the density doubles on L).
        """
        flip = chirality(positions) < 0
        out = positions.clone()
        out[flip] = -out[flip]
        return out, int(flip.sum())

    def canonical_log_density_offset(self, positions: torch.Tensor) -> torch.Tensor:
        """log density of the canonicalised ensemble minus the model's: log 2 on L, -inf on D."""
        return torch.where(chirality(positions) > 0, math.log(2.0), -math.inf)

    def summary(self, positions: torch.Tensor) -> dict:
        """phi/psi basin populations of the structures beside the held-out reference's."""
        phi, psi = phi_psi(positions.double().numpy())
        ref = heldout_reference()
        return {"basins": basin_populations(phi, psi),
                "reference_basins": basin_populations(ref["phi"], ref["psi"], ref["weights"])}

    def _openmm_context(self):
        if self._context is None:
            openmm = _require_openmm()
            _, system = openmm_system(constraints=None)
            for group, force in enumerate(system.getForces()):  # each force's energy on its own
                force.setForceGroup(group)
            integrator = openmm.VerletIntegrator(0.001)
            platform = openmm.Platform.getPlatformByName("Reference")
            self._context = openmm.Context(system, integrator, platform)
        return self._context

    def _evaluate(self, x, forces: bool):
        x = torch.as_tensor(x)
        self._check(x)
        ctx = self._openmm_context()
        xyz_nm = x.detach().cpu().to(torch.float64).numpy() * self.length_unit_nm
        energies = np.empty(len(xyz_nm))
        grads = np.empty_like(xyz_nm) if forces else None
        for b, pos in enumerate(xyz_nm):
            ctx.setPositions(pos)
            state = ctx.getState(getEnergy=True, getForces=forces)
            energies[b] = state.getPotentialEnergy()._value  # kJ/mol
            if forces:
                grads[b] = state.getForces(asNumpy=True)._value  # kJ/mol/nm
        return energies, grads

    def energy(self, x) -> torch.Tensor:
        """Potential energy in kT at 300 K of structures (B, 22, 3) in Angstrom, in x's dtype
        (pass float64 for 1e-6 kT agreement with OpenMM), differentiable in x.

        All bonds flexible (full ff96 energy, NoCutoff, vacuum), the same function as
        :meth:`openmm_energy` (tests/test_amber.py).
        """
        x = torch.as_tensor(x)
        self._check(x)
        if self._amber is None:
            from digfast.systems.amber import AmberEnergy

            self._amber = AmberEnergy(PRMTOP_PATH)
        return self._amber.to(x.device)(x) / self.kT_kj_mol

    def force(self, x) -> torch.Tensor:
        """-grad energy in kT per Angstrom, (B, 22, 3), x's dtype."""
        return force_from_energy(self.energy, x)

    def openmm_energy(self, x) -> torch.Tensor:
        """:meth:`energy` computed by OpenMM's Reference platform, float64 (needs OpenMM)."""
        e, _ = self._evaluate(x, forces=False)
        return torch.from_numpy(e / self.kT_kj_mol)

    def openmm_terms(self, x) -> dict[str, np.ndarray]:
        """OpenMM's energy of each force (class name -> (B,) kJ/mol), float64 (needs OpenMM)."""
        x = torch.as_tensor(x)
        self._check(x)
        ctx = self._openmm_context()
        forces = ctx.getSystem().getForces()
        terms = {type(f).__name__: np.empty(len(x)) for f in forces}
        for b, pos in enumerate(x.detach().cpu().to(torch.float64).numpy() * self.length_unit_nm):
            ctx.setPositions(pos)
            for f in forces:
                state = ctx.getState(getEnergy=True, groups={f.getForceGroup()})
                terms[type(f).__name__][b] = state.getPotentialEnergy()._value
        return terms

    def openmm_force(self, x) -> torch.Tensor:
        """:meth:`force` computed by OpenMM, float64 (needs OpenMM)."""
        _, f = self._evaluate(x, forces=True)
        return torch.from_numpy(f * self.length_unit_nm / self.kT_kj_mol)

    def config(self) -> dict:
        return {"name": self.name, "temperature_K": self.temperature,
                "force_field": "Amber ff96, vacuum (NoCutoff), prmtop from openmmtools"}
