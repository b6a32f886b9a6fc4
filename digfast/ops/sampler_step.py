"""The fused sampler step: update + counter-based noise + centre-of-mass removal.

    out = P_mask(a * x + b * direction + c * z),   z = philox_normal(seed, sample_ids, step)

x, direction: (B, N, D) float32; mask: (B, N) bool or None (padded atoms are zeroed and
left out of the centre of mass); a, b, c: Python floats shared by the batch. Every
sampler in digfast reduces its update to this form (c = 0 for ODE steps).
"""
from __future__ import annotations

import torch

from digfast.ops import _backend
from digfast.ops.philox import STREAM_STEP, check_seed, philox_normal


def remove_com(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract each structure's centre of mass over its real atoms; zero padded atoms."""
    if mask is None:
        return x - x.mean(dim=1, keepdim=True)
    m = mask.to(x.dtype).unsqueeze(-1)
    com = (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (x - com) * m


def sampler_step_reference(x, direction, a, b, c, *, seed, sample_ids, step, mask=None):
    y = a * x + b * direction
    if c != 0.0:
        noise = philox_normal(seed, sample_ids, step, STREAM_STEP, x.shape[1] * x.shape[2])
        y = y + c * noise.reshape(x.shape)
    return remove_com(y, mask)


def check_step_inputs(x, direction, sample_ids, mask):
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, atoms, dim), got shape {tuple(x.shape)}")
    if direction.shape != x.shape:
        raise ValueError(f"direction shape {tuple(direction.shape)} != x shape {tuple(x.shape)}")
    if x.dtype != torch.float32 or direction.dtype != torch.float32:
        raise TypeError(f"sampler_step needs float32, got {x.dtype} and {direction.dtype}")
    if sample_ids.dtype != torch.int64:
        raise TypeError(f"sample_ids must be int64, got {sample_ids.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if sample_ids.shape != (x.shape[0],):
        raise ValueError(f"sample_ids must be ({x.shape[0]},), got {tuple(sample_ids.shape)}")
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    devices = {t.device for t in (x, direction, sample_ids) if t is not None}
    if mask is not None:
        devices.add(mask.device)
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def sampler_step(x, direction, a, b, c, *, seed, sample_ids, step, mask=None, backend=None):
    """Fused step; backend None picks the fastest available for x's device."""
    check_step_inputs(x, direction, sample_ids, mask)
    check_seed(seed)
    if not 0 <= int(step) < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    name = _backend.choose("sampler_step", x.device, backend)
    if name == "reference":
        return sampler_step_reference(x, direction, a, b, c, seed=seed, sample_ids=sample_ids,
                                      step=step, mask=mask)
    return _backend.impl("sampler_step", name)(x, direction, float(a), float(b), float(c),
                                               seed=seed, sample_ids=sample_ids, step=step, mask=mask)
