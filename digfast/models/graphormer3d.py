"""Graphormer-3D noise-prediction network (DESIGN.md §2), built on the reference ops.

    h_i = embed(a_i) + W_phi sum_j phi_ij + time(t)
    L x [pre-LN attention with per-head additive spatial bias b_ij, FFN]
    eps_i = W sum_j softmax_j(q_i.k_j / sqrt(dh) + b_ij) u_ij v_j    (equivariant head)

It predicts the noise eps of x_t = alpha x_0 + sigma eps; the score is -eps / sigma. Outputs
rotate with the input, ignore translations and permute with the atoms; padded atoms
(mask False) are invisible to the real ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from digfast.ops.pair_bias_attention import pair_bias_attention
from digfast.ops.spatial_bias import spatial_bias
from digfast.ops.vector_head import vector_head


@dataclass
class Graphormer3DConfig:
    n_atom_types: int = 1
    layers: int = 4
    width: int = 64
    heads: int = 4
    ffn: int = 128
    gaussians: int = 32
    time_scale: float = 1000.0  # t in [0, 1] -> sinusoid argument
    max_path: int = 0  # > 0: per-head bias from bond-graph shortest paths (capped), for molecules

    @classmethod
    def reference_size(cls, n_atom_types: int = 128) -> "Graphormer3DConfig":
        """The public DiG sizes: 12 layers, 768 wide, 32 heads, FFN 768, 128 Gaussians."""
        return cls(n_atom_types=n_atom_types, layers=12, width=768, heads=32, ffn=768, gaussians=128)

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = t.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class SpatialBias(nn.Module):
    def __init__(self, cfg: Graphormer3DConfig):
        super().__init__()
        k, t = cfg.gaussians, cfg.n_atom_types
        self.n_types = t
        self.mul = nn.Parameter(torch.ones(t * t))
        self.add = nn.Parameter(torch.zeros(t * t))
        self.means = nn.Parameter(torch.linspace(0.0, 6.0, k))
        self.stds = nn.Parameter(torch.full((k,), 0.5))
        self.fc1, self.fc2 = nn.Linear(k, k), nn.Linear(k, cfg.heads)

    def forward(self, x, atom_types, mask, backend=None):
        """bias (B, H, N, N) and the per-atom sum of the Gaussians over real neighbours
        (B, N, K), both from the op (the Triton kernel emits the sum in the same tiles)."""
        pair_type = atom_types.unsqueeze(-1) * self.n_types + atom_types.unsqueeze(-2)
        return spatial_bias(x, pair_type, self.mul, self.add, self.means, self.stds,
                            self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, mask,
                            backend=backend)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm written with elementary ops: the same numbers and parameters, but
    derivatives of every order are right. torch's fused layer_norm gets the third-order
    derivative wrong (its double-backward rule), which PIDP needs: the weights' gradient of a
    time derivative (or of a divergence's gradient) of the network."""

    def forward(self, z):
        mean = z.mean(-1, keepdim=True)
        centred = z - mean
        return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class Layer(nn.Module):
    def __init__(self, cfg: Graphormer3DConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = LayerNorm(cfg.width), LayerNorm(cfg.width)
        self.qkv, self.out = nn.Linear(cfg.width, 3 * cfg.width), nn.Linear(cfg.width, cfg.width)
        self.ffn = nn.Sequential(nn.Linear(cfg.width, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.width))

    def forward(self, h, logit_bias, backend=None):
        b, n, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        # the op, not F.scaled_dot_product_attention: its fused kernels have no forward-mode
        # derivative, which the likelihood's divergence needs (the op's reference and Triton
        # backends have one)
        a = pair_bias_attention(q, k, v, logit_bias, backend=backend)
        h = h + self.out(a.transpose(1, 2).reshape(b, n, w))
        return h + self.ffn(self.ln2(h))


class Graphormer3D(nn.Module):
    def __init__(self, cfg: Graphormer3DConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.embed = nn.Embedding(cfg.n_atom_types, w)
        self.bias = SpatialBias(cfg)
        self.phi_proj = nn.Linear(cfg.gaussians, w)
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.ln_out = LayerNorm(w)
        self.head_qkv = nn.Linear(w, 3 * w)
        self.head_out = nn.Linear(w, 1, bias=False)
        # path lengths 0..max_path, max_path + 1 = farther or unconnected
        self.path_bias = nn.Embedding(cfg.max_path + 2, cfg.heads) if cfg.max_path > 0 else None
        # None: each op picks per call (device, dtype, what is installed): the reference on
        # the CPU and in float64, the Triton kernels on a GPU. A name forces it on every op
        # (tests: "triton" under TRITON_INTERPRET=1). Not part of the config or the weights.
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, atom_types: torch.Tensor,
                mask: torch.Tensor | None = None, paths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, d), t (B,), atom_types (N,) or (B, N) long, mask (B, N) bool,
        paths (N, N) or (B, N, N) long bond-graph distances (models with max_path > 0) -> eps (B, N, d)."""
        b, n, _ = x.shape
        types = atom_types.expand(b, n) if atom_types.dim() == 1 else atom_types
        bias, phi = self.bias(x, types, mask, self.backend)
        if self.path_bias is not None:
            if paths is None:
                raise ValueError("this network was built with max_path > 0 and needs bond-graph paths")
            bias = bias + self.path_bias(paths.clamp(max=self.cfg.max_path + 1)).movedim(-1, -3)
        if mask is not None:  # padded keys get no attention
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        h_dtype = self.embed.weight.dtype  # float64 networks too (likelihood checks)
        h = self.embed(types) + self.phi_proj(phi) + self.time(sinusoidal_embedding(t * self.cfg.time_scale, self.cfg.width).to(h_dtype)).unsqueeze(1)
        for layer in self.layers:
            h = layer(h, bias, self.backend)
        h = self.ln_out(h)
        heads, dh = self.cfg.heads, self.cfg.width // self.cfg.heads
        q, k, v = self.head_qkv(h).reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
        # the op's reference is the attention_probabilities softmax, not torch.softmax: torch's
        # forward-mode rule for softmax modifies a saved result in place, which breaks
        # training through a time derivative (PIDP); the Triton backend is the fused head
        eps = vector_head(q, k, bias, x, v, self.head_out.weight.reshape(-1), backend=self.backend)
        return eps if mask is None else eps * mask.unsqueeze(-1)
