"""Bond-graph features of molecules."""
from __future__ import annotations

import torch

UNCONNECTED = 10_000


def shortest_paths(n_atoms: int, bonds) -> torch.Tensor:
    """(N, N) long: number of bonds on the shortest path between atoms (UNCONNECTED if none)."""
    bonds = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
    if len(bonds) and (int(bonds.min()) < 0 or int(bonds.max()) >= n_atoms):
        raise ValueError(f"bond indices must lie in [0, {n_atoms})")
    d = torch.full((n_atoms, n_atoms), UNCONNECTED, dtype=torch.long)
    d.fill_diagonal_(0)
    d[bonds[:, 0], bonds[:, 1]] = 1
    d[bonds[:, 1], bonds[:, 0]] = 1
    for k in range(n_atoms):  # Floyd-Warshall: fine for molecules of tens to hundreds of atoms
        d = torch.minimum(d, d[:, k : k + 1] + d[k : k + 1, :])
    return d
