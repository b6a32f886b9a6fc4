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
Forward mode (torch.func.jvp, forward_ad, vmap over tangents or structures): the reference's
JVP chunk by chunk of query rows, like the backward.
Future work: a fused backward kernel (recomputing p and u tile by tile from saved row
statistics) and a fused tangent kernel.

Works under TRITON_INTERPRET=1 (the tests run it so on the CPU).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from digfast.ops.vector_head import fused_vector_head_rows_reference

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
UNIT_EPS = 1e-6            # the reference's u_ij = delta / (|delta| + eps)
MAX_HEAD_DIM = 256
# The backward recomputes at most about this many (head, query, key, feature) elements per
# chunk of query rows.
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


def backward_chunk_rows(batch: int, heads: int, n_atoms: int, features: int) -> int:
    """Query rows per recompute chunk of the backward (at least one)."""
    return max(1, BACKWARD_CHUNK_ELEMENTS // max(1, batch * heads * n_atoms * features))


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
    def jvp(ctx, *tangents):
        """Forward mode by the reference, chunk by chunk of query rows (as the backward)."""
        q, k, bias, x, vw, key_mask = ctx.saved_tensors
        moving = [n for n in range(5) if tangents[n] is not None]
        primals = [q, k, bias, x, vw]
        B, H, N, DH = q.shape
        step = backward_chunk_rows(B, H, N, max(DH, x.shape[2]))
        parts = []
        for r0 in range(0, N, step):
            rows = slice(r0, min(r0 + step, N))

            def chunk(*args):
                a = list(primals)
                for n, t in zip(moving, args):
                    a[n] = t
                cq, ck, cb, cx, cv = a
                # cx[:, rows] is a slice of the same x: u_ii stays exactly 0
                return fused_vector_head_rows_reference(
                    cq[:, :, rows], ck, None if cb is None else cb[:, :, rows], cx[:, rows], cx,
                    cv, key_mask)
            parts.append(torch.func.jvp(chunk, tuple(primals[n] for n in moving),
                                        tuple(tangents[n] for n in moving))[1])
        return torch.cat(parts, dim=1)

    @staticmethod
    def vmap(info, in_dims, q, k, bias, x, vw, key_mask):
        """vmap over structures: its dimension joins the batch (axis 0 of every input)."""
        size = info.batch_size
        folded = []
        for t, d in zip((q, k, bias, x, vw, key_mask), in_dims):
            if t is not None:
                t = t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
                t = t.reshape(size * t.shape[1], *t.shape[2:])
            folded.append(t)
        out = FusedVectorHeadTriton.apply(*folded)
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
        step = backward_chunk_rows(B, H, N, max(DH, x.shape[2]))
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
