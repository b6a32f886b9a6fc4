"""The Graphormer-3D spatial pair bias in Triton: distances, Gaussians and MLP fused per pair tile.

Specification: digfast/ops/spatial_bias.py (spatial_bias_reference). For a batch element b
and a tile of query atoms i, one program walks over the tiles of key atoms j; each pair
tile (BLOCK_I x BLOCK_J pairs, flattened to BLOCK_P rows) computes
    d_ij -> y_ij = mul[t_ij] d_ij + add[t_ij] -> phi_ij (K Gaussians)
         -> GELU(phi W1^T + b1) W2^T + b2                        (two tl.dot on the tile)
stores the H bias values of every pair in (B, H, N, N) and adds the masked phi to a
per-tile accumulator, which is reduced over j and stored as node_features (B, N, K) at the
end. So (B, N, N, K) never exists in memory, and node_features needs no atomics.
K and H are padded to powers of two (at least 16, tl.dot's minimum) with masked loads;
padded Gaussians are zeroed, padded weights are zero, so they add nothing.

Arithmetic in float32; the dot operands are float32 ("ieee", like torch's default matmul)
for float32 inputs, or the input dtype (fp16/bf16, float32 accumulation) otherwise.

Backward: a torch.autograd.Function whose backward recomputes the forward through the
reference in chunks of query rows (spatial_bias_rows_reference) and differentiates that,
so gradients for x and every parameter are exact to the reference's, with memory bounded
by BACKWARD_CHUNK_ELEMENTS. A fused backward kernel (recomputing phi in-tile, reducing
the weight gradients per program) is future work.
Forward mode (torch.func.jvp, forward_ad; the likelihood's divergence): one tangent kernel,
one program per (tangent set, batch, tile of query atoms), recomputes the forward's pair tile
and carries each quantity's tangent along (distance, y, z, phi, the two MLP layers, the
node sums), for tangents of x and of every parameter; nothing (B, N, N, K) is stored. The
tangent is a Function of its own whose vmap rule makes vmap over K probe tangents one launch
with K tangent sets; vmap over structures folds them into the batch.

Works on triton 3.6 .. newest (no tl.make_block_ptr) and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.language.extra import libdevice

from digfast.kernels.recompute import chunk_rows
from digfast.ops.spatial_bias import spatial_bias_rows_reference

INV_SQRT_2PI: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
INV_SQRT_2: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0))
STD_FLOOR: tl.constexpr = tl.constexpr(1e-2)  # stds.abs() + 1e-2, as in gaussian_basis

# The backward recomputes at most about this many (pair, feature) elements per chunk of
# query rows (each intermediate of the reference is B * rows * N * max(K, H) elements), on
# the CPU; on a GPU more, from free memory (kernels/recompute.py).
BACKWARD_CHUNK_ELEMENTS = 1 << 22

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _exp(v, PRECISE_MATH: tl.constexpr):
    # libdevice on a GPU (tl.exp may lower to an approximate instruction); numpy's in the
    # interpreter, which has no libdevice.
    if PRECISE_MATH:
        return libdevice.exp(v)
    else:
        return tl.exp(v)


@triton.jit
def _gelu(v, PRECISE_MATH: tl.constexpr):
    """Exact GELU, 0.5 v (1 + erf(v / sqrt 2)), as F.gelu's default."""
    if PRECISE_MATH:
        e = libdevice.erf(v * INV_SQRT_2)
    else:
        e = tl.math.erf(v * INV_SQRT_2)
    return 0.5 * v * (1.0 + e)


