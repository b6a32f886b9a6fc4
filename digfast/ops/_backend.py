"""One place that decides which implementation of an op runs.

Backends: "reference" (pure torch, always there), "cpp" (digfast._C on the CPU),
"cuda" (digfast._C built with CUDA), "triton" (kernels/ on a GPU). The choice depends
on the device and on what is installed; DIGFAST_BACKEND=reference forces the oracle, and
DIGFAST_BACKEND=<name> forces <name> on the ops that have it (the others run their reference).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("digfast")

# op -> backend -> "module:function"; the reference is dispatched by the op itself.
_REGISTRY: dict[str, dict[str, str]] = {
    "sampler_step": {
        "cpp": "digfast.ops._compiled:sampler_step_cpp",
        "cuda": "digfast.ops._compiled:sampler_step_cuda",
        "triton": "digfast.kernels.sampler_step:sampler_step_triton",
    },
    "spatial_bias": {"triton": "digfast.kernels.spatial_bias:spatial_bias_triton"},
    "pair_bias_attention": {"triton": "digfast.kernels.pair_bias_attention:pair_bias_attention_triton"},
    "fused_vector_head": {"triton": "digfast.kernels.vector_head:fused_vector_head_triton"},
    "ipa_attention": {"triton": "digfast.kernels.ipa_attention:ipa_attention_triton"},
}


@functools.cache
def compiled():
    """digfast._C or None; says once why it is missing."""
    try:
        return importlib.import_module("digfast._C")
    except ImportError as err:
        log.warning("digfast: compiled core not available (%s); using the pure-torch path", err)
        return None


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def available(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpp":
        return device.type == "cpu" and compiled() is not None
    if name == "cuda":
        C = compiled()
        return device.type == "cuda" and C is not None and C.has_cuda()
    if name == "triton":
        return device.type == "cuda" and triton_available()
    raise ValueError(f"unknown backend {name!r}")


def choose(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs op on device. An explicit per-call backend must be one of op's
    and available, or this raises. The global DIGFAST_BACKEND override applies to every op
    at once, so an op without that backend (e.g. "cpp" for a Triton-only op) runs its
    reference instead of failing; an op that has it must be able to use it on device."""
    if backend is not None:
        if backend != "reference" and backend not in _REGISTRY[op]:
            raise ValueError(f"{op} has no backend {backend!r}; it has "
                             f"{['reference', *_REGISTRY[op]]}")
        # Triton under TRITON_INTERPRET=1 runs on the CPU when asked for by name (tests)
        interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if not (available(backend, device) or interpreted and triton_available()):
            raise RuntimeError(f"backend {backend!r} of {op} is not available on {device}")
        return backend
    forced = os.environ.get("DIGFAST_BACKEND")
    if forced:
        if forced != "reference" and forced not in _REGISTRY[op]:
            available(forced, device)  # still refuse a name that is no backend at all
            _log_fallback(op, forced)
            return "reference"
        if not available(forced, device):
            raise RuntimeError(f"DIGFAST_BACKEND={forced!r} is not available on {device}")
        return forced
    for name in ("cpp", "cuda", "triton"):
        if name in _REGISTRY[op] and available(name, device):
            return name
    return "reference"


@functools.cache
def _log_fallback(op: str, forced: str) -> None:
    log.info("digfast: %s has no %r backend; DIGFAST_BACKEND=%s runs its reference", op, forced,
             forced)


@functools.cache
def impl(op: str, name: str):
    module, function = _REGISTRY[op][name].split(":")
    return getattr(importlib.import_module(module), function)
