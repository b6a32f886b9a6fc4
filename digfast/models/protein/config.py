"""Sizes of the DiG protein score model. The defaults are the public checkpoint's; the input
widths (AlphaFold2 single 384, pair 128), FFN 1024, 4 query/key and 8 value points per head
and the 64 relative-position buckets are fixed by that layout at every size."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProteinConfig:
    d_model: int = 768
    d_pair: int = 256
    n_layers: int = 12
    n_heads: int = 32
    d_single_in: int = 384
    d_pair_in: int = 128
    d_ffn: int = 1024
    qk_points: int = 4
    v_points: int = 8
    n_buckets: int = 64
    max_distance: int = 128
    max_period: float = 10000.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"ProteinConfig.{name} must be positive, got {value}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.d_model % 2 or self.d_model < 4:
            raise ValueError(f"d_model must be even and >= 4 (sinusoidal step embedding), got {self.d_model}")
        if self.n_buckets % 4:
            raise ValueError(f"n_buckets must be a multiple of 4, got {self.n_buckets}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_attn_out(self) -> int:
        """Width of the attention's concatenated output: scalar values, value points (local
        frame), pair values, value-point norms."""
        return 2 * self.d_model + self.n_heads * self.v_points * 4

    def to_dict(self) -> dict:
        return asdict(self)


# Sampler constants of the public model (diffusion schedule, step count).
N_STEPS = 500
TR_SIGMA_MIN, TR_SIGMA_MAX = 0.1, 35.0        # Angstrom, VE on translations
ROT_SIGMA_MIN, ROT_SIGMA_MAX = 0.02, 1.65     # IGSO(3) on rotations
