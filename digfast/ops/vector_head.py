"""Equivariant vector head, pure-torch reference.

    out_i^c = sum_h,f W[h f] sum_j a_hij u_ij^c v_hjf,   u_ij = (r_j - r_i) / |r_j - r_i|
with a_hij the attention of head h (softmax over j of q.k / sqrt(dh) + bias, padded keys and
j = i left out). Rotating r rotates u and so the output; translations do not touch it.
"""
from __future__ import annotations

import torch


def unit_vectors(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, N, N, d): u_ij = (x_j - x_i) / |x_j - x_i|, 0 on the diagonal."""
    delta = x.unsqueeze(1) - x.unsqueeze(2)
    return delta / (delta.norm(dim=-1, keepdim=True) + eps)


def vector_head_reference(attn: torch.Tensor, x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """attn (B, H, N, N) probabilities; x (B, N, d); v (B, H, N, F); weight (H*F,) -> (B, N, d)."""
    u = unit_vectors(x)  # (B, N, N, d)
    # (B, H, N_i, d, F) = sum_j attn[b,h,i,j] u[b,i,j,c] v[b,h,j,f]
    agg = torch.einsum("bhij,bijc,bhjf->bihcf", attn, u, v)
    return torch.einsum("bihcf,hf->bic", agg, weight.reshape(v.shape[1], v.shape[3]))
