"""Counter-based Gaussian noise (Philox4x32-10 + Box-Muller), pure torch.

This is the specification every backend (C++, CUDA, Triton) reproduces. A draw is
a pure function of (seed, sample id, step, stream, element index), so a sample's
noise never depends on the batch it ran in, its row, or the device count.

Layout of one Philox call: key = (seed & 0xffffffff, seed >> 32),
counter = (element // 4, step, sample id, stream). Its four 32-bit words give the
four normals of elements 4q .. 4q+3 by Box-Muller on the pairs (w0, w1), (w2, w3):
    r = sqrt(-2 log((float(w0) + 1) * 2^-32)),  theta = 2 pi float(w1) * 2^-32
    z0 = r cos(theta), z1 = r sin(theta)
all in float32, float(w) rounding to nearest.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
TWO_POW_M32 = 2.0 ** -32
TWO_PI_F32 = 6.2831855  # float32(2 pi)

# Streams keep independent uses of one seed apart.
STREAM_STEP = 0      # per-step sampler noise
STREAM_PRIOR = 1     # the initial draw from the prior
STREAM_PROBE = 2     # Hutchinson probes
STEP_NONE = 0xFFFFFFFF  # the step word for draws that belong to no step


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * x for a 32-bit constant m, without int64 overflow."""
    p_lo = m * (x & 0xFFFF)            # < 2^48
    t = m * (x >> 16) + (p_lo >> 16)   # < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcast together)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in counter)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _box_muller(w_r: torch.Tensor, w_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u = (w_r.to(torch.float32) + 1.0) * TWO_POW_M32
    radius = torch.sqrt(-2.0 * torch.log(u))
    theta = (w_t.to(torch.float32) * TWO_POW_M32) * TWO_PI_F32
    return radius * torch.cos(theta), radius * torch.sin(theta)


def check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def philox_normal(seed: int, sample_ids: torch.Tensor, step: int, stream: int, numel: int) -> torch.Tensor:
    """Standard normals of shape (len(sample_ids), numel), float32, on sample_ids' device."""
    seed = check_seed(seed)
    ids = sample_ids.to(torch.int64).reshape(-1, 1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > MASK32):
        raise ValueError("sample ids must lie in [0, 2**32)")
    n_blocks = (numel + 3) // 4
    block = torch.arange(n_blocks, device=ids.device, dtype=torch.int64).reshape(1, -1)
    w = philox4x32((block, torch.tensor(step), ids, torch.tensor(stream)), (seed & MASK32, seed >> 32))
    w = torch.broadcast_tensors(*w)
    z0, z1 = _box_muller(w[0], w[1])
    z2, z3 = _box_muller(w[2], w[3])
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(ids.shape[0], 4 * n_blocks)
    return z[:, :numel].contiguous()
