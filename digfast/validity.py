"""Physical-validity checks on sampled structures.

A check is any callable check(positions, system) -> (n,) bool tensor, True for structures to
keep; positions are (n, N, d) in the system's units, after canonicalisation. sample_batch
redraws or drops the rejected ones (validity=..., on_invalid=...).

Built in: EnergyCutoff (molecular systems with an energy), BondLengths and Clashes (systems
with a bond list: alanine dipeptide now; the protein systems of a later issue plug in the
same way, through .bonds and a reference structure).
"""
from __future__ import annotations

import math

import torch

from digfast.systems.graph import shortest_paths


class EnergyCutoff:
    """Keep structures whose energy (kT) is at most max_energy; NaN/inf energies are rejected."""

    def __init__(self, max_energy: float):
        self.max_energy = float(max_energy)
        if math.isnan(self.max_energy):
            raise ValueError("max_energy is NaN")

    def check_system(self, system):
        if not callable(getattr(system, "energy", None)):
            raise TypeError(f"energy cut-off: system {getattr(system, 'name', system)!r} has no energy function")

    def __call__(self, positions, system):
        self.check_system(system)
        e = torch.as_tensor(system.energy(positions))
        return torch.isfinite(e) & (e <= self.max_energy)

    def __repr__(self):
        return f"EnergyCutoff(max_energy={self.max_energy})"


def _bonds(system) -> torch.Tensor:
    bonds = getattr(system, "bonds", None)
    if bonds is None:
        raise TypeError(f"system {getattr(system, 'name', system)!r} has no bond list for bond/clash checks")
    return torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)


class BondLengths:
    """Reject structures with a covalent bond off its reference length by more than tolerance.

    Reference lengths come from reference ((1, N, d) structure) or system.structure()."""

    def __init__(self, tolerance: float = 0.5, reference=None):
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"bond tolerance must be > 0, got {tolerance}")
        self.tolerance, self.reference = float(tolerance), reference

    def check_system(self, system):
        _bonds(system)
        if self.reference is None and not callable(getattr(system, "structure", None)):
            raise TypeError(f"system {getattr(system, 'name', system)!r} has no reference structure for bond lengths")

    def __call__(self, positions, system):
        self.check_system(system)
        i, j = _bonds(system).T
        ref = self.reference if self.reference is not None else system.structure()
        ref = torch.as_tensor(ref, dtype=torch.float64).reshape(-1, system.n_atoms, system.spatial_dim)[0]
        x = positions.double()
        lengths = (x[:, i] - x[:, j]).norm(dim=-1)
        ok = ((lengths - (ref[i] - ref[j]).norm(dim=-1)).abs() <= self.tolerance).all(-1)
        return ok & torch.isfinite(x).flatten(1).all(1)

    def __repr__(self):
        return f"BondLengths(tolerance={self.tolerance})"


class Clashes:
    """Reject structures where two atoms more than two bonds apart (any two, without bonds)
    come closer than min_distance."""

    def __init__(self, min_distance: float):
        if not (isinstance(min_distance, (int, float)) and math.isfinite(min_distance) and min_distance > 0):
            raise ValueError(f"clash distance must be > 0, got {min_distance}")
        self.min_distance = float(min_distance)

    def __call__(self, positions, system):
        n = system.n_atoms
        bonds = getattr(system, "bonds", None)
        far = shortest_paths(n, bonds) > 2 if bonds is not None else ~torch.eye(n, dtype=torch.bool)
        i, j = torch.nonzero(torch.triu(far, 1), as_tuple=True)
        x = positions.double()
        d = (x[:, i] - x[:, j]).norm(dim=-1)
        return (d >= self.min_distance).all(-1) & torch.isfinite(x).flatten(1).all(1)

    def __repr__(self):
        return f"Clashes(min_distance={self.min_distance})"


def all_of(*checks):
    """One check that keeps a structure only when every check keeps it."""
    checks = [c for c in checks if c is not None]
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]

    def combined(positions, system):
        keep = torch.ones(len(positions), dtype=torch.bool)
        for check in checks:
            keep &= run_check(check, positions, system)
        return keep

    def check_system(system):
        for check in checks:
            if hasattr(check, "check_system"):
                check.check_system(system)

    combined.checks, combined.check_system = checks, check_system
    return combined


def run_check(check, positions, system) -> torch.Tensor:
    """check's verdict as (n,) bool on the CPU, or TypeError naming what it returned instead."""
    keep = check(positions, system)
    keep = torch.as_tensor(keep).cpu()
    if keep.dtype != torch.bool or keep.shape != (len(positions),):
        raise TypeError(f"validity check {check!r} must return a ({len(positions)},) bool tensor, "
                        f"got {keep.dtype} of shape {tuple(keep.shape)}")
    return keep


def describe(check) -> str | None:
    """A stable text naming the check (stored in ensemble manifests so resumes can compare)."""
    if check is None:
        return None
    inner = getattr(check, "checks", None)
    return " & ".join(map(repr, inner)) if inner else repr(check)


MASK64 = 2**64 - 1


def redraw_seed(seed: int, attempt: int) -> int:
    """The seed of draw number attempt (0: the run's seed) of a rejected sample: a splitmix64
    mix of (seed, attempt), so redraws are reproducible and independent of how the run is split."""
    if attempt == 0:
        return seed
    z = (seed + attempt * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)
