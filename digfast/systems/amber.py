"""The Amber force-field energy of a prmtop, in torch: differentiable, batched, no OpenMM.

Vacuum, no cutoff, the terms OpenMM builds from the same file with
``createSystem(nonbondedMethod=NoCutoff, constraints=None)``:

    E = sum_bonds k (r - r0)^2 + sum_angles k (theta - theta0)^2
      + sum_dihedrals k (1 + cos(n phi - phase))                (propers and impropers alike)
      + sum_pairs [A/r^12 - B/r^6 + C q_i q_j / r]               (pairs not excluded)
      + sum_1-4 [(A/r^12 - B/r^6) / SCNB + C q_i q_j / (r SCEE)]

Amber's k carry no factor 1/2. Its charges are stored times 18.2223; C = 138.935456
kJ mol^-1 nm e^-2 is OpenMM's Coulomb constant, used with e = CHARGE / 18.2223 as OpenMM does,
so the two agree to rounding. 1-4 pairs are the ends of the dihedrals whose third index is not
negative (a negative third index marks a repeated term or a ring); SCEE/SCNB default to 1.2/2.0
when the file has no SCEE_SCALE_FACTOR/SCNB_SCALE_FACTOR section (old prmtops, ff96 here).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from digfast.systems.geometry import dihedral

KCAL_TO_KJ = 4.184
COULOMB_KJ_NM = 138.935456  # OpenMM's ONE_4PI_EPS0
AMBER_CHARGE_SCALE = 18.2223
DEFAULT_SCEE, DEFAULT_SCNB = 1.2, 2.0


def read_prmtop(path) -> dict[str, list]:
    """{FLAG: values} of an Amber prmtop; fixed-width fields read by their %FORMAT."""
    sections, flag, width, kind, values = {}, None, None, None, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("%FLAG"):
            if flag is not None:
                sections[flag] = values
            flag, values = line.split()[1], []
        elif line.startswith("%FORMAT"):
            m = re.match(r"%FORMAT\((\d+)([aIE])(\d+)", line)
            if m is None:
                raise ValueError(f"{path}: unreadable {line.strip()!r} in section {flag}")
            kind, width = m.group(2), int(m.group(3))
        elif flag is not None and not line.startswith("%"):
            cast = {"a": str.strip, "I": int, "E": float}[kind]
            values.extend(cast(line[i:i + width]) for i in range(0, len(line.rstrip()), width))
    if flag is not None:
        sections[flag] = values
    return sections


def _records(flat, k: int) -> np.ndarray:
    """A flat prmtop index list as (n, k) records."""
    return np.asarray(flat, dtype=np.int64).reshape(-1, k)


class AmberEnergy(torch.nn.Module):
    """Energy in kJ/mol of positions (..., N, 3) in Angstrom; float64 parameters, computed in
    the positions' dtype; differentiable to any order (no in-place ops, no branches on x)."""

    def __init__(self, prmtop_path):
        super().__init__()
        p = read_prmtop(prmtop_path)
        n = p["POINTERS"][0]
        self.n_atoms = n
        f64 = dict(dtype=torch.float64)

        bonds = np.concatenate([_records(p["BONDS_INC_HYDROGEN"], 3), _records(p["BONDS_WITHOUT_HYDROGEN"], 3)])
        self.register_buffer("bond_idx", torch.from_numpy(bonds[:, :2] // 3))
        bt = bonds[:, 2] - 1
        self.register_buffer("bond_k", torch.tensor(np.take(p["BOND_FORCE_CONSTANT"], bt), **f64))
        self.register_buffer("bond_r0", torch.tensor(np.take(p["BOND_EQUIL_VALUE"], bt), **f64))

        angles = np.concatenate([_records(p["ANGLES_INC_HYDROGEN"], 4), _records(p["ANGLES_WITHOUT_HYDROGEN"], 4)])
        self.register_buffer("angle_idx", torch.from_numpy(angles[:, :3] // 3))
        at = angles[:, 3] - 1
        self.register_buffer("angle_k", torch.tensor(np.take(p["ANGLE_FORCE_CONSTANT"], at), **f64))
        self.register_buffer("angle_theta0", torch.tensor(np.take(p["ANGLE_EQUIL_VALUE"], at), **f64))

        dih = np.concatenate([_records(p["DIHEDRALS_INC_HYDROGEN"], 5), _records(p["DIHEDRALS_WITHOUT_HYDROGEN"], 5)])
        self.register_buffer("dihedral_idx", torch.from_numpy(np.abs(dih[:, :4]) // 3))
        dt = dih[:, 4] - 1
        self.register_buffer("dihedral_k", torch.tensor(np.take(p["DIHEDRAL_FORCE_CONSTANT"], dt), **f64))
        self.register_buffer("dihedral_n", torch.tensor(np.take(p["DIHEDRAL_PERIODICITY"], dt), **f64))
        self.register_buffer("dihedral_phase", torch.tensor(np.take(p["DIHEDRAL_PHASE"], dt), **f64))
        scee = np.take(p.get("SCEE_SCALE_FACTOR", [DEFAULT_SCEE] * (dt.max() + 1)), dt)
        scnb = np.take(p.get("SCNB_SCALE_FACTOR", [DEFAULT_SCNB] * (dt.max() + 1)), dt)

        # 1-4 pairs: ends of dihedrals whose third index is not negative, once each
        pairs14 = {}
        for row, ee, nb in zip(dih, scee, scnb):
            if row[2] >= 0:
                i, j = sorted((abs(row[0]) // 3, abs(row[3]) // 3))
                pairs14.setdefault((i, j), (ee, nb))
        idx14 = sorted(pairs14)
        self.register_buffer("pair14_idx", torch.tensor(idx14, dtype=torch.long).reshape(-1, 2))
        self.register_buffer("pair14_scee", torch.tensor([pairs14[k][0] for k in idx14], **f64))
        self.register_buffer("pair14_scnb", torch.tensor([pairs14[k][1] for k in idx14], **f64))

        # every other pair that the exclusion list does not name
        excluded, cursor = set(), 0
        for i, count in enumerate(p["NUMBER_EXCLUDED_ATOMS"]):
            for j in p["EXCLUDED_ATOMS_LIST"][cursor:cursor + count]:
                if j > 0:
                    excluded.add((min(i, j - 1), max(i, j - 1)))
            cursor += count
        excluded |= set(idx14)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in excluded]
        self.register_buffer("pair_idx", torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))

        charge = np.asarray(p["CHARGE"]) / AMBER_CHARGE_SCALE
        types = np.asarray(p["ATOM_TYPE_INDEX"]) - 1
        ntypes = p["POINTERS"][1]
        nb_index = np.asarray(p["NONBONDED_PARM_INDEX"]).reshape(ntypes, ntypes)
        if (nb_index <= 0).any():
            raise ValueError(f"{prmtop_path}: 10-12 hydrogen-bond terms are not supported")
        acoef, bcoef = np.asarray(p["LENNARD_JONES_ACOEF"]), np.asarray(p["LENNARD_JONES_BCOEF"])
        for name, idx in (("pair", pairs), ("pair14", idx14)):
            i, j = np.asarray(idx, dtype=np.int64).reshape(-1, 2).T
            k = nb_index[types[i], types[j]] - 1
            self.register_buffer(f"{name}_a", torch.tensor(acoef[k], **f64))  # kcal/mol A^12
            self.register_buffer(f"{name}_b", torch.tensor(bcoef[k], **f64))  # kcal/mol A^6
            # q_i q_j C in kJ/mol A
            self.register_buffer(f"{name}_qq", torch.tensor(charge[i] * charge[j] * COULOMB_KJ_NM * 10.0, **f64))

    def terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each term's energy in kJ/mol, shape x.shape[:-2]."""
        def par(name):
            return getattr(self, name).to(x.dtype)

        b = self.bond_idx
        r = torch.linalg.vector_norm(x[..., b[:, 1], :] - x[..., b[:, 0], :], dim=-1)
        e_bond = (par("bond_k") * (r - par("bond_r0")) ** 2).sum(-1)

        a = self.angle_idx
        u, v = x[..., a[:, 0], :] - x[..., a[:, 1], :], x[..., a[:, 2], :] - x[..., a[:, 1], :]
        # atan2(|u x v|, u.v): accurate near 0 and pi, where acos loses precision and its gradient
        theta = torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=-1), (u * v).sum(-1))
        e_angle = (par("angle_k") * (theta - par("angle_theta0")) ** 2).sum(-1)

        phi = dihedral(x, self.dihedral_idx.T, degrees=False)
        e_dih = (par("dihedral_k") * (1.0 + torch.cos(par("dihedral_n") * phi - par("dihedral_phase")))).sum(-1)

        def nonbonded(name, lj_scale=None, coulomb_scale=None):
            idx = getattr(self, f"{name}_idx")
            r2 = (x[..., idx[:, 1], :] - x[..., idx[:, 0], :]).pow(2).sum(-1)
            inv6 = r2.pow(-3)
            lj = KCAL_TO_KJ * (par(f"{name}_a") * inv6 * inv6 - par(f"{name}_b") * inv6)
            coulomb = par(f"{name}_qq") * r2.rsqrt()
            if lj_scale is not None:
                lj, coulomb = lj / par(lj_scale), coulomb / par(coulomb_scale)
            return lj.sum(-1), coulomb.sum(-1)

        lj, coulomb = nonbonded("pair")
        lj14, coulomb14 = nonbonded("pair14", "pair14_scnb", "pair14_scee")
        return {"bond": KCAL_TO_KJ * e_bond, "angle": KCAL_TO_KJ * e_angle, "dihedral": KCAL_TO_KJ * e_dih,
                "lennard_jones": lj + lj14, "coulomb": coulomb + coulomb14}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(x).values())