@triton.jit
def _spatial_bias_fwd_kernel(
    x_ptr,          # (B, N, D) contiguous, float
    type_ptr,       # (B, N, N) integer pair types, any strides (an expanded view is fine)
    mul_ptr,        # (T,) contiguous
    add_ptr,        # (T,) contiguous
    means_ptr,      # (K,) contiguous
    stds_ptr,       # (K,) contiguous
    w1_ptr,         # (K, K) contiguous, fc1.weight (out, in)
    b1_ptr,         # (K,) contiguous
    w2_ptr,         # (H, K) contiguous, fc2.weight (out, in)
    b2_ptr,         # (H,) contiguous
    mask_ptr,       # (B, N) bool, read only when HAS_MASK
    bias_ptr,       # (B, H, N, N) contiguous, output
    node_ptr,       # (B, N, K) contiguous, output
    n_atoms,        # N
    stride_tb, stride_ti, stride_tj,  # pair_type strides, in elements
    D: tl.constexpr,
    K: tl.constexpr,
    H: tl.constexpr,
    K_PAD: tl.constexpr,     # next power of two >= max(K, 16)
    H_PAD: tl.constexpr,     # next power of two >= max(H, 16)
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands
    PRECISE_MATH: tl.constexpr,   # libdevice exp/erf (GPU), else tl.* (interpreter)
):
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    b = tl.program_id(0).to(tl.int64)   # the batch on axis 0: up to 2^31 - 1 programs
    pid_i = tl.program_id(1)
    dot_dtype = x_ptr.dtype.element_ty  # float32, or the 16-bit input dtype

    # Pair p of a tile is (i0 + p // BLOCK_J, j0 + p % BLOCK_J).
    p = tl.arange(0, BLOCK_P)
    i = pid_i * BLOCK_I + p // BLOCK_J                 # (P,) fixed for the whole j loop
    jj = p % BLOCK_J
    i_in = i < n_atoms
    k = tl.arange(0, K_PAD)
    h = tl.arange(0, H_PAD)
    k_in = k < K
    h_in = h < H

    # Per-program constants: the Gaussians and the MLP weights, padded with zeros.
    means = tl.load(means_ptr + k, mask=k_in, other=0.0).to(tl.float32)
    stds = tl.abs(tl.load(stds_ptr + k, mask=k_in, other=1.0).to(tl.float32)) + STD_FLOOR
    inv_std = 1.0 / stds
    norm = INV_SQRT_2PI * inv_std
    # W1^T (K_in, K_out) and W2^T (K, H): operand B of the two dots.
    w1t = tl.load(w1_ptr + k[None, :] * K + k[:, None], mask=k_in[:, None] & k_in[None, :],
                  other=0.0).to(dot_dtype)
    b1 = tl.load(b1_ptr + k, mask=k_in, other=0.0).to(tl.float32)
    w2t = tl.load(w2_ptr + h[None, :] * K + k[:, None], mask=k_in[:, None] & h_in[None, :],
                  other=0.0).to(dot_dtype)
    b2 = tl.load(b2_ptr + h, mask=h_in, other=0.0).to(tl.float32)

    x_base = x_ptr + b * n_atoms * D
    real_i = i_in
    if HAS_MASK:
        real_i = real_i & (tl.load(mask_ptr + b * n_atoms + i, mask=i_in, other=0) != 0)
    node_acc = tl.zeros((BLOCK_P, K_PAD), dtype=tl.float32)
    bias_base = bias_ptr + b * H * n_atoms * n_atoms
    i64 = i.to(tl.int64)

    for j0 in range(0, n_atoms, BLOCK_J):
        j = j0 + jj
        pair_in = i_in & (j < n_atoms)

        # Distances, computed directly (no |a|^2 + |b|^2 - 2ab cancellation).
        dist2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c in tl.static_range(D):
            xi = tl.load(x_base + i * D + c, mask=i_in, other=0.0).to(tl.float32)
            xj = tl.load(x_base + j * D + c, mask=j < n_atoms, other=0.0).to(tl.float32)
            dist2 += (xi - xj) * (xi - xj)
        dist = tl.sqrt_rn(dist2)

        t = tl.load(type_ptr + b * stride_tb + i64 * stride_ti + j.to(tl.int64) * stride_tj,
                    mask=pair_in, other=0)
        y = tl.load(mul_ptr + t, mask=pair_in, other=0.0).to(tl.float32) * dist \
            + tl.load(add_ptr + t, mask=pair_in, other=0.0).to(tl.float32)

        z = (y[:, None] - means[None, :]) * inv_std[None, :]
        phi = _exp(-0.5 * z * z, PRECISE_MATH) * norm[None, :]
        phi = tl.where(k_in[None, :], phi, 0.0)          # padded Gaussians contribute nothing

        hidden = tl.dot(phi.to(dot_dtype), w1t, input_precision=DOT_PRECISION) + b1[None, :]
        hidden = _gelu(hidden, PRECISE_MATH)
        bias = tl.dot(hidden.to(dot_dtype), w2t, input_precision=DOT_PRECISION) + b2[None, :]

        bias_off = h[None, :].to(tl.int64) * n_atoms * n_atoms + (i64 * n_atoms + j)[:, None]
        tl.store(bias_base + bias_off, bias.to(bias_ptr.dtype.element_ty),
                 mask=pair_in[:, None] & h_in[None, :])

        # Node features: phi summed over real neighbours j of real atoms i.
        real_pair = real_i & (j < n_atoms)
        if HAS_MASK:
            real_pair = real_pair & (tl.load(mask_ptr + b * n_atoms + j, mask=j < n_atoms,
                                             other=0) != 0)
        node_acc += tl.where(real_pair[:, None], phi, 0.0)

    # The accumulator holds BLOCK_J partial sums per atom i: reduce them.
    node = tl.sum(tl.reshape(node_acc, (BLOCK_I, BLOCK_J, K_PAD)), axis=1)
    i_row = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    node_off = (b * n_atoms + i_row.to(tl.int64))[:, None] * K + k[None, :]
    tl.store(node_ptr + node_off, node.to(node_ptr.dtype.element_ty),
             mask=(i_row < n_atoms)[:, None] & k_in[None, :])


