"""Equivariant vector head, pure-torch reference.

    out_i^c = sum_h,f W[h f] sum_j a_hij u_ij^c v_hjf,   u_ij = (r_j - r_i) / |r_j - r_i|
with a_hij the attention of head h (softmax over j of q.k / sqrt(dh) + bias, padded keys and
j = i left out). Rotating r rotates u and so the output; translations do not touch it.

vector_head() is the model's entry: the reference (attention probabilities, then the sum
above) on the CPU, or the fused Triton kernel (kernels/vector_head.py: forward, chunked
reference backward, fused tangent kernel for forward mode) on a GPU.
"""
from __future__ import annotations

import torch

from digfast.ops import _backend
from digfast.ops.pair_bias_attention import attention_probabilities


def unit_vectors_between(x_query: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, M, N, d): u_ij = (x_j - x_i) / |x_j - x_i| from the M query atoms x_query (B, M, d)
    to the N atoms x (B, N, d); 0 where the two coincide (u_ii).

    The zero carries no gradient: delta_ii = x_i - x_i is 0 identically, yet through
    delta / (|delta| + eps) autograd would send +-g/eps to x_i along two paths that cancel only
    to rounding, O(1e-1) noise in float32 Jacobians (the likelihood's divergences).
    A query atom that is also a key atom must have the very same coordinates in both.
    """
    delta = x.unsqueeze(1) - x_query.unsqueeze(2)
    sq = delta.pow(2).sum(dim=-1, keepdim=True)
    # sqrt of a 0 that never reaches sqrt: derivatives of every order stay finite (PIDP
    # differentiates this three times; torch's norm backward is not twice differentiable at 0)
    zero = sq == 0
    r = torch.where(zero, torch.zeros_like(sq), torch.sqrt(torch.where(zero, torch.ones_like(sq), sq)))
    return torch.where(zero, torch.zeros_like(delta), delta / (r + eps))


def unit_vectors(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, N, N, d): u_ij = (x_j - x_i) / |x_j - x_i|, 0 on the diagonal."""
    return unit_vectors_between(x, x, eps)


def vector_head_reference(attn: torch.Tensor, x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """attn (B, H, N, N) probabilities; x (B, N, d); v (B, H, N, F); weight (H*F,) -> (B, N, d)."""
    u = unit_vectors(x)  # (B, N, N, d)
    # (B, H, N_i, d, F) = sum_j attn[b,h,i,j] u[b,i,j,c] v[b,h,j,f]
    agg = torch.einsum("bhij,bijc,bhjf->bihcf", attn, u, v)
    return torch.einsum("bihcf,hf->bic", agg, weight.reshape(v.shape[1], v.shape[3]))


# ---- the head with the value weights folded in -------------------------------------------
# sum_f W[h,f] v_hjf does not depend on i, so it can be taken before the attention sum:
#     out_i^c = sum_h sum_j a_hij u_ij^c vw_hj,   vw_hj = sum_f W[h,f] v_hjf.
# With a scalar value per (head, atom) the whole head is one pass over the logits that keeps
# a d-vector per query row: the Triton kernel (kernels/vector_head.py) fuses the softmax into it.

def fused_vector_head_rows_reference(q, k, bias, x_query, x, vw, key_mask=None, eps: float = 1e-6):
    """The fused head for a block of query rows: q (B, H, M, dh) and x_query (B, M, d) of the
    M query atoms, k (B, H, N, dh), x (B, N, d) and vw (B, H, N) of all atoms, bias (B, H, M, N)
    or None, key_mask (B, N) bool (False = padded key) or None. Returns (B, M, d).
    A query atom that is also a key atom must have the very same coordinates in x_query and x
    (a slice of x), so that its own u_ii is exactly 0. Rows without any key give 0."""
    p = attention_probabilities(q, k, bias, key_mask)
    u = unit_vectors_between(x_query, x, eps)
    return torch.einsum("bhij,bijc,bhj->bic", p, u, vw)


def fused_vector_head_reference(q, k, bias, x, vw, key_mask=None):
    """sum_h sum_j softmax_j(q_i.k_j / sqrt(dh) + bias_hij) u_ij vw_hj, (B, N, d).
    q, k (B, H, N, dh); bias (B, H, N, N) or None; x (B, N, d); vw (B, H, N); key_mask (B, N)
    bool or None. Equals vector_head_reference(softmax(...), x, v, W) with
    vw = einsum("bhjf,hf->bhj", v, W). Materialises the (B, H, N, N) logits."""
    return fused_vector_head_rows_reference(q, k, bias, x, x, vw, key_mask)


def fused_vector_head(q, k, bias, x, vw, key_mask=None, *, backend=None):
    """The fused head (see fused_vector_head_reference); backend None picks the fastest
    available for q's device (the Triton kernel on a GPU, else the reference;
    DIGFAST_BACKEND overrides)."""
    name = _backend.choose("fused_vector_head", q.device, backend)
    if name == "reference":
        return fused_vector_head_reference(q, k, bias, x, vw, key_mask)
    return _backend.impl("fused_vector_head", name)(q, k, bias, x, vw, key_mask)


def vector_head(q, k, bias, x, v, weight, key_mask=None, *, backend=None):
    """The model's head from its per-feature values: sum_h sum_j softmax_j(q.k / sqrt(dh) +
    bias)_hij u_ij sum_f W[h f] v_hjf, (B, N, d); v (B, H, N, F), weight (H*F,). The backend is
    chosen per call (x's device, q's dtype, what is installed): the reference is the
    attention probabilities and vector_head_reference, exactly the unfused computation (the
    CPU default, every order of derivative); the Triton backend folds W into the values
    (vw, one scalar per head and atom) and runs the fused kernel, float32 only, so other
    dtypes take the reference unless a backend is named."""
    name = _backend.choose("fused_vector_head", q.device, backend)
    if backend is None and q.dtype != torch.float32:
        name = "reference"  # the kernel is float32 only (float64 networks, autocast)
    if name == "reference":
        return vector_head_reference(attention_probabilities(q, k, bias, key_mask), x, v, weight)
    vw = torch.einsum("bhjf,hf->bhj", v, weight.reshape(v.shape[1], v.shape[3]))
    return _backend.impl("fused_vector_head", name)(q, k, bias, x, vw, key_mask)
