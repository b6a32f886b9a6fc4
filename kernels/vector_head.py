"""Fused equivariant vector head in Triton: attention softmax and the u_ij-weighted sum in one pass.

Specification: digfast/ops/vector_head.py (fused_vector_head_reference):
    out_i = sum_h sum_j softmax_j(q_hi.k_hj / sqrt(dh) + bias_hij) u_ij vw_hj,   (B, N, d)
    u_ij = (x_j - x_i) / (|x_j - x_i| + 1e-6)  (0 for j = i), keys past N or padded left out,
with vw_hj = sum_f W[h,f] v_hjf the value already contracted with the output weights (so the
value is one scalar per head and atom, and the head's output is a d-vector per row).

Forward: one program per (batch, tile of BLOCK_M query atoms). It loops over the heads and,
per head, over the key tiles with an online softmax (running row max m, running sum l, both
in base 2, rescaled by 2^(m_old - m_new) per tile, as the pair-bias attention kernel), and
keeps the unnormalised numerator sum_j p_ij u_ij vw_hj as d registers per row; u_ij is
rebuilt in-tile from the coordinates. After the last key tile the head's numerator is
divided by its row sum and added to the output, so the sum over heads happens in-program
(no atomics, deterministic) and nothing of size N x N (probabilities, unit vectors) is ever
in memory. A row with no key (all padded, or every logit -inf) gets 0 from that head.

Head dims need not be powers of two (12, 24, ...): the feature axis is padded to D_PAD (a
power of two, at least 16 for tl.dot) inside the kernel with masked loads. Any N >= 1;
d = 2 or 3. float32 only, with full-precision float32 dots (input_precision="ieee").
q, k, bias, x and vw may have any strides (the bias may be expanded over the batch).

Backward: a torch.autograd.Function whose backward recomputes the reference
(fused_vector_head_rows_reference) chunk by chunk of query rows and differentiates that:
exact, memory bounded by BACKWARD_CHUNK_ELEMENTS, gradients for q, k, bias, x and vw.
Forward mode (torch.func.jvp, forward_ad; the likelihood's divergence): with tangents dq, dk,
dbias, dx, dvw the logits move by ds_ij = (dq_i.k_j + q_i.dk_j) / sqrt(dh) + dbias_ij and
u_ij by du = (ddelta - u (u' . ddelta)) / (|delta| + eps), u' = delta / |delta|, so per head
    d out_i = sum_j p_ij (ds_ij u_ij vw_j + du_ij vw_j + u_ij dvw_j) - (sum_j p_ij ds_ij) out_i.
One kernel, one program per (tangent set, batch, query tile), runs the forward's online
softmax again and carries these sums with it (rescaled like the numerator), so nothing
N x N is stored and no statistics need saving. T tangent sets share the primal: the tangent
is a Function of its own whose vmap rule makes vmap over K probes one launch with T = K;
vmap over structures folds them into the batch.
Future work: a fused backward kernel (recomputing p and u tile by tile from saved row
statistics).

Works under TRITON_INTERPRET=1 (the tests run it so on the CPU).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from digfast.kernels.recompute import chunk_rows
from digfast.ops.vector_head import fused_vector_head_rows_reference

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
UNIT_EPS = 1e-6            # the reference's u_ij = delta / (|delta| + eps)
MAX_HEAD_DIM = 256
# The backward recomputes at most about this many (head, query, key, feature) elements per
# chunk of query rows on the CPU; on a GPU more, from free memory (kernels/recompute.py).
BACKWARD_CHUNK_ELEMENTS = 1 << 22


@triton.jit
def _load_rows(base_ptr, r, stride_r, f, stride_f, mask):
    """A (rows, D_PAD) tile of an (N, DH) matrix with any strides; zeros where masked."""
    return tl.load(base_ptr + r.to(tl.int64)[:, None] * stride_r + f[None, :] * stride_f,
                   mask=mask, other=0.0)


@triton.jit
def _fused_vector_head_fwd_kernel(
    q_ptr, k_ptr,           # (B, H, N, DH), any strides
    bias_ptr,               # (B, H, N, N), any strides, read only when HAS_BIAS
    x_ptr,                  # (B, N, SPACE_DIM), any strides
    vw_ptr,                 # (B, H, N), any strides
    mask_ptr,               # (B, N) bool contiguous, read only when HAS_MASK
    out_ptr,                # (B, N, SPACE_DIM) float32 contiguous, output
    n_tokens, n_heads, scale2, eps,   # N, H, log2(e) / sqrt(DH), UNIT_EPS
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_xb, stride_xn, stride_xc,
    stride_wb, stride_wh, stride_wn,
    DH: tl.constexpr,
    D_PAD: tl.constexpr,          # next power of two >= max(DH, 16)
    SPACE_DIM: tl.constexpr,      # 2 or 3
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee": float32 dots without TF32
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    f = tl.arange(0, D_PAD)
    i_in = i < n_tokens
    f_in = f < DH
    i64 = i.to(tl.int64)
    x_base = x_ptr + b * stride_xb
    # the query atoms' coordinates, one register vector per axis (the third is 0 in 2-D)
    xi0 = tl.load(x_base + i64 * stride_xn, mask=i_in, other=0.0).to(tl.float32)
    xi1 = tl.load(x_base + i64 * stride_xn + stride_xc, mask=i_in, other=0.0).to(tl.float32)
    xi2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SPACE_DIM == 3:
        xi2 = tl.load(x_base + i64 * stride_xn + 2 * stride_xc, mask=i_in,
                      other=0.0).to(tl.float32)

    out0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    out1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    out2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h in range(0, n_heads):
        q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, i, stride_qn, f, stride_qd,
                       i_in[:, None] & f_in[None, :])
        k_base = k_ptr + b * stride_kb + h * stride_kh
        bias_base = bias_ptr + b * stride_bb + h * stride_bh
        vw_base = vw_ptr + b * stride_wb + h * stride_wh
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j0 in range(0, n_tokens, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_in = j < n_tokens
            j64 = j.to(tl.int64)
            k = _load_rows(k_base, j, stride_kn, f, stride_kd, j_in[:, None] & f_in[None, :])
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
            if HAS_BIAS:
                bias = tl.load(bias_base + i64[:, None] * stride_bi + j64[None, :] * stride_bj,
                               mask=i_in[:, None] & j_in[None, :], other=0.0)
                s += bias.to(tl.float32) * LOG2E
            keep = j_in
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + b * n_tokens + j, mask=j_in, other=0) != 0)
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # Shift by 0 while a row has seen no finite logit: -inf - -inf would be NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])                     # 0 on dropped keys
            l = l * alpha + tl.sum(p, axis=1)
            # u_ij rebuilt in-tile; j = i gives delta = 0 and so u = 0, as the reference
            xj0 = tl.load(x_base + j64 * stride_xn, mask=j_in, other=0.0).to(tl.float32)
            xj1 = tl.load(x_base + j64 * stride_xn + stride_xc, mask=j_in,
                          other=0.0).to(tl.float32)
            d0 = xj0[None, :] - xi0[:, None]
            d1 = xj1[None, :] - xi1[:, None]
            r2 = d0 * d0 + d1 * d1
            d2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if SPACE_DIM == 3:
                xj2 = tl.load(x_base + j64 * stride_xn + 2 * stride_xc, mask=j_in,
                              other=0.0).to(tl.float32)
                d2 = xj2[None, :] - xi2[:, None]
                r2 += d2 * d2
            vw = tl.load(vw_base + j64 * stride_wn, mask=j_in, other=0.0).to(tl.float32)
            # p * vw / (|delta| + eps): one weight per pair, then d row sums
            w = p * vw[None, :] / (tl.sqrt(r2) + eps)
            acc0 = acc0 * alpha + tl.sum(w * d0, axis=1)
            acc1 = acc1 * alpha + tl.sum(w * d1, axis=1)
            if SPACE_DIM == 3:
                acc2 = acc2 * alpha + tl.sum(w * d2, axis=1)
            m = m_new
        inv_l = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)  # no key: head adds 0
        out0 += acc0 * inv_l
        out1 += acc1 * inv_l
        out2 += acc2 * inv_l

    o_base = out_ptr + (b * n_tokens + i64) * SPACE_DIM
    tl.store(o_base, out0, mask=i_in)
    tl.store(o_base + 1, out1, mask=i_in)
    if SPACE_DIM == 3:
        tl.store(o_base + 2, out2, mask=i_in)


@triton.jit
def _fused_vector_head_jvp_kernel(
    q_ptr, k_ptr, bias_ptr, x_ptr, vw_ptr, mask_ptr,  # the primal, as the forward kernel's
    tq_ptr, tk_ptr,         # (T, B, H, N, DH), any strides, read when HAS_TQ / HAS_TK
    tb_ptr,                 # (T, B, H, N, N), any strides, read when HAS_TB
    tx_ptr,                 # (T, B, N, SPACE_DIM), any strides, read when HAS_TX
    tw_ptr,                 # (T, B, H, N), any strides, read when HAS_TW
    tout_ptr,               # (T, B, N, SPACE_DIM) float32 contiguous, output
    n_tokens, n_batch, n_heads, scale2, scale, eps,   # N, B, H, log2(e)/sqrt(DH), 1/sqrt(DH)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_xb, stride_xn, stride_xc,
    stride_wb, stride_wh, stride_wn,
    stride_tqt, stride_tqb, stride_tqh, stride_tqn, stride_tqd,
    stride_tkt, stride_tkb, stride_tkh, stride_tkn, stride_tkd,
    stride_tbt, stride_tbb, stride_tbh, stride_tbi, stride_tbj,
    stride_txt, stride_txb, stride_txn, stride_txc,
    stride_twt, stride_twb, stride_twh, stride_twn,
    DH: tl.constexpr, D_PAD: tl.constexpr, SPACE_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TB: tl.constexpr, HAS_TX: tl.constexpr,
    HAS_TW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # The forward's online softmax, with three more running sums per head and row (all
    # rescaled by the same 2^(m_old - m_new)): g = sum_j p ds, the tangent numerator
    # a = sum_j p (ds u vw + du vw + u dvw), and the primal numerator o = sum_j p u vw.
    # At the end d out_h = a / l - (g / l) (o / l): the softmax's tangent p (ds - sum p ds).
    tb_idx = tl.program_id(0).to(tl.int64)   # tangent set * batch
    t = tb_idx // n_batch
    b = tb_idx % n_batch
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    f = tl.arange(0, D_PAD)
    i_in = i < n_tokens
    f_in = f < DH
    i64 = i.to(tl.int64)
    x_base = x_ptr + b * stride_xb
    tx_base = tx_ptr + t * stride_txt + b * stride_txb
    xi0 = tl.load(x_base + i64 * stride_xn, mask=i_in, other=0.0).to(tl.float32)
    xi1 = tl.load(x_base + i64 * stride_xn + stride_xc, mask=i_in, other=0.0).to(tl.float32)
    xi2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    txi0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    txi1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    txi2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SPACE_DIM == 3:
        xi2 = tl.load(x_base + i64 * stride_xn + 2 * stride_xc, mask=i_in,
                      other=0.0).to(tl.float32)
    if HAS_TX:
        txi0 = tl.load(tx_base + i64 * stride_txn, mask=i_in, other=0.0).to(tl.float32)
        txi1 = tl.load(tx_base + i64 * stride_txn + stride_txc, mask=i_in,
                       other=0.0).to(tl.float32)
        if SPACE_DIM == 3:
            txi2 = tl.load(tx_base + i64 * stride_txn + 2 * stride_txc, mask=i_in,
                           other=0.0).to(tl.float32)

    tout0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tout1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tout2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for h in range(0, n_heads):
        row_mask = i_in[:, None] & f_in[None, :]
        q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, i, stride_qn, f, stride_qd, row_mask)
        tq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
        if HAS_TQ:
            tq = _load_rows(tq_ptr + t * stride_tqt + b * stride_tqb + h * stride_tqh, i,
                            stride_tqn, f, stride_tqd, row_mask).to(tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        tk_base = tk_ptr + t * stride_tkt + b * stride_tkb + h * stride_tkh
        bias_base = bias_ptr + b * stride_bb + h * stride_bh
        tbias_base = tb_ptr + t * stride_tbt + b * stride_tbb + h * stride_tbh
        vw_base = vw_ptr + b * stride_wb + h * stride_wh
        tw_base = tw_ptr + t * stride_twt + b * stride_twb + h * stride_twh
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        g = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        o2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for j0 in range(0, n_tokens, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_in = j < n_tokens
            j64 = j.to(tl.int64)
            pair_in = i_in[:, None] & j_in[None, :]
            col_mask = j_in[:, None] & f_in[None, :]
            k = _load_rows(k_base, j, stride_kn, f, stride_kd, col_mask)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale2
            if HAS_BIAS:
                bias = tl.load(bias_base + i64[:, None] * stride_bi + j64[None, :] * stride_bj,
                               mask=pair_in, other=0.0)
                s += bias.to(tl.float32) * LOG2E
            keep = j_in
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + b * n_tokens + j, mask=j_in, other=0) != 0)
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])                     # 0 on dropped keys
            l = l * alpha + tl.sum(p, axis=1)
            # the logits' tangent (natural units)
            ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_TQ:
                ds += tl.dot(tq, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_TK:
                tk = _load_rows(tk_base, j, stride_tkn, f, stride_tkd, col_mask).to(tl.float32)
                ds += tl.dot(q, tl.trans(tk), input_precision=DOT_PRECISION)
            ds = ds * scale
            if HAS_TB:
                ds += tl.load(tbias_base + i64[:, None] * stride_tbi + j64[None, :] * stride_tbj,
                              mask=pair_in, other=0.0).to(tl.float32)
            pds = tl.where(p > 0.0, p * ds, 0.0)   # a dropped key adds nothing, whatever ds
            g = g * alpha + tl.sum(pds, axis=1)
            # geometry: delta_ij, its tangent, r = |delta|, u = delta / (r + eps)
            xj0 = tl.load(x_base + j64 * stride_xn, mask=j_in, other=0.0).to(tl.float32)
            xj1 = tl.load(x_base + j64 * stride_xn + stride_xc, mask=j_in,
                          other=0.0).to(tl.float32)
            d0 = xj0[None, :] - xi0[:, None]
            d1 = xj1[None, :] - xi1[:, None]
            d2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if SPACE_DIM == 3:
                xj2 = tl.load(x_base + j64 * stride_xn + 2 * stride_xc, mask=j_in,
                              other=0.0).to(tl.float32)
                d2 = xj2[None, :] - xi2[:, None]
            r2 = d0 * d0 + d1 * d1 + d2 * d2
            r = tl.sqrt(r2)
            inv = 1.0 / (r + eps)
            vw = tl.load(vw_base + j64 * stride_wn, mask=j_in, other=0.0).to(tl.float32)
            pv = p * vw[None, :]
            # sum_j (pds vw + p dvw) u: one weight per pair on u
            wu = pds * vw[None, :]
            if HAS_TW:
                tw = tl.load(tw_base + j64 * stride_twn, mask=j_in, other=0.0).to(tl.float32)
                wu += p * tw[None, :]
            wu = wu * inv
            o0 = o0 * alpha + tl.sum(pv * inv * d0, axis=1)
            o1 = o1 * alpha + tl.sum(pv * inv * d1, axis=1)
            o2 = o2 * alpha + tl.sum(pv * inv * d2, axis=1)
            a0 = a0 * alpha + tl.sum(wu * d0, axis=1)
            a1 = a1 * alpha + tl.sum(wu * d1, axis=1)
            a2 = a2 * alpha + tl.sum(wu * d2, axis=1)
            if HAS_TX:
                # du = (ddelta - delta (delta . ddelta) / (r (r + eps))) / (r + eps); 0 where
                # r = 0 (u is 0 there identically, as in the reference)
                tj0 = tl.load(tx_base + j64 * stride_txn, mask=j_in, other=0.0).to(tl.float32)
                tj1 = tl.load(tx_base + j64 * stride_txn + stride_txc, mask=j_in,
                              other=0.0).to(tl.float32)
                e0 = tj0[None, :] - txi0[:, None]
                e1 = tj1[None, :] - txi1[:, None]
                e2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if SPACE_DIM == 3:
                    tj2 = tl.load(tx_base + j64 * stride_txn + 2 * stride_txc, mask=j_in,
                                  other=0.0).to(tl.float32)
                    e2 = tj2[None, :] - txi2[:, None]
                apart = r2 > 0.0
                radial = (d0 * e0 + d1 * e1 + d2 * e2) / tl.where(apart, r, 1.0) * inv
                pvu = tl.where(apart, pv * inv, 0.0)
                a0 += tl.sum(pvu * (e0 - d0 * radial), axis=1)
                a1 += tl.sum(pvu * (e1 - d1 * radial), axis=1)
                a2 += tl.sum(pvu * (e2 - d2 * radial), axis=1)
            m = m_new
        inv_l = tl.where(l > 0.0, 1.0 / tl.where(l > 0.0, l, 1.0), 0.0)  # no key: head adds 0
        gl = g * inv_l
        tout0 += (a0 - gl * o0) * inv_l
        tout1 += (a1 - gl * o1) * inv_l
        tout2 += (a2 - gl * o2) * inv_l

    t_base = tout_ptr + (tb_idx * n_tokens + i64) * SPACE_DIM
    tl.store(t_base, tout0, mask=i_in)
    tl.store(t_base + 1, tout1, mask=i_in)
    if SPACE_DIM == 3:
        tl.store(t_base + 2, tout2, mask=i_in)


def padded(n: int) -> int:
    """The head dim padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def launch_config(n_tokens: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 64 x 64 tiles (the logit tile, p and the d coordinate
    differences stay in registers at 4 warps); short sequences get next_pow2(N) (at least 16,
    tl.dot's minimum) so that padding does not dominate."""
    n_pow2 = max(16, triton.next_power_of_2(n_tokens))
    return min(64, n_pow2), min(64, n_pow2), 4


def check_inputs(q, k, bias, x, vw, key_mask):
    """Shapes, dtypes and devices, each failure named."""
    if q.dim() != 4 or q.shape[2] < 1 or not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"q must be (batch, heads, tokens>=1, head_dim in 1..{MAX_HEAD_DIM}), "
                         f"got {tuple(q.shape)}")
    B, H, N, _ = q.shape
    if x.dim() != 3 or tuple(x.shape[:2]) != (B, N) or x.shape[2] not in (2, 3):
        raise ValueError(f"x must be ({B}, {N}, 2 or 3), got {tuple(x.shape)}")
    shapes = {"k": (k, tuple(q.shape)), "vw": (vw, (B, H, N))}
    if bias is not None:
        shapes["bias"] = (bias, (B, H, N, N))
    if key_mask is not None:
        shapes["key_mask"] = (key_mask, (B, N))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("bias", bias), ("x", x), ("vw", vw)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the only dtype of this kernel), got {t.dtype}")
    if key_mask is not None and key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be bool, got {key_mask.dtype}")
    devices = {t.device for t in (q, k, bias, x, vw, key_mask) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"fused_vector_head_triton needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {q.device}")


