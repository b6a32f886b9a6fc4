"""The standard particle benchmarks of the equivariant-flow literature (kT = 1).

DW-4: 4 particles in 2-D, E = sum_{i<j} 0.9 (d_ij - 4)^4 - 4 (d_ij - 4)^2.
LJ-13: 13 particles in 3-D, E = sum_{i != j} [(1/d_ij)^12 - 2 (1/d_ij)^6] + 1/2 sum_i |x_i - x_com|^2
(the pair sum runs over ordered pairs: the convention of the public MCMC samples).
Both energies are invariant to rotations, translations and permutations.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from digfast.systems.checks import check_structures, force_from_energy

DATA = Path(__file__).parent / "data"


def pair_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, N(N-1)/2) distances over pairs i < j."""
    i, j = torch.triu_indices(x.shape[1], x.shape[1], 1, device=x.device)
    return (x[:, i] - x[:, j]).norm(dim=-1)


class ParticleSystem:
    """N identical particles in spatial_dim dimensions with a batched, differentiable energy."""

    name: str
    n_atoms: int
    spatial_dim: int
    element = "Ar"
    length_unit_nm = 0.1

    def __init__(self):
        self.atom_types = torch.zeros(self.n_atoms, dtype=torch.long)

    @property
    def dof(self) -> int:
        return self.spatial_dim * (self.n_atoms - 1)

    def _check(self, x: torch.Tensor):
        check_structures(self, x)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference_data(self) -> torch.Tensor:
        """The shipped reference ensemble (public validation split, centred), float32."""
        path = DATA / f"{self.name}_reference.npz"
        if not path.exists():
            raise FileNotFoundError(f"reference data for {self.name} missing: {path}")
        return torch.from_numpy(np.load(path)["positions"])

    def reference_samples(self, n: int, seed: int = 0) -> torch.Tensor:
        """n structures drawn without replacement from the reference (fewer if it is smaller)."""
        data = self.reference_data()
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return data[idx]

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """-grad E, the score of the Boltzmann density at kT = 1."""
        return force_from_energy(self.energy, x)


class DoubleWell4(ParticleSystem):
    name, n_atoms, spatial_dim = "dw4", 4, 2
    a, b, d0 = 0.9, -4.0, 4.0

    def energy(self, x):
        self._check(x)
        u = pair_distances(x) - self.d0
        return (self.a * u**4 + self.b * u**2).sum(-1)


class LennardJones13(ParticleSystem):
    name, n_atoms, spatial_dim = "lj13", 13, 3
    harmonic = 0.5

    def energy(self, x):
        self._check(x)
        inv6 = pair_distances(x).pow(-6)
        pair = 2.0 * (inv6**2 - 2.0 * inv6).sum(-1)  # each unordered pair twice
        centred = x - x.mean(dim=1, keepdim=True)
        return pair + self.harmonic * centred.pow(2).sum((-1, -2))
