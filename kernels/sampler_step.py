"""The fused sampler step in Triton: update + Philox noise + centre-of-mass removal.

    out = P_mask(a * x + b * direction + c * z),   z = philox_normal(seed, sample_ids, step)

Specification: digfast/ops/sampler_step.py (sampler_step_reference) and
digfast/ops/philox.py (noise layout). One program per sample loops over tiles of
PHILOX_BLOCKS Philox blocks (4 consecutive elements each, the 4 normals of one Philox call):
pass 1 computes and stores y = a*x + b*d + c*z and sums the real atoms per coordinate,
pass 2 subtracts the centre of mass and zeroes padded atoms.
Works on triton 3.6 .. newest (no tl.make_block_ptr) and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from digfast.ops import philox

# The constants come from the specification (one source of truth).
PHILOX_M0: tl.constexpr = tl.constexpr(philox.PHILOX_M0)
PHILOX_M1: tl.constexpr = tl.constexpr(philox.PHILOX_M1)
PHILOX_W0: tl.constexpr = tl.constexpr(philox.PHILOX_W0)
PHILOX_W1: tl.constexpr = tl.constexpr(philox.PHILOX_W1)
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(philox.PHILOX_ROUNDS)
TWO_POW_M32: tl.constexpr = tl.constexpr(philox.TWO_POW_M32)   # 2^-32
TWO_PI_F32: tl.constexpr = tl.constexpr(philox.TWO_PI_F32)     # float32(2 pi)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors; the key is bumped between rounds."""
    for r in tl.static_range(PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _box_muller(w_r, w_t, PRECISE_MATH: tl.constexpr):
    """Normals (r cos theta, r sin theta) from a (radius word, angle word) pair, float32.

    On a GPU, log/sin/cos come from libdevice (precise; tl.log and friends may lower to
    approximate instructions, depending on the Triton release); the interpreter, which has
    no libdevice, uses numpy's through tl.*.
    """
    u = (w_r.to(tl.float32) + 1.0) * TWO_POW_M32
    theta = (w_t.to(tl.float32) * TWO_POW_M32) * TWO_PI_F32
    if PRECISE_MATH:
        radius = tl.sqrt_rn(-2.0 * libdevice.log(u))
        cos_t, sin_t = libdevice.cos(theta), libdevice.sin(theta)
    else:
        radius = tl.sqrt_rn(-2.0 * tl.log(u))
        cos_t, sin_t = tl.cos(theta), tl.sin(theta)
    return radius * cos_t, radius * sin_t


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "stream"])
def _sampler_step_kernel(
    x_ptr,          # (B, N, D) float32, contiguous
    dir_ptr,        # (B, N, D) float32, contiguous
    out_ptr,        # (B, N, D) float32, contiguous
    ids_ptr,        # (B,) int64 sample ids (taken modulo 2^32)
    mask_ptr,       # (B, N) bool, read only when HAS_MASK
    a, b, c,        # float32 step coefficients
    seed_lo, seed_hi, step, stream,  # Philox key words and counter words (32-bit values)
    n_atoms,        # N
    D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    PHILOX_BLOCKS: tl.constexpr,  # Philox blocks (of 4 elements) per tile
    PRECISE_MATH: tl.constexpr,   # libdevice log/sin/cos (GPU), else tl.* (interpreter)
):
    pid = tl.program_id(0)
    row = n_atoms * D
    base = pid.to(tl.int64) * row
    sample = tl.load(ids_ptr + pid).to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    c1 = step.to(tl.uint32)
    c3 = stream.to(tl.uint32)

    q_in_tile = tl.arange(0, PHILOX_BLOCKS)                    # (P,)
    lane = tl.arange(0, 4)                                     # (4,)
    sum0 = tl.zeros((PHILOX_BLOCKS, 4), dtype=tl.float32)
    sum1 = tl.zeros((PHILOX_BLOCKS, 4), dtype=tl.float32)
    sum2 = tl.zeros((PHILOX_BLOCKS, 4), dtype=tl.float32)
    count = tl.zeros((PHILOX_BLOCKS, 4), dtype=tl.float32)

    # Pass 1: y = a*x + b*d (+ c*z), stored, and summed over the real atoms.
    for q0 in range(0, tl.cdiv(row, 4), PHILOX_BLOCKS):
        q = q0 + q_in_tile
        e = q[:, None] * 4 + lane[None, :]                     # (P, 4) element index
        inside = e < row
        xv = tl.load(x_ptr + base + e, mask=inside, other=0.0)
        dv = tl.load(dir_ptr + base + e, mask=inside, other=0.0)
        y = a * xv + b * dv
        if HAS_NOISE:
            zero = tl.zeros((PHILOX_BLOCKS,), dtype=tl.uint32)
            w0, w1, w2, w3 = _philox4x32_10(q.to(tl.uint32), zero + c1, zero + sample,
                                            zero + c3, k0, k1)
            z0, z1 = _box_muller(w0, w1, PRECISE_MATH)
            z2, z3 = _box_muller(w2, w3, PRECISE_MATH)
            z = tl.where(lane[None, :] == 0, z0[:, None],
                         tl.where(lane[None, :] == 1, z1[:, None],
                                  tl.where(lane[None, :] == 2, z2[:, None], z3[:, None])))
            y = y + c * z
        tl.store(out_ptr + base + e, y, mask=inside)
        real = inside
        if HAS_MASK:
            real = real & (tl.load(mask_ptr + pid.to(tl.int64) * n_atoms + e // D,
                                   mask=inside, other=0) != 0)
        k = e % D
        sum0 += tl.where(real & (k == 0), y, 0.0)
        sum1 += tl.where(real & (k == 1), y, 0.0)
        if D > 2:
            sum2 += tl.where(real & (k == 2), y, 0.0)
        count += tl.where(real & (k == 0), 1.0, 0.0)

    n_real = tl.maximum(tl.sum(tl.sum(count, axis=1), axis=0), 1.0)
    com0 = tl.sum(tl.sum(sum0, axis=1), axis=0) / n_real
    com1 = tl.sum(tl.sum(sum1, axis=1), axis=0) / n_real
    com2 = tl.sum(tl.sum(sum2, axis=1), axis=0) / n_real
    tl.debug_barrier()  # pass 1's stores are visible to every thread of the program

    # Pass 2: subtract the centre of mass, zero the padded atoms.
    for q0 in range(0, tl.cdiv(row, 4), PHILOX_BLOCKS):
        e = (q0 + q_in_tile)[:, None] * 4 + lane[None, :]
        inside = e < row
        y = tl.load(out_ptr + base + e, mask=inside, other=0.0)
        k = e % D
        y = y - tl.where(k == 0, com0, tl.where(k == 1, com1, com2))
        if HAS_MASK:
            real = tl.load(mask_ptr + pid.to(tl.int64) * n_atoms + e // D, mask=inside,
                           other=0) != 0
            y = tl.where(real, y, 0.0)
        tl.store(out_ptr + base + e, y, mask=inside)


