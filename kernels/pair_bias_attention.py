"""Pair-bias flash attention in Triton: online softmax over key tiles, forward, backward, JVP.

Specification: digfast/ops/pair_bias_attention.py (pair_bias_attention_reference):
    out = softmax(q k^T / sqrt(dh) + bias) v over unpadded keys; rows with no key -> 0.

Forward: one program per (batch * head, tile of BLOCK_M queries) walks the key tiles once,
keeping the running row maximum m, the running sum l and the unnormalised output; each tile
rescales them by 2^(m_old - m_new). So the (B, H, N, N) probabilities never exist in memory;
the bias is read once. The logits are kept in base 2 (multiplied by log2 e, so the
exponentials are exp2, the GPU's native one). The program stores the row log-sum-exp
lse2 = m + log2(l) in two parts, stats = (m, log2 l) (m = +inf, log2 l = 0 for a row without
keys), which is all the backward needs to rebuild any probability tile:
p_ij = 2^((s2_ij - m_i) - log2 l_i). Two parts because lse2 itself, of size |s2| (tens with a
large bias), would be rounded to |s2| * 2^-24 and shift every p of the row by as much;
s2 - m is exact near the maximum, where p matters.

Backward (delta_i = sum_d dout_id out_id, computed in torch first):
    dp = dout v^T,  ds_ij = p_ij (dp_ij - delta_i),
    dbias = ds,  dq = ds k / sqrt(dh),  dk = ds^T q / sqrt(dh),  dv = p^T dout.
Two kernels, both recomputing p tile by tile from q, k, bias and stats: one per key tile
accumulates dk and dv over the query tiles and stores each ds tile as dbias (each (i, j)
tile is written by exactly one program: no atomics); one per query tile accumulates dq over
the key tiles. Deterministic, nothing (B, H, N, N) besides dbias itself (the bias is an input
of the op, so its gradient is that big; the kernel skips it when the bias needs no grad).

Head dims need not be powers of two (24 = 768 / 32, 12, ...): the feature axis is padded to
D_PAD (a power of two, at least 16 for tl.dot) inside the kernel with masked loads (zeros add
nothing to the dots) and masked stores. Any N >= 1; tiles past N are masked the same way.
q, k, v, bias and dout may have any strides (Graphormer-3D's q, k, v are permuted views of
one qkv projection; an expanded bias is fine).

Precision: float32 inputs use full-precision float32 dots (input_precision="ieee", no TF32),
float16/bfloat16 inputs feed their own dtype to the tensor cores with float32 accumulation;
softmax statistics and all elementwise arithmetic are float32 (tl.exp2 is the hardware
ex2.approx on NVIDIA GPUs, within about 2 ulp; numpy's in the interpreter), the
probabilities are rounded to the 16-bit dtype only as dot operands. Outputs and gradients come
back in the input dtypes (dbias in the bias's dtype).

Forward mode (JVP; the likelihood's batched Hutchinson divergence): with tangents dq, dk, dv,
dbias, the logits move by ds_ij = (dq_i.k_j + q_i.dk_j) / sqrt(dh) + dbias_ij and
    d out_i = sum_j p_ij (ds_ij v_j + dv_j) - (sum_j p_ij ds_ij) out_i.
One kernel, one program per (tangent set, batch * head, query tile), rebuilds p tile by tile
from the forward's stats (as the backward does, so no rescaling) and accumulates the two sums;
T tangent sets share the primal (torch.func.vmap over K probes is one launch with T = K: the
tangent is a Function of its own with a vmap rule). torch.func.jvp, torch.autograd.forward_ad
and vmap over structures (folded into the batch) all work. In-tile recomputation of the
spatial bias instead of reading it is not done here.

Works on triton 3.6 .. newest (no tl.make_block_ptr) and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # a (BLOCK, D_PAD) float32 accumulator per program must fit in registers


@triton.jit
def _load_rows(base_ptr, r, stride_r, d, stride_d, mask):
    """A (rows, D_PAD) tile of a (N, DH) matrix with any strides; zeros where masked (padded
    features and rows past N add nothing to the dots)."""
    return tl.load(base_ptr + r.to(tl.int64)[:, None] * stride_r + d[None, :] * stride_d,
                   mask=mask, other=0.0)


@triton.jit
def _row_stats(stats_ptr, row0, n_rows, i, i_in):
    """The forward's (m, log2 l) of rows row0 + i. Rows past N get m = +inf, so that their
    p = 2^(s - inf) = 0, as on rows without keys."""
    m = tl.load(stats_ptr + row0 + i, mask=i_in, other=float("inf"))
    log2_sum = tl.load(stats_ptr + n_rows + row0 + i, mask=i_in, other=0.0)
    return m, log2_sum


@triton.jit
def _logits(q, k, bias_ptr, mask_ptr, b, i, j, i_in, j_in, n_tokens, scale2,
            stride_bi, stride_bj, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Base-2 logits of a (BLOCK_M, BLOCK_N) tile: log2(e) (q k^T / sqrt(dh) + bias), -inf on
    keys that are past N or padded. bias_ptr already points at this (batch, head)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
    if HAS_BIAS:
        bias_off = i.to(tl.int64)[:, None] * stride_bi + j.to(tl.int64)[None, :] * stride_bj
        bias = tl.load(bias_ptr + bias_off, mask=i_in[:, None] & j_in[None, :], other=0.0)
        s += bias.to(tl.float32) * LOG2E
    keep = j_in
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * n_tokens + j, mask=j_in, other=0) != 0)
    return tl.where(keep[None, :], s, float("-inf"))


@triton.jit
def _pair_bias_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,    # (B, H, N, DH), any strides
    bias_ptr,               # (B, H, N, N), any strides, read only when HAS_BIAS
    mask_ptr,               # (B, N) bool contiguous, read only when HAS_MASK
    o_ptr,                  # (B, H, N, DH) contiguous, output
    stats_ptr,              # (2, B, H, N) float32 contiguous, output: row max m, log2 l
    n_tokens, n_heads, n_rows, scale2,  # N, H, B * H * N, log2(e) / sqrt(DH)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    DH: tl.constexpr,
    D_PAD: tl.constexpr,     # next power of two >= max(DH, 16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands
):
    bh = tl.program_id(0).to(tl.int64)  # batch * heads on axis 0: up to 2^31 - 1 programs
    b = bh // n_heads
    h = bh % n_heads
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    i_in = i < n_tokens
    d_in = d < DH
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh
    q = _load_rows(q_base, i, stride_qn, d, stride_qd, i_in[:, None] & d_in[None, :])

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for j0 in range(0, n_tokens, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_in = j < n_tokens
        kv_mask = j_in[:, None] & d_in[None, :]
        k = _load_rows(k_base, j, stride_kn, d, stride_kd, kv_mask)
        s = _logits(q, k, bias_base, mask_ptr, b, i, j, i_in, j_in, n_tokens, scale2,
                    stride_bi, stride_bj, HAS_BIAS, HAS_MASK, DOT_PRECISION)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Shift by 0 while a row has seen no finite logit: -inf - -inf would be NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)          # 0 on the first tile with a finite logit
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_base, j, stride_vn, d, stride_vd, kv_mask)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    has_keys = l > 0.0
    out = acc / tl.where(has_keys, l, 1.0)[:, None]   # rows without keys: acc = 0 -> 0
    o_off = (bh * n_tokens + i.to(tl.int64))[:, None] * DH + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=i_in[:, None] & d_in[None, :])
    tl.store(stats_ptr + bh * n_tokens + i, tl.where(has_keys, m, float("inf")), mask=i_in)
    tl.store(stats_ptr + n_rows + bh * n_tokens + i, tl.log2(tl.where(has_keys, l, 1.0)),
             mask=i_in)


@triton.jit
def _pair_bias_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr,
    do_ptr,                 # (B, H, N, DH), any strides: gradient of the output
    stats_ptr,              # (2, B, H, N) float32 contiguous: the forward's (m, log2 l)
    delta_ptr,              # (B, H, N) float32 contiguous
    dk_ptr, dv_ptr,         # (B, H, N, DH) contiguous, outputs
    dbias_ptr,              # (B, H, N, N) contiguous, output, written only when NEED_DBIAS
    n_tokens, n_heads, n_rows, scale2, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_ob, stride_oh, stride_on, stride_od,
    DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, NEED_DBIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    j_in = j < n_tokens
    d_in = d < DH
    j64 = j.to(tl.int64)
    kv_mask = j_in[:, None] & d_in[None, :]
    k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, j, stride_kn, d, stride_kd, kv_mask)
    v = _load_rows(v_ptr + b * stride_vb + h * stride_vh, j, stride_vn, d, stride_vd, kv_mask)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_ob + h * stride_oh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh
    dbias_base = dbias_ptr + bh * n_tokens * n_tokens

    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    for i0 in range(0, n_tokens, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        i_in = i < n_tokens
        i64 = i.to(tl.int64)
        qo_mask = i_in[:, None] & d_in[None, :]
        q = _load_rows(q_base, i, stride_qn, d, stride_qd, qo_mask)
        do = _load_rows(do_base, i, stride_on, d, stride_od, qo_mask)
        row_max, log2_sum = _row_stats(stats_ptr, bh * n_tokens, n_rows, i, i_in)
        delta = tl.load(delta_ptr + bh * n_tokens + i, mask=i_in, other=0.0)
        s = _logits(q, k, bias_base, mask_ptr, b, i, j, i_in, j_in, n_tokens, scale2,
                    stride_bi, stride_bj, HAS_BIAS, HAS_MASK, DOT_PRECISION)
        p = tl.exp2((s - row_max[:, None]) - log2_sum[:, None])   # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])                             # d loss / d logit
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if NEED_DBIAS:
            tl.store(dbias_base + i64[:, None] * n_tokens + j64[None, :],
                     ds.to(dbias_ptr.dtype.element_ty), mask=i_in[:, None] & j_in[None, :])

    out_off = (bh * n_tokens + j64)[:, None] * DH + d[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _pair_bias_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr, do_ptr, stats_ptr, delta_ptr,
    dq_ptr,                 # (B, H, N, DH) contiguous, output
    n_tokens, n_heads, n_rows, scale2, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_ob, stride_oh, stride_on, stride_od,
    DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    i_in = i < n_tokens
    d_in = d < DH
    i64 = i.to(tl.int64)
    qo_mask = i_in[:, None] & d_in[None, :]
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, i, stride_qn, d, stride_qd, qo_mask)
    do = _load_rows(do_ptr + b * stride_ob + h * stride_oh, i, stride_on, d, stride_od, qo_mask)
    row_max, log2_sum = _row_stats(stats_ptr, bh * n_tokens, n_rows, i, i_in)
    delta = tl.load(delta_ptr + bh * n_tokens + i, mask=i_in, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh

    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for j0 in range(0, n_tokens, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_in = j < n_tokens
        kv_mask = j_in[:, None] & d_in[None, :]
        k = _load_rows(k_base, j, stride_kn, d, stride_kd, kv_mask)
        v = _load_rows(v_base, j, stride_vn, d, stride_vd, kv_mask)
        s = _logits(q, k, bias_base, mask_ptr, b, i, j, i_in, j_in, n_tokens, scale2,
                    stride_bi, stride_bj, HAS_BIAS, HAS_MASK, DOT_PRECISION)
        p = tl.exp2((s - row_max[:, None]) - log2_sum[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    out_off = (bh * n_tokens + i64)[:, None] * DH + d[None, :]
    tl.store(dq_ptr + out_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qo_mask)


@triton.jit
def _pair_bias_attn_jvp_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, mask_ptr,
    out_ptr,                # (B, H, N, DH) contiguous: the forward's output
    stats_ptr,              # (2, B, H, N) float32 contiguous: the forward's (m, log2 l)
    tq_ptr, tk_ptr, tv_ptr,  # (T, B, H, N, DH), any strides: tangents, read when HAS_T*
    tb_ptr,                 # (T, B, H, N, N), any strides: bias tangent, read when HAS_TB
    tout_ptr,               # (T, B, H, N, DH) contiguous, output: the output's tangent
    n_tokens, n_heads, n_rows, scale2, scale,  # n_rows = B * H * N
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_tqt, stride_tqb, stride_tqh, stride_tqn, stride_tqd,
    stride_tkt, stride_tkb, stride_tkh, stride_tkn, stride_tkd,
    stride_tvt, stride_tvb, stride_tvh, stride_tvn, stride_tvd,
    stride_tbt, stride_tbb, stride_tbh, stride_tbi, stride_tbj,
    DH: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, HAS_TB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # axis 0: tangent * batch * heads; the primal is shared by the T tangents
    tbh = tl.program_id(0).to(tl.int64)
    n_bh = n_rows // n_tokens
    t = tbh // n_bh
    bh = tbh % n_bh
    b = bh // n_heads
    h = bh % n_heads
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    i_in = i < n_tokens
    d_in = d < DH
    i64 = i.to(tl.int64)
    qo_mask = i_in[:, None] & d_in[None, :]
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, i, stride_qn, d, stride_qd, qo_mask)
    tq = tl.zeros((BLOCK_M, D_PAD), dtype=q.dtype)
    if HAS_TQ:
        tq = _load_rows(tq_ptr + t * stride_tqt + b * stride_tqb + h * stride_tqh, i, stride_tqn,
                        d, stride_tqd, qo_mask).to(q.dtype)
    row_max, log2_sum = _row_stats(stats_ptr, bh * n_tokens, n_rows, i, i_in)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh
    tk_base = tk_ptr + t * stride_tkt + b * stride_tkb + h * stride_tkh
    tv_base = tv_ptr + t * stride_tvt + b * stride_tvb + h * stride_tvh
    tb_base = tb_ptr + t * stride_tbt + b * stride_tbb + h * stride_tbh

    # acc = sum_j p_ij (ds_ij v_j + dv_j), g = sum_j p_ij ds_ij, with the final p (from the
    # forward's statistics): no rescaling, and the tangent is acc - g out
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, n_tokens, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_in = j < n_tokens
        kv_mask = j_in[:, None] & d_in[None, :]
        k = _load_rows(k_base, j, stride_kn, d, stride_kd, kv_mask)
        v = _load_rows(v_base, j, stride_vn, d, stride_vd, kv_mask)
        s = _logits(q, k, bias_base, mask_ptr, b, i, j, i_in, j_in, n_tokens, scale2,
                    stride_bi, stride_bj, HAS_BIAS, HAS_MASK, DOT_PRECISION)
        p = tl.exp2((s - row_max[:, None]) - log2_sum[:, None])   # 0 on dropped keys
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_TQ:
            ds += tl.dot(tq, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_TK:
            tk = _load_rows(tk_base, j, stride_tkn, d, stride_tkd, kv_mask).to(q.dtype)
            ds += tl.dot(q, tl.trans(tk), input_precision=DOT_PRECISION)
        ds = ds * scale
        if HAS_TB:
            tb_off = i64[:, None] * stride_tbi + j.to(tl.int64)[None, :] * stride_tbj
            ds += tl.load(tb_base + tb_off, mask=i_in[:, None] & j_in[None, :],
                          other=0.0).to(tl.float32)
        pds = tl.where(p > 0.0, p * ds, 0.0)  # a dropped key adds nothing, whatever its ds
        g += tl.sum(pds, axis=1)
        acc += tl.dot(pds.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_TV:
            tv = _load_rows(tv_base, j, stride_tvn, d, stride_tvd, kv_mask).to(v.dtype)
            acc += tl.dot(p.to(v.dtype), tv, input_precision=DOT_PRECISION)

    o_off = (bh * n_tokens + i64)[:, None] * DH + d[None, :]
    out = tl.load(out_ptr + o_off, mask=qo_mask, other=0.0).to(tl.float32)
    tout = acc - g[:, None] * out
    t_off = ((tbh * n_tokens + i64)[:, None]) * DH + d[None, :]
    tl.store(tout_ptr + t_off, tout.to(tout_ptr.dtype.element_ty), mask=qo_mask)


def padded(n: int) -> int:
    """The head dim padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


