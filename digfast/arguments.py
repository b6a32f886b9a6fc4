"""Argument checks shared by the public entry points: each names the argument and the problem."""
from __future__ import annotations

import math
import numbers
import os

import torch


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """value as an int; bools, non-integral floats, strings and out-of-range values raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; known: {sorted(choices)}")
    return value


def check_device(device) -> torch.device:
    """torch.device of device (None: the CPU); a GPU asked for where torch sees none is refused."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no GPU")
    return device


def available_host_bytes() -> int | None:
    """Free physical memory (Linux/macOS sysconf), None where the platform does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(what: str, n_bytes: int, hint: str) -> None:
    """Refuse up front a result larger than the host's free memory, instead of dying mid-run."""
    free = available_host_bytes()
    if free is not None and n_bytes > free:
        raise ValueError(f"{what} needs {n_bytes / 2**30:.1f} GiB of host memory, more than the "
                         f"{free / 2**30:.1f} GiB free; {hint}")
