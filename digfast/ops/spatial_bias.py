"""Gaussian-basis spatial pair bias (Graphormer-3D), pure-torch reference.

For atoms i, j with types a_i, a_j at distance d_ij:
    y_ij = mul[a_i, a_j] d_ij + add[a_i, a_j]                     (per type-pair affine)
    phi_ijk = exp(-1/2 ((y_ij - mu_k) / s_k)^2) / (sqrt(2 pi) s_k)   (K Gaussians)
    bias_ij = MLP(phi_ij)  in R^H                                    (K -> K -> H, GELU)
Returned as (B, H, N, N) attention bias plus the per-atom sum of phi over real neighbours,
(B, N, K), which the model turns into node features.

spatial_bias() dispatches between this reference (the CPU default and the test oracle) and
the fused Triton kernel (kernels/spatial_bias.py) on a GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from digfast.ops import _backend


def gaussian_basis(y: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """(..., ) -> (..., K)."""
    stds = stds.abs() + 1e-2
    z = (y.unsqueeze(-1) - means) / stds
    return torch.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * stds)


def pairwise_distances(x_query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, M, N): |x_j - x_i| from the M query atoms x_query (B, M, d) to the N atoms x (B, N, d).

    Summed squares rather than torch.cdist: cdist has no forward-mode derivative (the
    likelihood's divergence pushes tangents through here) and from N > 25 on takes the
    |a|^2 + |b|^2 - 2 a.b route, whose rounding leaves ~1e-3 (float32) on coincident atoms;
    the Triton kernel sums squares too. The square root is taken only where r^2 > 0, so
    that a zero distance has a zero derivative in both modes instead of 0/0.
    """
    delta = x.unsqueeze(1) - x_query.unsqueeze(2)
    r2 = (delta * delta).sum(-1)
    apart = r2 > 0
    return torch.where(apart, torch.where(apart, r2, torch.ones_like(r2)).sqrt(), torch.zeros_like(r2))


def spatial_bias_reference(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask=None):
    """x (B, N, d); pair_type (B, N, N) long index into mul/add (T,); means/stds (K,);
    w1 (K, K), b1 (K,), w2 (H, K), b2 (H,). Returns bias (B, H, N, N), node_features (B, N, K)."""
    dist = pairwise_distances(x, x)
    y = mul[pair_type] * dist + add[pair_type]
    phi = gaussian_basis(y, means, stds)  # (B, N, N, K)
    bias = F.linear(F.gelu(F.linear(phi, w1, b1)), w2, b2).permute(0, 3, 1, 2)
    if mask is not None:
        phi = phi * (mask[:, None, :, None] & mask[:, :, None, None]).to(phi.dtype)
    return bias.contiguous(), phi.sum(dim=2)


def spatial_bias_rows_reference(x, rows: slice, pair_type, mul, add, means, stds, w1, b1, w2, b2,
                                mask=None):
    """spatial_bias_reference restricted to the query atoms `rows`: bias (B, H, r, N) and
    node_features (B, r, K) of those rows, the same operations on a (B, r, N, K) slab. The
    Triton backend's backward differentiates this chunk by chunk to bound memory."""
    dist = pairwise_distances(x[:, rows], x)
    types = pair_type[:, rows]
    y = mul[types] * dist + add[types]
    phi = gaussian_basis(y, means, stds)  # (B, r, N, K)
    bias = F.linear(F.gelu(F.linear(phi, w1, b1)), w2, b2).permute(0, 3, 1, 2)
    if mask is not None:
        phi = phi * (mask[:, None, :, None] & mask[:, rows, None, None]).to(phi.dtype)
    return bias.contiguous(), phi.sum(dim=2)


def spatial_bias(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask=None, *, backend=None):
    """bias (B, H, N, N), node_features (B, N, K); backend None picks the fastest available
    for x's device and dtype (the Triton kernel on a GPU for float32/16-bit inputs, else the
    reference; DIGFAST_BACKEND overrides). Both outputs come from the kernel: it sums the
    masked Gaussians per atom in the same tiles as the bias."""
    name = _backend.choose("spatial_bias", x.device, backend)
    if backend is None and x.dtype == torch.float64:
        name = "reference"  # the kernel has no float64 (float64 networks: likelihood checks)
    if name == "reference":
        return spatial_bias_reference(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask)
    return _backend.impl("spatial_bias", name)(x, pair_type, mul, add, means, stds, w1, b1, w2, b2,
                                               mask)
