"""Fused IPA-style attention of the DiG protein model in Triton (forward only: sampling).

Specification: digfast/ops/ipa_attention.py (ipa_attention_reference). Per batch b, head h,
query i, key j:  s = q.k + w_h sum_p |qp_ip - kp_jp| + bias_hij (-inf on padded keys),
a = softmax_j(s); outputs sum_j a v_j, sum_j a vp_j (global points), sum_j a z_ij.
The pair data (bias (H, L, L), z (L, L, DP)) are one protein's, shared by the batch.

Two kernels, neither materialising (B, H, L, L):
1. _ipa_rows_kernel, one program per (b * h, block of BLOCK_M queries), flash-style over key
   tiles: logits in-tile (q.k by tl.dot, point distances on the CUDA cores, pair bias read
   from the shared (H, L, L) tile), online softmax in base 2, o_scalar and o_point by tl.dot;
   stores the row statistics (m, l).
2. _ipa_pair_kernel, one program per (query i, block of BLOCK_R rows of (b, h)): rebuilds
   the probabilities of those rows for query i from the logits and (m, l), and accumulates
   sum_j a z_ij as tl.dot((BLOCK_R, BLOCK_N) probabilities, (BLOCK_N, DP) tile of z[i]) -
   every tile of the shared pair representation is loaded once per (i, row block) and used
   by all the samples and heads in it (BLOCK_R up to 64 of B * H), on the tensor cores.
So the pair-value output never applies Linear(d_pair -> d_model) to L^2 pairs: the caller
multiplies the (B, H, L, DP) result by each head's weight.

Precision: logits, softmax statistics and accumulators in float32; q, k, v, z and bias may be
float32 (dots in ieee float32) or bfloat16/float16 (dot operands in that dtype); points are
float32 (differences of global coordinates lose digits in 16-bit). Outputs are float32.
Works on triton 3.6 .. newest (no tl.make_block_ptr) and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _logits2(q_ptr, k_ptr, qp_ptr, kp_ptr, bias_ptr, mask_ptr, w,
             q_row, k_row, qp_row, kp_row, bias_off, b, j, j_in, row_in, n_tokens,
             C: tl.constexpr, P: tl.constexpr, HAS_MASK: tl.constexpr):
    """Base-2 logits of a (R, BLOCK_N) tile of R (b, h) rows for one query, keys j (the pair
    kernel's: each row has its own keys, so q.k is a row-wise sum on the CUDA cores).
    q_row / qp_row: (R,) offsets of each row's query vector / points; k_row / kp_row: (R, 1)
    offsets of each row's key block start (+ j * C or j * 3P added here); bias_off (R, N)."""
    s = tl.zeros(bias_off.shape, dtype=tl.float32)
    both = row_in[:, None] & j_in[None, :]
    for c in tl.static_range(C):  # q.k on the CUDA cores (c = 24: small next to the rest)
        qc = tl.load(q_ptr + q_row + c, mask=row_in, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + k_row + j[None, :] * C + c, mask=both, other=0.0).to(tl.float32)
        s += qc[:, None] * kc
    dist = tl.zeros(bias_off.shape, dtype=tl.float32)
    for pt in tl.static_range(P):
        sq = tl.zeros(bias_off.shape, dtype=tl.float32)
        for x in tl.static_range(3):
            qx = tl.load(qp_ptr + qp_row + 3 * pt + x, mask=row_in, other=0.0)
            kx = tl.load(kp_ptr + kp_row + j[None, :] * (3 * P) + 3 * pt + x, mask=both, other=0.0)
            d = qx[:, None] - kx
            sq += d * d
        dist += tl.sqrt(sq)
    bias = tl.load(bias_ptr + bias_off, mask=both, other=0.0).to(tl.float32)
    s = (s + w[:, None] * dist + bias) * LOG2E
    keep = both
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * n_tokens + j[None, :], mask=both, other=0) != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _ipa_rows_kernel(
    q_ptr, k_ptr, v_ptr,     # (B, H, L, C) contiguous
    qp_ptr, kp_ptr,          # (B, H, L, P * 3) float32 contiguous, global points
    vp_ptr,                  # (B, H, L, PV3) float32 contiguous
    w_ptr,                   # (H,) float32 point weights
    bias_ptr,                # (H, L, L) contiguous, shared by the batch
    mask_ptr,                # (B, L) int8 (1 = real key), read when HAS_MASK
    os_ptr,                  # (B, H, L, C) float32 out
    op_ptr,                  # (B, H, L, PV3) float32 out
    stats_ptr,               # (2, B * H * L) float32 out: m (base 2), l
    n_tokens, n_heads, n_rows,
    C: tl.constexpr, C_PAD: tl.constexpr, P: tl.constexpr, PV3: tl.constexpr, PV3_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    i_in = i < n_tokens
    rows = bh * n_tokens + i.to(tl.int64)                     # (BLOCK_M,) row index into (B*H*L)
    w = tl.load(w_ptr + h + tl.zeros((BLOCK_M,), dtype=tl.int64))
    cc = tl.arange(0, C_PAD)
    vv = tl.arange(0, PV3_PAD)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_M, C_PAD), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_M, PV3_PAD), dtype=tl.float32)
    key0 = bh * n_tokens
    q = tl.load(q_ptr + rows[:, None] * C + cc[None, :], mask=i_in[:, None] & (cc[None, :] < C), other=0.0)
    for j0 in range(0, n_tokens, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_in = j < n_tokens
        keys = key0 + j.to(tl.int64)
        k = tl.load(k_ptr + keys[:, None] * C + cc[None, :], mask=j_in[:, None] & (cc[None, :] < C), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)       # (BLOCK_M, BLOCK_N)
        dist = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for pt in tl.static_range(P):
            sq = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for x in tl.static_range(3):
                qx = tl.load(qp_ptr + rows * (3 * P) + 3 * pt + x, mask=i_in, other=0.0)
                kx = tl.load(kp_ptr + keys * (3 * P) + 3 * pt + x, mask=j_in, other=0.0)
                d = qx[:, None] - kx[None, :]
                sq += d * d
            dist += tl.sqrt(sq)
        both = i_in[:, None] & j_in[None, :]
        bias = tl.load(bias_ptr + h * n_tokens * n_tokens + i.to(tl.int64)[:, None] * n_tokens + j[None, :],
                       mask=both, other=0.0).to(tl.float32)
        s = (s + w[:, None] * dist + bias) * LOG2E
        keep = both
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * n_tokens + j, mask=j_in, other=0) != 0)[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + keys[:, None] * C + cc[None, :], mask=j_in[:, None] & (cc[None, :] < C), other=0.0)
        acc_s = acc_s * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        vp = tl.load(vp_ptr + keys[:, None] * PV3 + vv[None, :], mask=j_in[:, None] & (vv[None, :] < PV3), other=0.0)
        acc_p = acc_p * alpha[:, None] + tl.dot(p, vp, input_precision="ieee")
        m = m_new
    has_keys = l > 0.0
    inv = tl.where(has_keys, 1.0 / tl.where(has_keys, l, 1.0), 0.0)
    tl.store(os_ptr + rows[:, None] * C + cc[None, :], acc_s * inv[:, None], mask=i_in[:, None] & (cc[None, :] < C))
    tl.store(op_ptr + rows[:, None] * PV3 + vv[None, :], acc_p * inv[:, None],
             mask=i_in[:, None] & (vv[None, :] < PV3))
    tl.store(stats_ptr + rows, tl.where(has_keys, m, float("inf")), mask=i_in)
    tl.store(stats_ptr + n_rows + rows, l, mask=i_in)


