"""Input checks shared by every system."""
from __future__ import annotations

import torch


def check_structures(system, x: torch.Tensor) -> None:
    """x must be (batch, system.n_atoms, system.spatial_dim)."""
    if x.dim() != 3 or tuple(x.shape[1:]) != (system.n_atoms, system.spatial_dim):
        raise ValueError(f"{system.name}: expected (batch, {system.n_atoms}, {system.spatial_dim}), "
                         f"got {tuple(x.shape)}")
