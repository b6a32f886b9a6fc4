"""Geometry shared by the systems: dihedral angles (numpy or torch, differentiable)."""
from __future__ import annotations

import math

import numpy as np
import torch


def dihedral(positions, idx, degrees: bool = True):
    """Dihedral angle of atoms idx = (i, j, k, l) for positions (..., N, 3).

    numpy in, numpy out (float64); torch in, torch out (differentiable). Sign convention of
    mdtraj.compute_dihedrals / IUPAC: atan2(|b2| b1 . (b2 x b3), (b1 x b2) . (b2 x b3)).
    """
    is_torch = isinstance(positions, torch.Tensor)
    if is_torch:
        p = positions
        cross, dot = (lambda a, b: torch.linalg.cross(a, b, dim=-1)), (lambda a, b: (a * b).sum(-1))
        norm, atan2 = (lambda a: a.norm(dim=-1)), torch.atan2
    else:
        p = np.asarray(positions, dtype=np.float64)
        cross, dot = (lambda a, b: np.cross(a, b)), (lambda a, b: (a * b).sum(-1))
        norm, atan2 = (lambda a: np.linalg.norm(a, axis=-1)), np.arctan2
    i, j, k, l = idx
    b1 = p[..., j, :] - p[..., i, :]
    b2 = p[..., k, :] - p[..., j, :]
    b3 = p[..., l, :] - p[..., k, :]
    c23 = cross(b2, b3)
    angle = atan2(norm(b2) * dot(b1, c23), dot(cross(b1, b2), c23))
    if degrees:
        angle = angle * (180.0 / math.pi)
        # atan2 gives (-180, 180]; map +180 to -180 so that angles lie in [-180, 180)
        if is_torch:
            angle = torch.where(angle >= 180.0, angle - 360.0, angle)
        else:
            angle = np.where(angle >= 180.0, angle - 360.0, angle)
    return angle