@triton.jit
def _gelu_slope(v, PRECISE_MATH: tl.constexpr):
    """d GELU / dv = Phi(v) + v phi(v), the exact GELU's derivative."""
    if PRECISE_MATH:
        e = libdevice.erf(v * INV_SQRT_2)
    else:
        e = tl.math.erf(v * INV_SQRT_2)
    return 0.5 * (1.0 + e) + v * _exp(-0.5 * v * v, PRECISE_MATH) * INV_SQRT_2PI


@triton.jit
def _spatial_bias_jvp_kernel(
    x_ptr, type_ptr, mul_ptr, add_ptr, means_ptr, stds_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    mask_ptr,       # the primal, as the forward kernel's
    tx_ptr,         # (T, B, N, D) contiguous, read when HAS_TX
    tmul_ptr,       # (T, n_types) contiguous; this and the rest read when HAS_TP
    tadd_ptr,       # (T, n_types) contiguous
    tmeans_ptr,     # (T, K) contiguous
    tstds_ptr,      # (T, K) contiguous
    tw1_ptr,        # (T, K, K) contiguous
    tb1_ptr,        # (T, K) contiguous
    tw2_ptr,        # (T, H, K) contiguous
    tb2_ptr,        # (T, H) contiguous
    tbias_ptr,      # (T, B, H, N, N) contiguous, output
    tnode_ptr,      # (T, B, N, K) contiguous, output
    n_atoms, n_batch, n_types,
    stride_tb, stride_ti, stride_tj,
    D: tl.constexpr, K: tl.constexpr, H: tl.constexpr, K_PAD: tl.constexpr,
    H_PAD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_TX: tl.constexpr, HAS_TP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr,
):
    # The forward's pair tile again, each quantity followed by its tangent:
    #   dd = (delta . ddelta) / d,  dy = dmul d + mul dd + dadd,
    #   dz = (dy - dmu - z ds) / s,  dphi = -phi (z dz + ds / s)    (s = |stds| + floor),
    #   dpre = dphi W1^T + phi dW1^T + db1,  dhidden = GELU'(pre) dpre,
    #   dbias = dhidden W2^T + hidden dW2^T + db2,  dnode_i = sum_j dphi_ij (real pairs).
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    tb = tl.program_id(0).to(tl.int64)    # tangent set * batch
    ts = tb // n_batch
    b = tb % n_batch
    pid_i = tl.program_id(1)
    dot_dtype = x_ptr.dtype.element_ty

    p = tl.arange(0, BLOCK_P)
    i = pid_i * BLOCK_I + p // BLOCK_J
    jj = p % BLOCK_J
    i_in = i < n_atoms
    k = tl.arange(0, K_PAD)
    h = tl.arange(0, H_PAD)
    k_in = k < K
    h_in = h < H
    kk_in = k_in[:, None] & k_in[None, :]
    kh_in = k_in[:, None] & h_in[None, :]

    means = tl.load(means_ptr + k, mask=k_in, other=0.0).to(tl.float32)
    stds_raw = tl.load(stds_ptr + k, mask=k_in, other=1.0).to(tl.float32)
    stds = tl.abs(stds_raw) + STD_FLOOR
    inv_std = 1.0 / stds
    norm = INV_SQRT_2PI * inv_std
    w1t = tl.load(w1_ptr + k[None, :] * K + k[:, None], mask=kk_in, other=0.0).to(dot_dtype)
    b1 = tl.load(b1_ptr + k, mask=k_in, other=0.0).to(tl.float32)
    w2t = tl.load(w2_ptr + h[None, :] * K + k[:, None], mask=kh_in, other=0.0).to(dot_dtype)
    # parameter tangents of this set (zeros without HAS_TP)
    dmeans = tl.zeros((K_PAD,), dtype=tl.float32)
    dstd = tl.zeros((K_PAD,), dtype=tl.float32)
    db1 = tl.zeros((K_PAD,), dtype=tl.float32)
    db2 = tl.zeros((H_PAD,), dtype=tl.float32)
    if HAS_TP:
        dmeans = tl.load(tmeans_ptr + ts * K + k, mask=k_in, other=0.0).to(tl.float32)
        # d|stds| = sign(stds) dstds (0 at 0, as torch's abs)
        sign = tl.where(stds_raw > 0.0, 1.0, tl.where(stds_raw < 0.0, -1.0, 0.0))
        dstd = sign * tl.load(tstds_ptr + ts * K + k, mask=k_in, other=0.0).to(tl.float32)
        db1 = tl.load(tb1_ptr + ts * K + k, mask=k_in, other=0.0).to(tl.float32)
        db2 = tl.load(tb2_ptr + ts * H + h, mask=h_in, other=0.0).to(tl.float32)
        dw1t = tl.load(tw1_ptr + ts * K * K + k[None, :] * K + k[:, None], mask=kk_in,
                       other=0.0).to(dot_dtype)
        dw2t = tl.load(tw2_ptr + ts * H * K + h[None, :] * K + k[:, None], mask=kh_in,
                       other=0.0).to(dot_dtype)

    x_base = x_ptr + b * n_atoms * D
    tx_base = tx_ptr + tb * n_atoms * D
    real_i = i_in
    if HAS_MASK:
        real_i = real_i & (tl.load(mask_ptr + b * n_atoms + i, mask=i_in, other=0) != 0)
    node_acc = tl.zeros((BLOCK_P, K_PAD), dtype=tl.float32)
    tbias_base = tbias_ptr + tb * H * n_atoms * n_atoms
    i64 = i.to(tl.int64)

    for j0 in range(0, n_atoms, BLOCK_J):
        j = j0 + jj
        j_in = j < n_atoms
        pair_in = i_in & j_in
        dist2 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        proj = tl.zeros((BLOCK_P,), dtype=tl.float32)     # delta . ddelta
        for c in tl.static_range(D):
            xi = tl.load(x_base + i * D + c, mask=i_in, other=0.0).to(tl.float32)
            xj = tl.load(x_base + j * D + c, mask=j_in, other=0.0).to(tl.float32)
            dist2 += (xi - xj) * (xi - xj)
            if HAS_TX:
                ti = tl.load(tx_base + i * D + c, mask=i_in, other=0.0).to(tl.float32)
                tj = tl.load(tx_base + j * D + c, mask=j_in, other=0.0).to(tl.float32)
                proj += (xj - xi) * (tj - ti)
        dist = tl.sqrt_rn(dist2)
        # 0 where the atoms coincide (the reference's sqrt is taken only where r^2 > 0)
        ddist = tl.where(dist2 > 0.0, proj / tl.where(dist2 > 0.0, dist, 1.0), 0.0)

        t = tl.load(type_ptr + b * stride_tb + i64 * stride_ti + j.to(tl.int64) * stride_tj,
                    mask=pair_in, other=0)
        mul = tl.load(mul_ptr + t, mask=pair_in, other=0.0).to(tl.float32)
        y = mul * dist + tl.load(add_ptr + t, mask=pair_in, other=0.0).to(tl.float32)
        dy = mul * ddist
        if HAS_TP:
            dy += tl.load(tmul_ptr + ts * n_types + t, mask=pair_in, other=0.0).to(tl.float32) \
                * dist + tl.load(tadd_ptr + ts * n_types + t, mask=pair_in,
                                 other=0.0).to(tl.float32)

        z = (y[:, None] - means[None, :]) * inv_std[None, :]
        phi = _exp(-0.5 * z * z, PRECISE_MATH) * norm[None, :]
        phi = tl.where(k_in[None, :], phi, 0.0)
        dz = (dy[:, None] - dmeans[None, :] - z * dstd[None, :]) * inv_std[None, :]
        dphi = -phi * (z * dz + (dstd * inv_std)[None, :])

        pre = tl.dot(phi.to(dot_dtype), w1t, input_precision=DOT_PRECISION) + b1[None, :]
        dpre = tl.dot(dphi.to(dot_dtype), w1t, input_precision=DOT_PRECISION) + db1[None, :]
        if HAS_TP:
            dpre += tl.dot(phi.to(dot_dtype), dw1t, input_precision=DOT_PRECISION)
        dhidden = _gelu_slope(pre, PRECISE_MATH) * dpre
        dbias = tl.dot(dhidden.to(dot_dtype), w2t, input_precision=DOT_PRECISION) + db2[None, :]
        if HAS_TP:
            hidden = _gelu(pre, PRECISE_MATH)
            dbias += tl.dot(hidden.to(dot_dtype), dw2t, input_precision=DOT_PRECISION)

        off = h[None, :].to(tl.int64) * n_atoms * n_atoms + (i64 * n_atoms + j)[:, None]
        tl.store(tbias_base + off, dbias.to(tbias_ptr.dtype.element_ty),
                 mask=pair_in[:, None] & h_in[None, :])

        real_pair = real_i & j_in
        if HAS_MASK:
            real_pair = real_pair & (tl.load(mask_ptr + b * n_atoms + j, mask=j_in,
                                             other=0) != 0)
        node_acc += tl.where(real_pair[:, None], dphi, 0.0)

    node = tl.sum(tl.reshape(node_acc, (BLOCK_I, BLOCK_J, K_PAD)), axis=1)
    i_row = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    node_off = (tb * n_atoms + i_row.to(tl.int64))[:, None] * K + k[None, :]
    tl.store(tnode_ptr + node_off, node.to(tnode_ptr.dtype.element_ty),
             mask=(i_row < n_atoms)[:, None] & k_in[None, :])


