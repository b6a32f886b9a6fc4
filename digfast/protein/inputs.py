"""Protein descriptors: AlphaFold2 Evoformer single (L, 384) and pair (L, L, 128)
representations from .npz or .pkl (optionally under a "representations" key), and the
sequence from FASTA."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from digfast.io import InputError

# A pickle may name any global; AlphaFold2's feature pickles need only numpy arrays and
# containers, so nothing else is let through (loading a pickle can otherwise run code).
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise InputError(f"pickle refers to {module}.{name}; only numpy arrays and dicts are read")


def _read_mapping(path: Path) -> dict:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if suffix in (".pkl", ".pickle"):
            with open(path, "rb") as f:
                obj = _ArraysOnly(f).load()
            if not isinstance(obj, dict):
                raise InputError(f"{path.name}: holds a {type(obj).__name__}, not a dict of arrays")
            return obj
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise InputError(f"{path.name}: cannot read it ({type(err).__name__}: {err})") from err
    raise InputError(f"{path.name}: unknown format {suffix!r}; use .npz or .pkl")


def check_representations(single, pair, name: str = "inputs", d_single: int = 384, d_pair: int = 128):
    """(single (L, d_single), pair (L, L, d_pair)) as finite float32 tensors, or InputError."""
    arrays = {}
    for label, a in (("single", single), ("pair", pair)):
        if not isinstance(a, torch.Tensor):
            a = np.asarray(a)
            if a.dtype.kind not in "fiu":  # strings, objects, complex: torch cannot or must not take them
                raise InputError(f"{name}: {label} must be real numbers, got {a.dtype}")
        t = torch.as_tensor(a)
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise InputError(f"{name}: {label} must be real numbers, got {t.dtype}")
        arrays[label] = t
    single, pair = arrays["single"], arrays["pair"]
    if single.dim() != 2 or single.shape[1] != d_single or single.shape[0] < 1:
        raise InputError(f"{name}: single must be (L, {d_single}), got {tuple(single.shape)}")
    L = single.shape[0]
    if tuple(pair.shape) != (L, L, d_pair):
        raise InputError(f"{name}: pair must be ({L}, {L}, {d_pair}) for L = {L}, got {tuple(pair.shape)}")
    single, pair = single.float(), pair.float()
    for label, t in (("single", single), ("pair", pair)):
        if not torch.isfinite(t).all():
            raise InputError(f"{name}: {label} contains NaN/inf")
    return single, pair


def read_representations(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(single (L, 384), pair (L, L, 128)) float32 from an .npz or .pkl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = _read_mapping(path)
    if "representations" in data:
        data = data["representations"]
    missing = [k for k in ("single", "pair") if k not in data]
    if missing:
        raise InputError(f"{path.name}: no {' or '.join(repr(k) for k in missing)} array "
                         f"(it holds {sorted(map(str, data))}); expected AlphaFold2 representations")
    return check_representations(data["single"], data["pair"], path.name)


def read_fasta(path) -> str:
    """The first sequence of a FASTA file (one-letter codes, upper case)."""
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    seq, started = [], False
    for ln in lines:
        if ln.startswith(">"):
            if started:
                break
            started = True
            continue
        seq.append(ln)
    seq = "".join(seq).upper()
    if not seq or not seq.isalpha():
        raise InputError(f"{path.name}: no one-letter sequence found")
    return seq
