"""Attention with an additive per-head pair bias and key padding, pure-torch reference.

For a batch element b and head h, with q, k, v (N, dh), bias (N, N) and keys j kept by the
padding mask,
    s_ij = q_i . k_j / sqrt(dh) + bias_ij          (-inf for a padded key j)
    out_i = sum_j softmax_j(s_ij) v_j
A query row with no key left (every key padded, or every logit -inf) returns zeros, not the
NaN of a 0/0 softmax. This is Graphormer-3D's F.scaled_dot_product_attention(q, k, v,
attn_mask=bias) with the padding given as a mask instead of -inf in the bias.

pair_bias_attention() dispatches between this reference (the CPU default and the test
oracle) and the flash-style Triton kernel (kernels/pair_bias_attention.py) on a GPU. Both
differentiate in reverse and forward mode (torch.func.jvp / vmap, for the likelihood's
divergence); float64 inputs always take the reference.
"""
from __future__ import annotations

import math

import torch

from digfast.ops import _backend


def attention_probabilities(q, k, bias=None, key_mask=None):
    """softmax_j(q_i.k_j / sqrt(dh) + bias_ij) over unpadded keys, (B, H, M, N); q (B, H, M, dh),
    k (B, H, N, dh), bias (B, H, M, N) or None, key_mask (B, N) bool (False = padded key) or
    None. Rows without any key give 0, not NaN."""
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    # shift by the row max (detached: the softmax does not depend on the shift), or by 0 when
    # the max is -inf, so that an all-padded row sums to 0 instead of dividing 0 by 0
    top = logits.detach().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(logits - top)
    total = p.sum(dim=-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


def pair_bias_attention_reference(q, k, v, bias=None, key_mask=None):
    """q, k, v (B, H, N, dh); bias (B, H, N, N) additive logits or None; key_mask (B, N) bool,
    False = padded key. Returns (B, H, N, dh). Materialises the (B, H, N, N) logits."""
    return attention_probabilities(q, k, bias, key_mask).to(v.dtype) @ v


def pair_bias_attention(q, k, v, bias=None, key_mask=None, *, backend=None):
    """softmax(q k^T / sqrt(dh) + bias) v over unpadded keys, (B, H, N, dh); backend None picks
    the fastest available for q's device (the Triton kernel on a GPU, else the reference;
    DIGFAST_BACKEND overrides)."""
    name = _backend.choose("pair_bias_attention", q.device, backend)
    if backend is None and q.dtype == torch.float64:
        name = "reference"  # the kernels have no float64 (float64 networks: likelihood checks)
    if name == "reference":
        return pair_bias_attention_reference(q, k, v, bias, key_mask)
    return _backend.impl("pair_bias_attention", name)(q, k, v, bias, key_mask)