def padded(n: int) -> int:
    """A feature dimension padded for tl.dot: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def launch_config(n_atoms: int, k_pad: int) -> tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, num_warps). A tile holds BLOCK_I * BLOCK_J pairs (>= 16, tl.dot's
    minimum), fewer for large K so that phi and the hidden layer (pairs x K, float32) stay
    in registers; small molecules get small tiles so padding does not dominate."""
    pairs = 64 if k_pad >= 64 else 128
    n_pow2 = triton.next_power_of_2(n_atoms)
    block_j = min(max(n_pow2, 2), 16)
    block_i = max(min(pairs // block_j, n_pow2), 16 // block_j)
    num_warps = 8 if block_i * block_j * k_pad >= 8192 else 4
    return block_i, block_j, num_warps


def check_inputs(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask):
    """Shapes, dtypes and devices, each failure named. Pair types must index mul/add; that is
    not checked here (it would cost a device-to-host sync)."""
    if x.dim() != 3 or x.shape[2] not in (2, 3) or x.shape[1] < 1:
        raise ValueError(f"x must be (batch, atoms>=1, 2 or 3), got {tuple(x.shape)}")
    B, N, _ = x.shape
    K = means.shape[0] if means.dim() else 0   # a wrong rank fails the shape check below
    H = b2.shape[0] if b2.dim() else 0
    shapes = {"pair_type": (pair_type, (B, N, N)), "means": (means, (K,)), "stds": (stds, (K,)),
              "w1": (w1, (K, K)), "b1": (b1, (K,)), "w2": (w2, (H, K)), "b2": (b2, (H,)),
              "mul": (mul, (mul.numel(),)), "add": (add, (mul.numel(),))}
    if mask is not None:
        shapes["mask"] = (mask, (B, N))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("mul", mul), ("add", add), ("means", means), ("stds", stds), ("w1", w1),
                    ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if pair_type.dtype.is_floating_point or pair_type.dtype.is_complex or pair_type.dtype == torch.bool:
        raise TypeError(f"pair_type must be an integer tensor, got {pair_type.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    tensors = [x, pair_type, mul, add, means, stds, w1, b1, w2, b2] + ([mask] if mask is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"spatial_bias_triton needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got {x.device}")


def spatial_bias_forward_into(bias, node_features, x, pair_type, mul, add, means, stds, w1, b1,
                              w2, b2, mask=None):
    """Launch the forward kernel, writing every entry of the given contiguous outputs
    bias (B, H, N, N) and node_features (B, N, K) (x's dtype). Inputs as the reference's."""
    check_inputs(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask)
    B, N, D = x.shape
    K, H = means.shape[0], b2.shape[0]
    if bias.shape != (B, H, N, N) or node_features.shape != (B, N, K):
        raise ValueError(f"outputs must be {(B, H, N, N)} and {(B, N, K)}, got "
                         f"{tuple(bias.shape)} and {tuple(node_features.shape)}")
    if not (bias.is_contiguous() and node_features.is_contiguous()):
        raise ValueError("outputs must be contiguous")
    if B == 0:
        return bias, node_features
    x, mul, add, means, stds, w1, b1, w2, b2 = (
        t.contiguous() for t in (x, mul, add, means, stds, w1, b1, w2, b2))
    mask_arg = mask.contiguous() if mask is not None else x  # placeholder, never read
    k_pad, h_pad = padded(K), padded(H)
    block_i, block_j, num_warps = launch_config(N, k_pad)
    grid = (B, triton.cdiv(N, block_i))
    _spatial_bias_fwd_kernel[grid](
        x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask_arg, bias, node_features,
        N, pair_type.stride(0), pair_type.stride(1), pair_type.stride(2),
        D=D, K=K, H=H, K_PAD=k_pad, H_PAD=h_pad, BLOCK_I=block_i, BLOCK_J=block_j,
        HAS_MASK=mask is not None, DOT_PRECISION="ieee", PRECISE_MATH=x.is_cuda,
        num_warps=num_warps, enable_fp_fusion=True)  # FMA contraction is fine here
    return bias, node_features


PARAMS = ("mul", "add", "means", "stds", "w1", "b1", "w2", "b2")


def spatial_bias_jvp_into(tbias, tnode, x, pair_type, mul, add, means, stds, w1, b1, w2, b2,
                          mask, tx, tparams):
    """Launch the tangent kernel: tbias (T, B, H, N, N) and tnode (T, B, N, K) (contiguous,
    x's dtype) receive, for each of T tangent sets, the derivatives of bias and node_features
    along tx (T, B, N, D) and tparams, the tangents of (mul, add, means, stds, w1, b1, w2,
    b2) each (T, *shape) (None: no tangent; a parameter without one while others have one
    gets zeros). Any strides in; the primal is recomputed in the same tiles."""
    check_inputs(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask)
    B, N, D = x.shape
    K, H = means.shape[0], b2.shape[0]
    T = tbias.shape[0]
    if (tuple(tbias.shape) != (T, B, H, N, N) or tuple(tnode.shape) != (T, B, N, K)
            or not (tbias.is_contiguous() and tnode.is_contiguous())):
        raise ValueError(f"outputs must be contiguous {(T, B, H, N, N)} and {(T, B, N, K)}, got "
                         f"{tuple(tbias.shape)} and {tuple(tnode.shape)}")
    primal = dict(zip(PARAMS, (mul, add, means, stds, w1, b1, w2, b2)))
    has_tp = any(t is not None for t in tparams)
    for name, t in (("tx", tx), *zip(PARAMS, tparams)):
        shape = x.shape if name == "tx" else primal[name].shape
        if t is not None and (tuple(t.shape) != (T, *shape) or t.device != x.device):
            raise ValueError(f"{name} must be {(T, *shape)} on {x.device}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if T * B == 0:
        return tbias, tnode
    tx_arg = tx.to(x.dtype).contiguous() if tx is not None else x   # placeholder, never read
    tp_args = [x] * len(PARAMS)
    if has_tp:
        tp_args = [(t.to(x.dtype) if t is not None
                    else torch.zeros(T, *primal[n].shape, dtype=x.dtype, device=x.device)
                    ).contiguous() for n, t in zip(PARAMS, tparams)]
    x, mul, add, means, stds, w1, b1, w2, b2 = (
        t.contiguous() for t in (x, mul, add, means, stds, w1, b1, w2, b2))
    mask_arg = mask.contiguous() if mask is not None else x
    k_pad, h_pad = padded(K), padded(H)
    block_i, block_j, num_warps = launch_config(N, k_pad)
    _spatial_bias_jvp_kernel[(T * B, triton.cdiv(N, block_i))](
        x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask_arg, tx_arg, *tp_args,
        tbias, tnode, N, B, mul.shape[0],
        pair_type.stride(0), pair_type.stride(1), pair_type.stride(2),
        D=D, K=K, H=H, K_PAD=k_pad, H_PAD=h_pad, BLOCK_I=block_i, BLOCK_J=block_j,
        HAS_MASK=mask is not None, HAS_TX=tx is not None, HAS_TP=has_tp,
        DOT_PRECISION="ieee", PRECISE_MATH=x.is_cuda, num_warps=num_warps,
        enable_fp_fusion=True)
    return tbias, tnode


def _tangent(primal, tx, tparams, count):
    """count tangent sets -> (d bias (count, B, H, N, N), d node_features (count, B, N, K))."""
    x, means, b2 = primal[0], primal[4], primal[9]
    B, N, _ = x.shape
    tbias = torch.empty(count, B, b2.shape[0], N, N, dtype=x.dtype, device=x.device)
    tnode = torch.empty(count, B, N, means.shape[0], dtype=x.dtype, device=x.device)
    return spatial_bias_jvp_into(tbias, tnode, *primal, tx, tparams)


class SpatialBiasTangent(torch.autograd.Function):
    """The outputs' tangents from the primal and the input tangents; a Function of its own so
    that vmap over tangents (K Hutchinson probes) is one launch over K tangent sets."""

    @staticmethod
    def forward(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask, tx, *tparams):
        one = [None if t is None else t.unsqueeze(0) for t in (tx, *tparams)]
        tbias, tnode = _tangent((x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask),
                                one[0], one[1:], 1)
        return tbias[0], tnode[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, x, pair_type, *rest):
        size = info.batch_size
        params, mask, tangents = rest[:8], rest[8], rest[9:]
        if any(d is not None for d in in_dims[2:10]):
            raise NotImplementedError("spatial_bias_triton: vmap over the parameters")
        if any(d is not None for d in (in_dims[0], in_dims[1], in_dims[10])):
            # vmap over structures: x, pair_type, mask and x's tangent join the batch; the
            # parameter tangents must then be shared (no per-structure parameter tangents)
            if any(d is not None for d in in_dims[12:]):
                raise NotImplementedError("spatial_bias_triton: parameter tangents that vary "
                                          "with a vmapped structure dimension")
            folded = []
            for t, d in zip((x, pair_type, mask, tangents[0]),
                            (in_dims[0], in_dims[1], in_dims[10], in_dims[11])):
                if t is not None:
                    t = t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
                    t = t.reshape(size * t.shape[1], *t.shape[2:])
                folded.append(t)
            one = [None if t is None else t.unsqueeze(0) for t in (folded[3], *tangents[1:])]
            tbias, tnode = _tangent((folded[0], folded[1], *params, folded[2]), one[0], one[1:], 1)
            return ((tbias[0].reshape(size, -1, *tbias.shape[2:]),
                     tnode[0].reshape(size, -1, *tnode.shape[2:])), (0, 0))
        sets = [None if t is None else (t.movedim(d, 0) if d is not None
                                        else t.expand(size, *t.shape))
                for t, d in zip(tangents, in_dims[11:])]
        return _tangent((x, pair_type, *params, mask), sets[0], sets[1:], size), (0, 0)


def backward_chunk_rows(batch: int, n_atoms: int, features: int, device=torch.device("cpu")) -> int:
    """Query rows per recompute chunk of the backward (at least one)."""
    return chunk_rows(device, BACKWARD_CHUNK_ELEMENTS, batch * n_atoms * features)


class SpatialBiasTriton(torch.autograd.Function):
    """Forward: the fused kernel. Backward: the reference recomputed row chunk by row chunk."""

    @staticmethod
    def forward(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask):
        B, N, _ = x.shape
        bias = torch.empty(B, b2.shape[0], N, N, dtype=x.dtype, device=x.device)
        node = torch.empty(B, N, means.shape[0], dtype=x.dtype, device=x.device)
        spatial_bias_forward_into(bias, node, x, pair_type, mul, add, means, stds, w1, b1, w2, b2,
                                  mask)
        return bias, node

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an absent tangent or gradient stays None
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, tx, _tpair, *tangents):
        """Forward mode by the fused tangent kernel (the primal recomputed in its tiles)."""
        x, pair_type, *params, mask = ctx.saved_tensors
        return SpatialBiasTangent.apply(x, pair_type, *params, mask, tx, *tangents[:8])

    @staticmethod
    def vmap(info, in_dims, x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask):
        """vmap over structures (x, pair_type, mask): its dimension joins the batch."""
        if any(d is not None for d in in_dims[2:10]):
            raise NotImplementedError("spatial_bias_triton: vmap over the parameters")
        size = info.batch_size
        folded = []
        for t, d in zip((x, pair_type, mask), (in_dims[0], in_dims[1], in_dims[10])):
            if t is not None:
                t = t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
                t = t.reshape(size * t.shape[1], *t.shape[2:])
            folded.append(t)
        bias, node = SpatialBiasTriton.apply(folded[0], folded[1], mul, add, means, stds, w1, b1,
                                             w2, b2, folded[2])
        return ((bias.reshape(size, -1, *bias.shape[1:]), node.reshape(size, -1, *node.shape[1:])),
                (0, 0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_bias, grad_node):
        x, pair_type, *params, mask = ctx.saved_tensors
        # Forward argument positions of x and the parameters (pair_type, mask have no grad).
        positions = (0, 2, 3, 4, 5, 6, 7, 8, 9)
        leaves = [t.detach().requires_grad_(ctx.needs_input_grad[pos])
                  for pos, t in zip(positions, [x, *params])]
        wanted = [n for n, pos in enumerate(positions) if ctx.needs_input_grad[pos]]
        sums = [None] * len(positions)
        B, N, _ = x.shape
        step = backward_chunk_rows(B, N, max(params[2].shape[0], params[7].shape[0]), x.device)
        for r0 in range(0, N, step):
            rows = slice(r0, min(r0 + step, N))
            with torch.enable_grad():
                bias_c, node_c = spatial_bias_rows_reference(leaves[0], rows, pair_type, *leaves[1:],
                                                             mask=mask)
            outs = [(bias_c, grad_bias[:, :, rows] if grad_bias is not None else None),
                    (node_c, grad_node[:, rows] if grad_node is not None else None)]
            outs = [(o, g) for o, g in outs if g is not None]
            parts = torch.autograd.grad([o for o, _ in outs], [leaves[n] for n in wanted],
                                        [g for _, g in outs], allow_unused=True)
            for n, part in zip(wanted, parts):
                if part is not None:  # None: this output does not depend on it (zero)
                    sums[n] = part if sums[n] is None else sums[n] + part
        grads = [None] * 11
        for pos, g in zip(positions, sums):
            grads[pos] = g
        return tuple(grads)


def spatial_bias_triton(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask=None):
    """bias (B, H, N, N), node_features (B, N, K): the fused forward (see the module doc);
    differentiable in x and every parameter through the chunked reference backward."""
    return SpatialBiasTriton.apply(x, pair_type, mul, add, means, stds, w1, b1, w2, b2, mask)
