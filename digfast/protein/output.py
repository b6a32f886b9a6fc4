"""Write sampled backbones through mdtraj, streamed chunk by chunk: .xtc (+ a topology PDB
beside it), multi-model .pdb, or .npz of the raw frames. Every file appears under its name
only when complete (temporary name + rename)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from digfast.protein.backbone import backbone_atoms, topology

SUFFIXES = (".xtc", ".pdb", ".npz")


class BackboneWriter:
    """with BackboneWriter(path, sequence) as w: w.write(tr, rot) per chunk of structures."""

    def __init__(self, path, sequence: str):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in SUFFIXES:
            raise ValueError(f"unknown output format {self.suffix!r} for {self.path}; use one of {SUFFIXES}")
        if not self.path.parent.exists():
            raise FileNotFoundError(f"output folder {self.path.parent} does not exist")
        self.sequence = sequence
        self.top = topology(sequence)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial-{os.getpid()}{self.path.suffix}")
        self.n_written, self._file, self._frames = 0, None, []
        self.paths = [self.path]

    def __enter__(self):
        return self

    def write(self, tr: torch.Tensor, rot: torch.Tensor) -> None:
        if tr.shape[-2] != len(self.sequence):
            raise ValueError(f"structures have {tr.shape[-2]} residues, the sequence {len(self.sequence)}")
        if self.suffix == ".npz":
            self._frames.append((tr.detach().cpu().float().numpy(), rot.detach().cpu().float().numpy()))
        else:
            xyz = backbone_atoms(tr.double(), rot.double()).flatten(-3, -2).cpu().numpy()  # (n, 4L, 3) A
            self._write_atoms(xyz, self.n_written)
        self.n_written += tr.shape[0]

    def _write_atoms(self, xyz_angstrom: np.ndarray, first_index: int) -> None:
        from mdtraj.formats import PDBTrajectoryFile, XTCTrajectoryFile

        if self._file is None:
            self._file = (XTCTrajectoryFile(str(self.tmp), "w") if self.suffix == ".xtc"
                          else PDBTrajectoryFile(str(self.tmp), "w"))
        if self.suffix == ".xtc":
            self._file.write((xyz_angstrom * 0.1).astype(np.float32))
        else:
            for k, model in enumerate(xyz_angstrom):
                self._file.write(model, self.top, modelIndex=first_index + k)

    def close(self, ok: bool = True) -> list[Path]:
        if self._file is not None:
            self._file.close()
        if self.suffix == ".npz" and ok and self._frames:
            tr = np.concatenate([f[0] for f in self._frames])
            rot = np.concatenate([f[1] for f in self._frames])
            with open(self.tmp, "wb") as f:
                np.savez(f, tr=tr, rot_mat=rot, sequence=np.array(self.sequence))
        if not ok or self.n_written == 0:
            self.tmp.unlink(missing_ok=True)
            return []
        os.replace(self.tmp, self.path)
        if self.suffix == ".xtc":
            import mdtraj

            top_path = self.path.with_name(self.path.stem + "_top.pdb")
            first = mdtraj.load_frame(str(self.path), 0, top=self.top)
            first.save_pdb(str(top_path))
            self.paths.append(top_path)
        return self.paths

    def __exit__(self, kind, value, tb):
        self.close(ok=kind is None)
        return False


def save_backbones(path, tr: torch.Tensor, rot: torch.Tensor, sequence: str) -> list[Path]:
    """Write structures (n, L, 3) + (n, L, 3, 3) in one go; returns the files written."""
    with BackboneWriter(path, sequence) as w:
        w.write(tr, rot)
    return w.paths
