"""Structures in and out, in formats mdtraj reads.

Positions inside digfast are in the system's length unit (Angstrom unless the system says
otherwise); mdtraj wants nm. 2-D systems are written with z = 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TRAJECTORY_SUFFIXES = {".xtc", ".dcd", ".trr", ".pdb"}
ARRAY_SUFFIXES = {".npz", ".npy"}


def topology(system):
    """The system's mdtraj Topology: its own if it has one, else one residue of placeholder atoms."""
    import mdtraj

    if getattr(system, "topology", None) is not None:
        return system.topology
    top = mdtraj.Topology()
    chain = top.add_chain()
    residue = top.add_residue(getattr(system, "residue_name", "SYS"), chain)
    element = mdtraj.element.get_by_symbol(getattr(system, "element", "Ar"))
    for i in range(system.n_atoms):
        top.add_atom(f"{element.symbol}{i + 1}", element, residue)
    return top


def _xyz_nm(positions: torch.Tensor, system) -> np.ndarray:
    xyz = positions.detach().to("cpu", torch.float32).numpy()
    if xyz.shape[-1] == 2:
        xyz = np.concatenate([xyz, np.zeros_like(xyz[..., :1])], axis=-1)
    if xyz.shape[-1] != 3:
        raise ValueError(f"can only write 2-D or 3-D positions, got dim {xyz.shape[-1]}")
    return xyz * getattr(system, "length_unit_nm", 0.1)


def to_mdtraj(positions: torch.Tensor, system):
    import mdtraj

    return mdtraj.Trajectory(_xyz_nm(positions, system), topology(system))


def save(path, positions: torch.Tensor, system, top=None, metadata: dict | None = None) -> list[Path]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TRAJECTORY_SUFFIXES | ARRAY_SUFFIXES:
        raise ValueError(f"unknown output format {suffix!r} for {path}; use one of "
                         f"{sorted(TRAJECTORY_SUFFIXES | ARRAY_SUFFIXES)}")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    if suffix in ARRAY_SUFFIXES:
        np.savez(path.with_suffix(".npz"), positions=positions.cpu().numpy(),
                 metadata=json.dumps(metadata or {}, default=str))
        return [path.with_suffix(".npz")]
    traj = to_mdtraj(positions, system)
    written = []
    if suffix != ".pdb":
        top_path = Path(top) if top is not None else path.with_name(path.stem + "_top.pdb")
        traj[0].save_pdb(str(top_path))
        written.append(top_path)
    traj.save(str(path))
    written.insert(0, path)
    return written


def load_positions(path, top=None, length_unit_nm: float = 0.1) -> torch.Tensor:
    """Positions from a trajectory (+ topology), in units of length_unit_nm, or from an .npz/.npy."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return torch.from_numpy(np.load(path)["positions"])
    if suffix == ".npy":
        return torch.from_numpy(np.load(path))
    import mdtraj

    if suffix != ".pdb" and top is None:
        raise ValueError(f"{path.name} needs a topology (top=...pdb)")
    traj = mdtraj.load(str(path), top=str(top) if top else None)
    return torch.from_numpy(traj.xyz / length_unit_nm)