@triton.jit
def _ipa_pair_kernel(
    q_ptr, k_ptr, qp_ptr, kp_ptr, w_ptr, bias_ptr, mask_ptr,   # as in _ipa_rows_kernel
    z_ptr,                   # (L, L, DP) contiguous, shared by the batch
    stats_ptr,               # (2, B * H * L) float32: the rows kernel's (m, l)
    oz_ptr,                  # (B, H, L, DP) float32 out
    n_tokens, n_heads, n_bh, n_rows,
    C: tl.constexpr, P: tl.constexpr, DP: tl.constexpr, DP_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)                          # the query residue
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)     # rows = b * H + h
    r_in = r < n_bh
    r64 = r.to(tl.int64)
    b = r64 // n_heads
    h = r64 % n_heads
    rows = r64 * n_tokens + i                                  # (BLOCK_R,) row of query i
    w = tl.load(w_ptr + h, mask=r_in, other=0.0)
    m = tl.load(stats_ptr + rows, mask=r_in, other=float("inf"))
    l = tl.load(stats_ptr + n_rows + rows, mask=r_in, other=0.0)
    m_use = tl.where(m == float("inf"), 0.0, m)
    inv = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)
    dd = tl.arange(0, DP_PAD)
    acc = tl.zeros((BLOCK_R, DP_PAD), dtype=tl.float32)
    key0 = (r64 * n_tokens)[:, None]
    for j0 in range(0, n_tokens, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_in = j < n_tokens
        bias_off = (h * n_tokens * n_tokens + i * n_tokens)[:, None] + j[None, :]
        s = _logits2(q_ptr, k_ptr, qp_ptr, kp_ptr, bias_ptr, mask_ptr, w,
                     rows * C, key0 * C, rows * (3 * P), key0 * (3 * P),
                     bias_off, b[:, None], j, j_in, r_in, n_tokens, C, P, HAS_MASK)
        p = tl.exp2(s - m_use[:, None]) * inv[:, None]
        zt = tl.load(z_ptr + (i * n_tokens + j.to(tl.int64))[:, None] * DP + dd[None, :],
                     mask=j_in[:, None] & (dd[None, :] < DP), other=0.0)
        acc += tl.dot(p.to(zt.dtype), zt, input_precision=DOT_PRECISION)
    tl.store(oz_ptr + rows[:, None] * DP + dd[None, :], acc, mask=r_in[:, None] & (dd[None, :] < DP))


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def launch_config(n_tokens: int, n_bh: int) -> dict:
    """Tile sizes of both kernels (one place): key tiles of up to 32, query tiles of up to
    32, (b, h) row blocks of up to 64. The pair kernel is not software-pipelined: its loads are
    (rows, keys, channels) gathers, and buffering them for 3 stages asked 680 KB of shared
    memory in fp32 (258 KB in bf16) on an H200, whose limit is 227 KB; one stage needs 41 KB
    (66 KB in bf16), under an A100's 163 KB too."""
    n2 = _pow2(n_tokens)
    return {"BLOCK_M": min(32, n2), "BLOCK_N": min(32, n2), "BLOCK_R": min(64, _pow2(n_bh)), "num_warps": 4,
            "pair_stages": 1}


def check_inputs(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask):
    if q.dim() != 4 or q.shape[2] < 1:
        raise ValueError(f"q must be (batch, heads, residues>=1, head_dim), got {tuple(q.shape)}")
    B, H, L, C = q.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (B, H, L, C):
            raise ValueError(f"{name} must have shape {(B, H, L, C)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if qp.dim() != 5 or tuple(qp.shape[:3]) != (B, H, L) or qp.shape[-1] != 3 or tuple(kp.shape) != tuple(qp.shape):
        raise ValueError(f"qp and kp must be ({B}, {H}, {L}, points, 3), got {tuple(qp.shape)}, {tuple(kp.shape)}")
    if vp.dim() != 5 or tuple(vp.shape[:3]) != (B, H, L) or vp.shape[-1] != 3:
        raise ValueError(f"vp must be ({B}, {H}, {L}, points, 3), got {tuple(vp.shape)}")
    if tuple(point_weight.shape) != (H,):
        raise ValueError(f"point_weight must be ({H},), got {tuple(point_weight.shape)}")
    if tuple(bias.shape) != (H, L, L):
        raise ValueError(f"bias must be ({H}, {L}, {L}) (one protein, shared by the batch), got {tuple(bias.shape)}")
    if z.dim() != 3 or tuple(z.shape[:2]) != (L, L):
        raise ValueError(f"z must be ({L}, {L}, d_pair), got {tuple(z.shape)}")
    for name, t in (("bias", bias), ("z", z)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be bool, got {key_mask.dtype}")
        if tuple(key_mask.shape) != (B, L):
            raise ValueError(f"key_mask must have shape {(B, L)}, got {tuple(key_mask.shape)}")
    interpreted = __import__("os").environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not interpreted:
        raise ValueError("ipa_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1)")


def ipa_attention_triton(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask=None):
    """Same contract as digfast.ops.ipa_attention.ipa_attention_reference; outputs float32."""
    check_inputs(q, k, v, qp, kp, vp, point_weight, bias, z, key_mask)
    B, H, L, C = q.shape
    P, PV, DP = qp.shape[3], vp.shape[3], z.shape[2]
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qp, kp, vp = (t.float().contiguous() for t in (qp, kp, vp))
    bias, z = bias.contiguous(), z.contiguous()
    w = point_weight.float().contiguous()
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else torch.ones(1, dtype=torch.int8, device=dev)
    n_rows = B * H * L
    o_s = torch.empty(B, H, L, C, device=dev, dtype=torch.float32)
    o_p = torch.empty(B, H, L, PV, 3, device=dev, dtype=torch.float32)
    o_z = torch.empty(B, H, L, DP, device=dev, dtype=torch.float32)
    stats = torch.empty(2, n_rows, device=dev, dtype=torch.float32)
    cfg = launch_config(L, B * H)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _ipa_rows_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_M"]))](
        q, k, v, qp, kp, vp, w, bias, mask, o_s, o_p, stats, L, H, n_rows,
        C=C, C_PAD=_pow2(C), P=P, PV3=3 * PV, PV3_PAD=_pow2(3 * PV), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], HAS_MASK=key_mask is not None, DOT_PRECISION=prec, num_warps=cfg["num_warps"])
    _ipa_pair_kernel[(L, triton.cdiv(B * H, cfg["BLOCK_R"]))](
        q, k, qp, kp, w, bias, mask, z, stats, o_z, L, H, B * H, n_rows,
        C=C, P=P, DP=DP, DP_PAD=_pow2(DP), BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"],
        HAS_MASK=key_mask is not None, DOT_PRECISION="ieee" if z.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["pair_stages"])
    return o_s, o_p, o_z