def fused_vector_head_forward_into(out, q, k, bias, x, vw, key_mask=None):
    """Launch the forward kernel, writing every entry of the contiguous float32 out (B, N, d).
    Inputs as fused_vector_head_reference's."""
    check_inputs(q, k, bias, x, vw, key_mask)
    B, H, N, DH = q.shape
    if tuple(out.shape) != tuple(x.shape) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 {tuple(x.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if B == 0:
        return out
    if H == 0:  # no head: nothing to sum
        return out.zero_()
    block_m, block_n, num_warps = launch_config(N)
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    grid = (B, triton.cdiv(N, block_m))
    _fused_vector_head_fwd_kernel[grid](
        q, k, bias if bias is not None else q, x, vw,
        key_mask.contiguous() if key_mask is not None else q,   # placeholders, never read
        out, N, H, 1.4426950408889634 / math.sqrt(DH), UNIT_EPS,
        *q.stride(), *k.stride(), *bias_strides, *x.stride(), *vw.stride(),
        DH=DH, D_PAD=padded(DH), SPACE_DIM=x.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BIAS=bias is not None, HAS_MASK=key_mask is not None, DOT_PRECISION="ieee",
        num_warps=num_warps)
    return out


def _strides(t, n):
    return t.stride() if t is not None else (0,) * n


def fused_vector_head_jvp_into(tout, q, k, bias, x, vw, key_mask, tq, tk, tbias, tx, tvw):
    """Launch the tangent kernel: tout (T, B, N, d) contiguous float32 receives, for each of T
    tangent sets, the output's derivative along tq, tk (T, B, H, N, dh), tbias (T, B, H, N, N),
    tx (T, B, N, d) and tvw (T, B, H, N) (any strides, stride 0 over T for one shared by all;
    None for an input without a tangent). The primal is recomputed in the same tiles."""
    check_inputs(q, k, bias, x, vw, key_mask)
    B, H, N, DH = q.shape
    T = tout.shape[0]
    if (tuple(tout.shape) != (T, *x.shape) or tout.dtype != torch.float32
            or not tout.is_contiguous()):
        raise ValueError(f"tout must be contiguous float32 (T, {B}, {N}, {x.shape[2]}), got "
                         f"{tout.dtype} {tuple(tout.shape)}")
    tangents = (("tq", tq, q.shape), ("tk", tk, q.shape), ("tbias", tbias, (B, H, N, N)),
                ("tx", tx, x.shape), ("tvw", tvw, vw.shape))
    for name, t, shape in tangents:
        if t is not None and (tuple(t.shape) != (T, *shape) or t.dtype != torch.float32
                              or t.device != q.device):
            raise ValueError(f"{name} must be float32 {(T, *shape)} on {q.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if tbias is not None and bias is None:
        raise ValueError("a bias tangent needs a bias")
    if T * B == 0:
        return tout
    if H == 0:
        return tout.zero_()
    block_m, block_n, num_warps = launch_config(N)
    placeholder = [t if t is not None else q for _, t, _ in tangents]  # never read
    t_strides = [st for (_, t, shape) in tangents for st in _strides(t, len(shape) + 1)]
    _fused_vector_head_jvp_kernel[(T * B, triton.cdiv(N, block_m))](
        q, k, bias if bias is not None else q, x, vw,
        key_mask.contiguous() if key_mask is not None else q, *placeholder, tout,
        N, B, H, 1.4426950408889634 / math.sqrt(DH), 1.0 / math.sqrt(DH), UNIT_EPS,
        *q.stride(), *k.stride(), *_strides(bias, 4), *x.stride(), *vw.stride(), *t_strides,
        DH=DH, D_PAD=padded(DH), SPACE_DIM=x.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_BIAS=bias is not None, HAS_MASK=key_mask is not None, HAS_TQ=tq is not None,
        HAS_TK=tk is not None, HAS_TB=tbias is not None, HAS_TX=tx is not None,
        HAS_TW=tvw is not None, DOT_PRECISION="ieee", num_warps=num_warps)
    return tout


def _tangent(primal, tangents, count):
    """count tangent sets (each (count, ...) or None) -> d out (count, B, N, d)."""
    x = primal[3]
    tout = torch.empty((count, *x.shape), dtype=torch.float32, device=x.device)
    return fused_vector_head_jvp_into(tout, *primal, *tangents)


def _fold(args, in_dims, size):
    """vmap's dimension folded into the batch axis (0) of each tensor; None stays None."""
    folded = []
    for t, d in zip(args, in_dims):
        if t is not None:
            t = t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
            t = t.reshape(size * t.shape[1], *t.shape[2:])
        folded.append(t)
    return folded


class FusedVectorHeadTangent(torch.autograd.Function):
    """The output's tangent from the primal and the input tangents, a Function of its own so
    that vmap over tangents (K Hutchinson probes) is one launch over K tangent sets."""

    @staticmethod
    def forward(q, k, bias, x, vw, key_mask, tq, tk, tbias, tx, tvw):
        tangents = [None if t is None else t.unsqueeze(0) for t in (tq, tk, tbias, tx, tvw)]
        return _tangent((q, k, bias, x, vw, key_mask), tangents, 1)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, q, k, bias, x, vw, key_mask, tq, tk, tbias, tx, tvw):
        size = info.batch_size
        primal, tangents = (q, k, bias, x, vw, key_mask), (tq, tk, tbias, tx, tvw)
        if any(d is not None for d in in_dims[:6]):
            # vmap over structures (primal and tangents): fold it into the batch, one set
            folded = _fold(primal + tangents, in_dims, size)
            tout = _tangent(folded[:6], [None if t is None else t.unsqueeze(0)
                                         for t in folded[6:]], 1)[0]
            return tout.reshape(size, -1, *tout.shape[1:]), 0
        tangents = [None if t is None else (t.movedim(d, 0) if d is not None
                                            else t.expand(size, *t.shape))
                    for t, d in zip(tangents, in_dims[6:])]
        return _tangent(primal, tangents, size), 0


def backward_chunk_rows(batch: int, heads: int, n_atoms: int, features: int,
                        device=torch.device("cpu")) -> int:
    """Query rows per recompute chunk of the backward (at least one)."""
    return chunk_rows(device, BACKWARD_CHUNK_ELEMENTS, batch * heads * n_atoms * features)


class FusedVectorHeadTriton(torch.autograd.Function):
    """Forward: the fused kernel. Backward: the reference recomputed chunk by chunk of query
    rows (exact; a fused backward kernel is future work)."""

    @staticmethod
    def forward(q, k, bias, x, vw, key_mask):
        check_inputs(q, k, bias, x, vw, key_mask)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        fused_vector_head_forward_into(out, q, k, bias, x, vw, key_mask)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an absent tangent stays None
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, tq, tk, tbias, tx, tvw, _tmask):
        """Forward mode by the fused tangent kernel (the primal recomputed in its tiles)."""
        q, k, bias, x, vw, key_mask = ctx.saved_tensors
        tq, tk, tbias, tx, tvw = (None if t is None else t.float()
                                  for t in (tq, tk, tbias, tx, tvw))
        return FusedVectorHeadTangent.apply(q, k, bias, x, vw, key_mask, tq, tk, tbias, tx, tvw)

    @staticmethod
    def vmap(info, in_dims, q, k, bias, x, vw, key_mask):
        """vmap over structures: its dimension joins the batch (axis 0 of every input)."""
        size = info.batch_size
        out = FusedVectorHeadTriton.apply(*_fold((q, k, bias, x, vw, key_mask), in_dims, size))
        return out.reshape(size, -1, *out.shape[1:]), 0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, bias, x, vw, key_mask = ctx.saved_tensors
        positions = (0, 1, 2, 3, 4)  # q, k, bias, x, vw; key_mask has no grad
        leaves = [None if t is None else t.detach().requires_grad_(ctx.needs_input_grad[pos])
                  for pos, t in zip(positions, (q, k, bias, x, vw))]
        wanted = [n for n in positions if leaves[n] is not None and ctx.needs_input_grad[n]]
        sums = [None] * 5
        B, H, N, DH = q.shape
        step = backward_chunk_rows(B, H, N, max(DH, x.shape[2]), x.device)
        lq, lk, lb, lx, lv = leaves
        for r0 in range(0, N, step):
            rows = slice(r0, min(r0 + step, N))
            with torch.enable_grad():
                # x[:, rows] is a slice of the same leaf: u_ii stays exactly 0
                out_c = fused_vector_head_rows_reference(
                    lq[:, :, rows], lk, None if lb is None else lb[:, :, rows], lx[:, rows], lx,
                    lv, key_mask)
            parts = torch.autograd.grad(out_c, [leaves[n] for n in wanted], grad_out[:, rows],
                                        allow_unused=True)
            for n, part in zip(wanted, parts):
                if part is not None:  # None: this chunk does not depend on it (zero)
                    sums[n] = part if sums[n] is None else sums[n] + part
        for n in wanted:  # e.g. N = 1: the output does not depend on q, k at all
            if sums[n] is None:
                sums[n] = torch.zeros_like(leaves[n])
        return (*sums, None)


def fused_vector_head_triton(q, k, bias, x, vw, key_mask=None):
    """sum_h sum_j softmax_j(q.k / sqrt(dh) + bias) u_ij vw_hj, (B, N, d): the fused forward
    (see the module doc); differentiable in q, k, bias, x and vw (chunked reference backward)."""
    return FusedVectorHeadTriton.apply(q, k, bias, x, vw, key_mask)