def launch_config(n_atoms: int, dim: int) -> tuple[int, int]:
    """(PHILOX_BLOCKS, num_warps) for one sample of n_atoms * dim elements."""
    blocks = triton.cdiv(n_atoms * dim, 4)
    philox_blocks = min(max(triton.next_power_of_2(blocks), 16), 256)
    return philox_blocks, 4 if philox_blocks >= 128 else (2 if philox_blocks >= 64 else 1)


def sampler_step_triton(x, direction, a: float, b: float, c: float, *, seed, sample_ids, step,
                        mask=None):
    """The fused sampler step with Triton, one program per sample (see the module doc)."""
    if torch.is_grad_enabled() and (x.requires_grad or direction.requires_grad):
        raise RuntimeError("sampler_step backend 'triton' has no backward; call it under "
                           "torch.no_grad() or use backend='reference'")
    if x.dim() != 3 or x.shape[2] not in (2, 3) or x.shape[1] < 1:
        raise ValueError(f"x must be (batch, atoms>=1, 2 or 3), got {tuple(x.shape)}")
    if x.shape[1] * x.shape[2] >= 2**31:
        raise ValueError(f"atoms * dim must be < 2**31 (32-bit element offsets), got {tuple(x.shape)}")
    if not 0 <= int(step) < 2**32:
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    seed = philox.check_seed(seed)
    x, direction = x.contiguous(), direction.contiguous()
    out = torch.empty_like(x)
    batch, n_atoms, dim = x.shape
    if batch == 0:
        return out
    ids = sample_ids.to(torch.int64).contiguous()
    mask_arg = mask.contiguous() if mask is not None else ids  # placeholder, never read
    philox_blocks, num_warps = launch_config(n_atoms, dim)
    _sampler_step_kernel[(batch,)](
        x, direction, out, ids, mask_arg, float(a), float(b), float(c),
        seed & philox.MASK32, seed >> 32, int(step), philox.STREAM_STEP, n_atoms,
        D=dim, HAS_MASK=mask is not None, HAS_NOISE=float(c) != 0.0,
        PHILOX_BLOCKS=philox_blocks, PRECISE_MATH=x.is_cuda, num_warps=num_warps,
        enable_fp_fusion=False)  # the reference's float32 roundings: no FMA contraction
    return out
