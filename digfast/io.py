"""Structures in and out, in formats mdtraj reads.

Positions inside digfast are in the system's length unit (Angstrom unless the system says
otherwise); mdtraj wants nm. 2-D systems are written with z = 0.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

TRAJECTORY_SUFFIXES = {".xtc", ".dcd", ".trr", ".pdb"}
ARRAY_SUFFIXES = {".npz", ".npy"}
PICKLE_SUFFIXES = {".pkl", ".pickle"}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside path (same suffix, so writers pick the same format) and
    rename it onto path only when the block succeeds: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def check_output_path(path) -> Path:
    """Fail before any work: known format and an existing folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TRAJECTORY_SUFFIXES | ARRAY_SUFFIXES:
        raise ValueError(f"unknown output format {suffix!r} for {path}; use one of "
                         f"{sorted(TRAJECTORY_SUFFIXES | ARRAY_SUFFIXES)}")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    return path


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


def xyz_nm(positions: torch.Tensor, system) -> np.ndarray:
    xyz = positions.detach().to("cpu", torch.float32).numpy()
    if xyz.shape[-1] == 2:
        xyz = np.concatenate([xyz, np.zeros_like(xyz[..., :1])], axis=-1)
    if xyz.shape[-1] != 3:
        raise ValueError(f"can only write 2-D or 3-D positions, got dim {xyz.shape[-1]}")
    return xyz * getattr(system, "length_unit_nm", 0.1)


def to_mdtraj(positions: torch.Tensor, system):
    import mdtraj

    return mdtraj.Trajectory(xyz_nm(positions, system), topology(system))


def save(path, positions: torch.Tensor, system, top=None, metadata: dict | None = None) -> list[Path]:
    """Write positions; every file goes through a temporary name, so a failure leaves none behind."""
    path = check_output_path(path)
    suffix = path.suffix.lower()
    positions = torch.as_tensor(positions)
    if positions.dim() != 3 or len(positions) == 0:
        raise ValueError(f"positions must be a non-empty (n, atoms, dim) array, got {tuple(positions.shape)}")
    if suffix in ARRAY_SUFFIXES:
        out = path.with_suffix(".npz")
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, positions=positions.cpu().numpy(), metadata=json.dumps(metadata or {}, default=str))
        return [out]
    traj = to_mdtraj(positions, system)
    if suffix == ".pdb":
        with atomic_path(path) as tmp:
            traj.save(str(tmp))
        return [path]
    top_path = Path(top) if top is not None else path.with_name(path.stem + "_top.pdb")
    with atomic_path(top_path) as tmp_top, atomic_path(path) as tmp:
        traj.save(str(tmp))
        traj[0].save_pdb(str(tmp_top))
    return [path, top_path]


class InputError(ValueError):
    """A structure or ensemble file that cannot be used; the message names the file and the problem."""


def load_positions(path, top=None, length_unit_nm: float = 0.1) -> torch.Tensor:
    """Positions (n, atoms, dim) from a trajectory (+ topology), in units of length_unit_nm, or
    from an .npz/.npy; malformed files raise InputError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InputError(f"{path.name}: pickle files are not read (loading one can run arbitrary code); "
                         "save the array as .npz or .npy")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name} is empty")
    if suffix in ARRAY_SUFFIXES:
        return check_positions(_read_array(path), path.name, allow_flat=True)
    if suffix not in TRAJECTORY_SUFFIXES:
        raise InputError(f"{path.name}: unknown format {suffix!r}; read are {sorted(TRAJECTORY_SUFFIXES | ARRAY_SUFFIXES)}")
    if suffix != ".pdb" and top is None:
        raise InputError(f"{path.name} needs a topology (top=...pdb)")
    if top is not None and not Path(top).is_file():
        raise FileNotFoundError(f"no such topology file: {top}")
    import mdtraj

    try:
        traj = mdtraj.load(str(path), top=str(top) if top else None)
    except Exception as err:  # mdtraj raises many types (IOError, ValueError, IndexError...) for bad files
        raise InputError(f"{path.name}: not a readable {suffix[1:]} file ({type(err).__name__}: {err})") from err
    if traj.n_frames == 0 or traj.n_atoms == 0:
        raise InputError(f"{path.name} holds no structures ({traj.n_frames} frames, {traj.n_atoms} atoms)")
    return check_positions(torch.from_numpy(traj.xyz / length_unit_nm), path.name)


def _read_array(path: Path) -> torch.Tensor:
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if "positions" not in data.files:
                    raise InputError(f"{path.name} has no 'positions' array (it holds {sorted(data.files)})")
                data = data["positions"]
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise InputError(f"{path.name}: cannot read it as a numpy array, truncated or corrupt? "
                         f"({type(err).__name__}: {err})") from err
    return data


def check_positions(x, name: str = "positions", allow_flat: bool = False) -> torch.Tensor:
    """x as a float tensor (n, atoms, dim) with finite entries, or InputError saying what is wrong.
    allow_flat also takes (n, atoms * dim) rows, as training data files may hold them."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise InputError(f"{name}: positions must be real numbers, got dtype {x.dtype}")
        x = torch.from_numpy(np.asarray(x, order="C"))  # (ascontiguousarray would make 0-d arrays 1-d)
    x = torch.as_tensor(x)
    if x.dtype == torch.bool or x.is_complex():
        raise InputError(f"{name}: positions must be real numbers, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if allow_flat and x.dim() == 2:
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise InputError(f"{name}: no structures or no coordinates, shape {tuple(x.shape)}")
        return _check_finite(x, name)
    if x.dim() != 3:
        raise InputError(f"{name}: positions must be (n, atoms, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{name}: no structures, shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise InputError(f"{name}: empty system (no atoms), shape {tuple(x.shape)}")
    if x.shape[2] not in (2, 3):
        raise InputError(f"{name}: positions must be 2-D or 3-D points, got dim {x.shape[2]}")
    return _check_finite(x, name)


def _check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    bad = ~torch.isfinite(x).flatten(1).all(1)
    if bad.any():
        idx = torch.nonzero(bad).flatten()[:5].tolist()
        raise InputError(f"{name}: {int(bad.sum())} structures contain NaN/inf coordinates (first: {idx})")
    return x
