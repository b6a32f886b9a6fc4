"""Shared by every system: input checks, and forces from an energy written in torch."""
from __future__ import annotations

import torch


def check_structures(system, x: torch.Tensor) -> None:
    """x must be (batch, system.n_atoms, system.spatial_dim)."""
    if x.dim() != 3 or tuple(x.shape[1:]) != (system.n_atoms, system.spatial_dim):
        raise ValueError(f"{system.name}: expected (batch, {system.n_atoms}, {system.spatial_dim}), "
                         f"got {tuple(x.shape)}")


def force_from_energy(energy, x: torch.Tensor) -> torch.Tensor:
    """-grad energy(x) (the Boltzmann score at kT = 1 when energy is in kT), x's shape and dtype."""
    with torch.enable_grad():
        x = torch.as_tensor(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(energy(x).sum(), x)
    return -g
