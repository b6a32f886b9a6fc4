"""Physical-validity checks of sampled protein backbones, and which samples fail them.

A check is check(tr, rot) -> (n,) bool (True = valid) on CA positions tr (n, L, 3) in Angstrom
and frame rotations rot (n, L, 3, 3); non-finite structures always fail.
"""
from __future__ import annotations

import torch

CA_CA = 3.80  # Angstrom between consecutive C-alpha atoms (trans peptide)


class BackboneGeometry:
    """Consecutive CA-CA distances within `tolerance` of 3.8 A (chain breaks) and no two
    C-alphas at least two residues apart closer than `min_distance` (clashes)."""

    def __init__(self, tolerance: float = 0.5, min_distance: float = 3.0):
        if not tolerance > 0 or not min_distance >= 0:
            raise ValueError("tolerance must be > 0 and min_distance >= 0")
        self.tolerance, self.min_distance = float(tolerance), float(min_distance)

    def __call__(self, tr: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        ok = torch.ones(tr.shape[0], dtype=torch.bool)
        if tr.shape[1] > 1:
            bonds = (tr[:, 1:] - tr[:, :-1]).norm(dim=-1)
            ok &= ((bonds - CA_CA).abs() <= self.tolerance).all(1)
        if tr.shape[1] > 2:
            d = torch.cdist(tr.double(), tr.double())
            i, j = torch.triu_indices(tr.shape[1], tr.shape[1], 2)
            ok &= (d[:, i, j] >= self.min_distance).all(1)
        return ok

    def __repr__(self):
        return f"BackboneGeometry(tolerance={self.tolerance}, min_distance={self.min_distance})"


def valid(check, tr: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """(n,) bool: finite and passing check (None: finiteness only)."""
    ok = torch.isfinite(tr).flatten(1).all(1) & torch.isfinite(rot).flatten(1).all(1)
    if check is not None:
        result = torch.as_tensor(check(tr, rot), dtype=torch.bool).reshape(-1)
        if result.shape != ok.shape:
            raise ValueError(f"validity check returned {tuple(result.shape)} values for {len(ok)} structures")
        ok &= result
    return ok
