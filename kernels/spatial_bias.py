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
Forward mode (torch.func.jvp, forward_ad, vmap over tangents or structures): the reference's
JVP in the same row chunks.

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

from digfast.ops.spatial_bias import spatial_bias_rows_reference

INV_SQRT_2PI: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
INV_SQRT_2: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0))
STD_FLOOR: tl.constexpr = tl.constexpr(1e-2)  # stds.abs() + 1e-2, as in gaussian_basis

# The backward recomputes at most about this many (pair, feature) elements per chunk of
# query rows (each intermediate of the reference is B * rows * N * max(K, H) elements).
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


def backward_chunk_rows(batch: int, n_atoms: int, features: int) -> int:
    """Query rows per recompute chunk of the backward (at least one)."""
    return max(1, BACKWARD_CHUNK_ELEMENTS // max(1, batch * n_atoms * features))


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
    def jvp(ctx, *tangents):
        """Forward mode by the reference, row chunk by row chunk (as the backward)."""
        x, pair_type, *params, mask = ctx.saved_tensors
        positions = (0, 2, 3, 4, 5, 6, 7, 8, 9)  # x and the parameters
        moving = [n for n, pos in enumerate(positions) if tangents[pos] is not None]
        primals = [x, *params]
        B, N, _ = x.shape
        step = backward_chunk_rows(B, N, max(params[2].shape[0], params[7].shape[0]))
        bias_parts, node_parts = [], []
        for r0 in range(0, N, step):
            rows = slice(r0, min(r0 + step, N))

            def chunk(*args):
                a = list(primals)
                for n, t in zip(moving, args):
                    a[n] = t
                return spatial_bias_rows_reference(a[0], rows, pair_type, *a[1:], mask=mask)
            _, (tb, tn) = torch.func.jvp(chunk, tuple(primals[n] for n in moving),
                                         tuple(tangents[positions[n]] for n in moving))
            bias_parts.append(tb)
            node_parts.append(tn)
        return torch.cat(bias_parts, dim=2), torch.cat(node_parts, dim=1)

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
        step = backward_chunk_rows(B, N, max(params[2].shape[0], params[7].shape[0]))
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