# DIGFAST_AUTOTUNE=1: the forward tries these (BLOCK_M, BLOCK_N, warps, stages) on its first
# call for each N, head dim and dtype on a GPU and keeps the fastest. Opt-in until a GPU run
# compares it: on an H200 the fixed 64 x 64 tile ran at 3.7x the bandwidth floor at N = 256
# (FlexAttention 2.2x; bench/RESULTS.md, 2026-11-28).
FORWARD_TUNING = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3),
                  (128, 32, 4, 3), (64, 32, 4, 4), (128, 64, 4, 2), (32, 64, 2, 3))
_pair_bias_attn_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
             for m, n, w, st in FORWARD_TUNING],
    key=["n_tokens", "DH", "HAS_BIAS", "HAS_MASK"])(_pair_bias_attn_fwd_kernel)


def autotuning() -> bool:
    return os.environ.get("DIGFAST_AUTOTUNE") == "1" and os.environ.get("TRITON_INTERPRET") != "1"


def launch_config(n_tokens: int, d_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps), the same for the forward and both backward kernels.
    64 x 64 tiles (the float32 logit, probability and ds tiles stay in registers at 4 warps);
    short sequences get tiles of next_pow2(N) (at least 16, tl.dot's minimum) so that padding
    does not dominate; wide heads get narrower key tiles."""
    n_pow2 = max(16, triton.next_power_of_2(n_tokens))
    block_m = min(64, n_pow2)
    block_n = min(64 if d_pad <= 64 else 32, n_pow2)
    num_warps = 4 if block_m * max(block_n, d_pad) <= 4096 else 8
    return block_m, block_n, num_warps


def check_inputs(q, k, v, bias, key_mask):
    """Shapes, dtypes and devices, each failure named."""
    if q.dim() != 4 or q.shape[2] < 1 or not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"q must be (batch, heads, tokens>=1, head_dim in 1..{MAX_HEAD_DIM}), "
                         f"got {tuple(q.shape)}")
    B, H, N, _ = q.shape
    shapes = {"k": (k, tuple(q.shape)), "v": (v, tuple(q.shape))}
    if bias is not None:
        shapes["bias"] = (bias, (B, H, N, N))
    if key_mask is not None:
        shapes["key_mask"] = (key_mask, (B, N))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if bias is not None and bias.dtype not in _DTYPES:
        raise TypeError(f"bias must be float32, float16 or bfloat16, got {bias.dtype}")
    if key_mask is not None and key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be bool, got {key_mask.dtype}")
    tensors = [t for t in (q, k, v, bias, key_mask) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"pair_bias_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {q.device}")


def _strides(t, n=4):
    return t.stride() if t is not None else (0,) * n


def _common(q, k, v, bias, key_mask):
    """Arguments shared by the three launches: placeholders for absent inputs, strides."""
    B, H, N, DH = q.shape
    d_pad = padded(DH)
    block_m, block_n, num_warps = launch_config(N, d_pad)
    bias_arg = bias if bias is not None else q          # placeholder, never read
    mask_arg = key_mask.contiguous() if key_mask is not None else q
    scale = 1.0 / math.sqrt(DH)
    strides = (*q.stride(), *k.stride(), *v.stride(), *_strides(bias))
    meta = dict(DH=DH, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
                HAS_MASK=key_mask is not None,
                DOT_PRECISION="ieee",  # float32 dots without TF32; 16-bit operands are exact
                num_warps=num_warps, enable_fp_fusion=True)  # FMA contraction is fine here
    return bias_arg, mask_arg, scale, strides, meta


def pair_bias_attention_forward_into(out, stats, q, k, v, bias=None, key_mask=None):
    """Launch the forward kernel, writing every entry of the given contiguous outputs
    out (B, H, N, dh) (q's dtype) and stats (2, B, H, N) float32: each row's maximum base-2
    logit m and log2 of its sum of 2^(s2 - m), so that m + log2 l = log2 sum_j 2^(s2_ij) is the
    row's log-sum-exp in base 2 (m = +inf, log2 l = 0 for a row without keys). Inputs as the
    reference's."""
    check_inputs(q, k, v, bias, key_mask)
    B, H, N, DH = q.shape
    if out.shape != q.shape or stats.shape != (2, B, H, N) or stats.dtype != torch.float32:
        raise ValueError(f"outputs must be {tuple(q.shape)} and float32 {(2, B, H, N)}, got "
                         f"{tuple(out.shape)} and {stats.dtype} {tuple(stats.shape)}")
    if not (out.is_contiguous() and stats.is_contiguous()):
        raise ValueError("outputs must be contiguous")
    if B * H == 0:
        return out, stats
    bias_arg, mask_arg, scale, strides, meta = _common(q, k, v, bias, key_mask)
    args = (q, k, v, bias_arg, mask_arg, out, stats, N, H, B * H * N, scale * 1.4426950408889634, *strides)
    if autotuning():
        for tuned in ("BLOCK_M", "BLOCK_N", "num_warps"):
            meta.pop(tuned)
        _pair_bias_attn_fwd_tuned[lambda m: (B * H, triton.cdiv(N, m["BLOCK_M"]))](*args, **meta)
    else:
        _pair_bias_attn_fwd_kernel[(B * H, triton.cdiv(N, meta["BLOCK_M"]))](*args, **meta)
    return out, stats


def pair_bias_attention_backward_into(dq, dk, dv, dbias, q, k, v, bias, key_mask, out, stats,
                                      grad_out):
    """Launch the backward kernels, writing every entry of the contiguous gradients dq, dk,
    dv (q's dtype) and dbias (B, H, N, N) (the bias's dtype; None to skip it). out and stats
    are the forward's; grad_out (B, H, N, dh) any strides."""
    check_inputs(q, k, v, bias, key_mask)
    B, H, N, DH = q.shape
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        if t.shape != q.shape or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {tuple(q.shape)}, got {tuple(t.shape)}")
    if dbias is not None and (bias is None or dbias.shape != (B, H, N, N)
                              or not dbias.is_contiguous()):
        raise ValueError(f"dbias must be contiguous {(B, H, N, N)} and needs a bias")
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out must have shape {tuple(q.shape)}, got {tuple(grad_out.shape)}")
    if stats.shape != (2, B, H, N) or not stats.is_contiguous():
        raise ValueError(f"stats must be the forward's contiguous {(2, B, H, N)}")
    if B * H == 0:
        return dq, dk, dv, dbias
    grad_out = grad_out.to(q.dtype)
    # delta_i = sum_d dout_id out_id = sum_j p_ij dp_ij: the softmax's Jacobian term.
    delta = (grad_out.float() * out.float()).sum(dim=-1).contiguous()
    bias_arg, mask_arg, scale, strides, meta = _common(q, k, v, bias, key_mask)
    args = (N, H, B * H * N, scale * 1.4426950408889634, scale, *strides, *grad_out.stride())
    _pair_bias_attn_bwd_dkdv_kernel[(B * H, triton.cdiv(N, meta["BLOCK_N"]))](
        q, k, v, bias_arg, mask_arg, grad_out, stats, delta, dk, dv,
        dbias if dbias is not None else dk, *args, NEED_DBIAS=dbias is not None, **meta)
    _pair_bias_attn_bwd_dq_kernel[(B * H, triton.cdiv(N, meta["BLOCK_M"]))](
        q, k, v, bias_arg, mask_arg, grad_out, stats, delta, dq, *args, **meta)
    return dq, dk, dv, dbias


def pair_bias_attention_jvp_into(tout, q, k, v, bias, key_mask, out, stats, tq, tk, tv, tbias):
    """Launch the tangent kernel: tout (T, B, H, N, dh) contiguous (q's dtype) receives, for
    each of T tangent sets, d out = sum_j p_ij (ds_ij (v_j - out_i) + dv_j) with
    ds_ij = (dq_i.k_j + q_i.dk_j) / sqrt(dh) + dbias_ij. The tangents tq, tk, tv
    (T, B, H, N, dh) and tbias (T, B, H, N, N) have any strides (stride 0 over T for one shared
    by all); None for an input without one. out and stats are the forward's."""
    check_inputs(q, k, v, bias, key_mask)
    B, H, N, DH = q.shape
    T = tout.shape[0]
    if tuple(tout.shape) != (T, *q.shape) or not tout.is_contiguous():
        raise ValueError(f"tout must be contiguous (T, {B}, {H}, {N}, {DH}), got {tuple(tout.shape)}")
    for name, t, shape in (("tq", tq, q.shape), ("tk", tk, q.shape), ("tv", tv, q.shape),
                           ("tbias", tbias, (B, H, N, N))):
        if t is not None and tuple(t.shape) != (T, *shape):
            raise ValueError(f"{name} must have shape {(T, *shape)}, got {tuple(t.shape)}")
    if tbias is not None and bias is None:
        raise ValueError("a bias tangent needs a bias")
    if stats.shape != (2, B, H, N) or not stats.is_contiguous() or not out.is_contiguous():
        raise ValueError("out and stats must be the forward's contiguous outputs")
    if T * B * H == 0:
        return tout
    bias_arg, mask_arg, scale, strides, meta = _common(q, k, v, bias, key_mask)
    tangents = [t if t is not None else q for t in (tq, tk, tv)]  # placeholders, never read
    t_strides = [x for t in (tq, tk, tv) for x in _strides(t, 5)] + list(_strides(tbias, 5))
    _pair_bias_attn_jvp_kernel[(T * B * H, triton.cdiv(N, meta["BLOCK_M"]))](
        q, k, v, bias_arg, mask_arg, out, stats, *tangents,
        tbias if tbias is not None else q, tout, N, H, B * H * N, scale * 1.4426950408889634,
        scale, *strides, *t_strides, HAS_TQ=tq is not None, HAS_TK=tk is not None,
        HAS_TV=tv is not None, HAS_TB=tbias is not None, **meta)
    return tout


def _tangent(q, k, v, bias, key_mask, out, stats, tangents, count):
    """count sets of tangents (each (count, ...) or None) -> d out (count, B, H, N, dh)."""
    tout = torch.empty((count, *q.shape), dtype=q.dtype, device=q.device)
    return pair_bias_attention_jvp_into(tout, q, k, v, bias, key_mask, out, stats, *tangents)


class PairBiasAttentionTangent(torch.autograd.Function):
    """The output's tangent given the primal, its forward outputs and the input tangents; a
    Function of its own so that torch.func.vmap over tangents (K Hutchinson probes) becomes one
    launch over K tangent sets sharing the primal (its vmap rule), not K launches."""

    @staticmethod
    def forward(q, k, v, bias, key_mask, out, stats, tq, tk, tv, tbias):
        tangents = [None if t is None else t.unsqueeze(0) for t in (tq, tk, tv, tbias)]
        return _tangent(q, k, v, bias, key_mask, out, stats, tangents, 1)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, q, k, v, bias, key_mask, out, stats, tq, tk, tv, tbias):
        if any(d is not None for d in in_dims[:7]):
            raise NotImplementedError("pair_bias_attention_triton: vmap over the primal inputs "
                                      "of a forward-mode derivative (only over tangents)")
        tangents = [None if t is None else (t.movedim(d, 0) if d is not None
                                            else t.expand(info.batch_size, *t.shape))
                    for t, d in zip((tq, tk, tv, tbias), in_dims[7:])]
        return _tangent(q, k, v, bias, key_mask, out, stats, tangents, info.batch_size), 0


def _fold(args, in_dims, size):
    """vmap's dimension folded into the batch axis (0) of each tensor; None stays None."""
    folded = []
    for t, d in zip(args, in_dims):
        if t is None:
            folded.append(None)
            continue
        t = t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
        folded.append(t.reshape(size * t.shape[1], *t.shape[2:]))
    return folded


class PairBiasAttentionTriton(torch.autograd.Function):
    """Forward, backward and forward-mode derivative (jvp): the flash kernels above."""

    @staticmethod
    def forward(q, k, v, bias, key_mask):
        check_inputs(q, k, v, bias, key_mask)  # before the shapes are used
        B, H, N, _ = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        stats = torch.empty(2, B, H, N, dtype=torch.float32, device=q.device)
        pair_bias_attention_forward_into(out, stats, q, k, v, bias, key_mask)
        return out, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, key_mask = inputs
        out, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no (B, H, N, N) zeros for an absent bias tangent
        ctx.save_for_backward(q, k, v, bias, key_mask, out, stats)
        ctx.save_for_forward(q, k, v, bias, key_mask, out, stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_stats):
        q, k, v, bias, key_mask, out, stats = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        dbias = None
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
        pair_bias_attention_backward_into(dq, dk, dv, dbias, q, k, v, bias, key_mask, out, stats,
                                          grad_out)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dbias, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, tbias, _tmask):
        q, k, v, bias, key_mask, out, stats = ctx.saved_tensors
        if tbias is not None and tbias.dtype != bias.dtype:
            tbias = tbias.to(bias.dtype)
        tout = PairBiasAttentionTangent.apply(q, k, v, bias, key_mask, out, stats, tq, tk, tv,
                                              tbias)
        return tout, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, bias, key_mask):
        """vmap over structures (e.g. torch.func.jacrev): its dimension joins the batch."""
        size = info.batch_size
        args = _fold((q, k, v, bias, key_mask), in_dims, size)
        batch = args[0].shape[0] // size
        out, stats = PairBiasAttentionTriton.apply(*args)
        return ((out.reshape(size, batch, *out.shape[1:]),
                 stats.reshape(2, size, batch, *stats.shape[2:])), (0, 1))


def pair_bias_attention_triton(q, k, v, bias=None, key_mask=None):
    """softmax(q k^T / sqrt(dh) + bias) v over unpadded keys, (B, H, N, dh): the flash kernels
    (see the module doc); differentiable in q, k, v and the bias, in reverse and forward mode
    (torch.func.jvp, torch.autograd.forward_ad; vmap over tangents is one launch)."""
    return PairBiasAttentionTriton.apply(q, k, v, bias, key_mask)[0]
