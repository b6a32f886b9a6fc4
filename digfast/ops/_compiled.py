"""Thin wrappers over digfast._C: allocate the output, pass the thread cap or the stream.

The compiled op takes raw pointers and checks every tensor (dtype, shape, device,
contiguity) itself; here inputs are made contiguous (a no-op in the usual case) so the
compiled path accepts whatever the reference accepts. The compiled ops have no backward:
asking for gradients through them is an error rather than a silent detach.
"""
from __future__ import annotations

import torch

from digfast import _C


def _check_no_grad(x: torch.Tensor, direction: torch.Tensor, name: str) -> None:
    if torch.is_grad_enabled() and (x.requires_grad or direction.requires_grad):
        raise RuntimeError(
            f"sampler_step backend {name!r} has no backward; call it under torch.no_grad() "
            "(sampling needs no gradients) or use backend='reference'")


def _mask_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.contiguous()


def sampler_step_cpp(x, direction, a: float, b: float, c: float, *, seed, sample_ids, step,
                     mask=None):
    """The fused sampler step on the CPU (C++, threads over the batch)."""
    _check_no_grad(x, direction, "cpp")
    x, direction = x.contiguous(), direction.contiguous()
    out = torch.empty_like(x)
    _C.sampler_step_cpu(out=out, x=x, direction=direction, a=a, b=b, c=c, seed=seed,
                        sample_ids=sample_ids.contiguous(), step=step,
                        mask=_mask_or_none(mask), num_threads=torch.get_num_threads())
    return out


def sampler_step_cuda(x, direction, a: float, b: float, c: float, *, seed, sample_ids, step,
                      mask=None):
    """The fused sampler step on a GPU, on the current stream of x's device."""
    _check_no_grad(x, direction, "cuda")
    x, direction = x.contiguous(), direction.contiguous()
    out = torch.empty_like(x)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    _C.sampler_step_cuda(out=out, x=x, direction=direction, a=a, b=b, c=c, seed=seed,
                         sample_ids=sample_ids.contiguous(), step=step,
                         mask=_mask_or_none(mask), stream=stream)
    return out
