"""Residue frames -> backbone atoms N, CA, C, O, and their mdtraj topology from the sequence.

CA is the frame's translation; N and C sit at the public model's ideal offsets in the
residue frame (x_global = IR^T x_local + CA). O is placed in the peptide plane of C_i with
CA_i and N_{i+1}: 1.231 A from C_i, opposite the bisector of the C-CA and C-N bonds (for the
last residue a virtual N_{i+1} of a trans peptide, psi = 180 deg). The model predicts no O:
it is reconstructed, not sampled.
"""
from __future__ import annotations

import math

import torch

N_LOCAL = (1.45597958, 0.0, 0.0)
C_LOCAL = (-0.533655602, 1.42752619, 0.0)
CO_BOND, CN_BOND, CA_C_N_ANGLE = 1.231, 1.329, math.radians(116.2)
ATOM_NAMES = ("N", "CA", "C", "O")

ONE_TO_THREE = {"A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS",
                "I": "ILE", "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN",
                "R": "ARG", "S": "SER", "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR", "X": "UNK"}


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _virtual_next_n_local(dtype) -> torch.Tensor:
    """N_{i+1} of a trans peptide in residue i's frame: in the N-CA-C plane (z = 0), CN_BOND
    from C at the angle CA-C-N, on the side away from N_i."""
    c = torch.tensor(C_LOCAL, dtype=torch.float64)
    n = torch.tensor(N_LOCAL, dtype=torch.float64)
    u = _unit(-c)  # C -> CA
    best = None
    for sign in (1.0, -1.0):
        a = sign * CA_C_N_ANGLE
        rot = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0, 0, 1.0]],
                           dtype=torch.float64)
        cand = c + CN_BOND * (rot @ u)
        if best is None or (cand - n).norm() > (best - n).norm():
            best = cand
    return best.to(dtype)


def backbone_atoms(tr: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """(..., L, 4, 3) positions of N, CA, C, O (Angstrom) from frames tr (..., L, 3) and rotation
    matrices rot (..., L, 3, 3) (the public IR convention)."""
    def place(local):
        x = torch.as_tensor(local, dtype=tr.dtype, device=tr.device)
        return torch.einsum("...ji,j->...i", rot, x) + tr
    n, ca, c = place(N_LOCAL), tr, place(C_LOCAL)
    next_n = torch.cat([n[..., 1:, :], place(_virtual_next_n_local(tr.dtype).tolist())[..., -1:, :]], dim=-2)
    o = c - CO_BOND * _unit(_unit(ca - c) + _unit(next_n - c))
    return torch.stack([n, ca, c, o], dim=-2)


def topology(sequence: str):
    """mdtraj Topology of the backbone (N, CA, C, O per residue, one chain)."""
    import mdtraj

    top = mdtraj.Topology()
    chain = top.add_chain()
    for i, aa in enumerate(sequence.upper()):
        if aa not in ONE_TO_THREE:
            raise ValueError(f"residue {i + 1}: unknown one-letter code {aa!r}")
        res = top.add_residue(ONE_TO_THREE[aa], chain, resSeq=i + 1)
        for name in ATOM_NAMES:
            top.add_atom(name, mdtraj.element.get_by_symbol(name[0]), res)
    return top
