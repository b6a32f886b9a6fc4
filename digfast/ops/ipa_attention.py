"""IPA-style attention core of the DiG protein model, pure-torch reference + dispatch.

For batch element b, head h, query i and key j (keys with key_mask False are dropped):
    s_hij = q_hi . k_hj                       (q already scaled by 1/sqrt(3 c))
            + w_h sum_p |qp_hip - kp_hjp|     (Euclidean norm, not squared; w_h < 0)
            + bias_hij                        (per-protein pair bias, shared by the batch)
    a_hij = softmax_j(s_hij)
outputs, per (b, h, i):
    o_scalar = sum_j a_hij v_hj               (c)
    o_point  = sum_j a_hij vp_hj              (Pv, 3), global frame
    o_pair   = sum_j a_hij z_ij               (d_pair): z shared by the batch, the caller
                                              applies the pair-value weight per head after
The pair data (bias (H, L, L), z (L, L, d_pair)) have no batch axis: one protein, many
samples. A query row without keys returns zeros.
"""
from __future__ import annotations

import torch

from digfast.ops import _backend


def _acc(t):
    """Accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def point_distance_sum(qp, kp):
    """sum_p |qp_ip - kp_jp|, (B, H, L, L), from qp, kp (B, H, L, P, 3). Difference form, one
    coordinate at a time on contiguous (B, H, P, L, L) tensors (not the Gram trick, whose
    cancellation loses digits when points are far from the origin)."""
    q = qp.permute(0, 1, 3, 4, 2)  # (B, H, P, 3, L)
    k = kp.permute(0, 1, 3, 4, 2)
    sq = None
    for x in range(3):
        d = q[:, :, :, x, :, None] - k[:, :, :, x, None, :]
        sq = d.square_() if sq is None else sq.add_(d.square_())
    return sq.sqrt_().sum(2)


def ipa_logits(q, k, qp, kp, point_weight, bias, key_mask=None):
    """(B, H, L, L) logits in float32 (float64 for float64 q) (see module docstring)."""
    acc = _acc(q)
    s = q.to(acc) @ k.to(acc).transpose(-1, -2)
    s = s + point_weight.view(1, -1, 1, 1).to(acc) * point_distance_sum(qp.to(acc), kp.to(acc))
    s = s + bias.to(acc)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return s


def ipa_attention_reference(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask=None):
    """q, k, v (B, H, L, c); qp, kp (B, H, L, P, 3), vp (B, H, L, Pv, 3) global points;
    point_weight (H,); bias (H, L, L); z (L, L, d_pair); key_mask (B, L) bool (False = padded)
    or None. Returns (o_scalar (B, H, L, c), o_point (B, H, L, Pv, 3), o_pair (B, H, L, d_pair)),
    float32 (o_scalar and o_pair in v's / z's dtype)."""
    B, H, L, _ = q.shape
    s = ipa_logits(q, k, qp, kp, point_weight, bias, key_mask)
    top = s.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(s - top)
    total = p.sum(dim=-1, keepdim=True)
    a = p / torch.where(total > 0, total, torch.ones_like(total))
    o_scalar = (a.to(v.dtype) @ v)
    o_point = (a @ vp.to(a.dtype).flatten(-2)).view(B, H, L, -1, 3)
    # sum_j a_bhij z_ij: for each query i one (B*H, L) x (L, d_pair) product, z not copied
    a_i = a.to(z.dtype).permute(2, 0, 1, 3).reshape(L, B * H, L)
    o_pair = torch.bmm(a_i, z).view(L, B, H, -1).permute(1, 2, 0, 3)
    return o_scalar, o_point, o_pair


def ipa_attention(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask=None, *, backend=None):
    """The attention core; backend None picks the fastest available for q's device (the fused
    Triton kernel on a GPU, else the reference; DIGFAST_BACKEND overrides)."""
    name = _backend.choose("ipa_attention", q.device, backend)
    if backend is None and q.dtype == torch.float64:
        name = "reference"
    if name == "reference":
        return ipa_attention_reference(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask)
    return _backend.impl("ipa_attention", name)(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask)
