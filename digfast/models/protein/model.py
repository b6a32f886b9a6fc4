"""DiG protein score model in the public checkpoint's layout: the plain reference.

Module and parameter names match the public state_dict (249 keys at full size), so a
checkpoint loads strictly (digfast.models.protein.checkpoint). This module computes the way
the public code does: one structure per call is the public use, every layer applies
Linear(d_pair -> d_model) to all L^2 pairs and recomputes the pair bias. It is the oracle of
the fast path (fast.py) and the "public-style" baseline of bench/protein.py.

State: one rigid frame per residue, translation T (Angstrom) and rotation matrix IR whose
transpose maps local coordinates to global ones: x_global = IR^T x_local + T.

Attention of a layer, per head h, queries i, keys j (c = d_model / heads):
    logit_hij = q_hi . k_hj / sqrt(3 c)
                - 1/2 softplus(gamma_h) / sqrt(54) sum_p |G_i q^p_hi - G_j k^p_hj|     (4 points)
                + 1/sqrt(3) (W_b z_ij)_h                                     (pair bias)
                (-inf on padded keys)
with G_i x = IR_i^T x + T_i and z the fixed pair representation. The output concatenates the
attention-weighted scalar values, value points (8 per head, mapped back to the query's
frame), pair values W_v z_ij, and the norms of those local value points, then fc_out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from digfast.models.protein.config import ProteinConfig
from digfast.models.protein.features import relative_position_buckets, step_embedding

POINT_SCALE = 1.0 / math.sqrt(3 * 4 * 9 / 2)  # 1/sqrt(54): of the public layout, for 4 points
PAIR_SCALE = 1.0 / math.sqrt(3.0)


class StepEmbedding(nn.Module):
    """Sinusoidal embedding of the step index; `dummy` (empty) is a key of the public layout."""

    def __init__(self, dim: int, max_period: float):
        super().__init__()
        self.dim, self.max_period = dim, max_period
        self.dummy = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        return step_embedding(step, self.dim, self.max_period, dtype=self.dummy.dtype)


class RelativePosition(nn.Module):
    def __init__(self, cfg: ProteinConfig):
        super().__init__()
        self.n_buckets, self.max_distance = cfg.n_buckets, cfg.max_distance
        self.relative_attention_bias = nn.Embedding(cfg.n_buckets, cfg.d_pair)

    def forward(self, n: int) -> torch.Tensor:
        """(n, n, d_pair) embedding of the offsets i - j."""
        buckets = relative_position_buckets(n, self.n_buckets, self.max_distance,
                                            self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(buckets)


def global_points(local: torch.Tensor, T: torch.Tensor, IR: torch.Tensor) -> torch.Tensor:
    """local (B, L, H, P, 3) in each residue's frame -> global: IR^T x + T."""
    return torch.einsum("blji,blhpj->blhpi", IR, local) + T[:, :, None, None, :]


def local_points(glob: torch.Tensor, T: torch.Tensor, IR: torch.Tensor) -> torch.Tensor:
    """global (B, L, H, P, 3) -> each residue's frame: IR (x - T)."""
    return torch.einsum("blij,blhpj->blhpi", IR, glob - T[:, :, None, None, :])


class FrameAttention(nn.Module):
    """IPA-like attention (scalar + point + pair-bias logits, pair-value output); parameter
    names of the public layout."""

    def __init__(self, cfg: ProteinConfig):
        super().__init__()
        d, dp, h = cfg.d_model, cfg.d_pair, cfg.n_heads
        self.cfg = cfg
        self.scalar_query = nn.Linear(d, d, bias=False)
        self.scalar_key = nn.Linear(d, d, bias=False)
        self.scalar_value = nn.Linear(d, d, bias=False)
        self.pair_bias = nn.Linear(dp, h, bias=False)
        self.point_query = nn.Linear(d, h * cfg.qk_points * 3, bias=False)
        self.point_key = nn.Linear(d, h * cfg.qk_points * 3, bias=False)
        self.point_value = nn.Linear(d, h * cfg.v_points * 3, bias=False)
        self.trained_point_weight = nn.Parameter(torch.rand(h))
        self.pair_value = nn.Linear(dp, d, bias=False)
        self.fc_out = nn.Linear(cfg.d_attn_out, d)

    def point_weight(self) -> torch.Tensor:
        """(H,) coefficient of sum_p |distance| in the logits (negative)."""
        return -0.5 * POINT_SCALE * F.softplus(self.trained_point_weight)

    def forward(self, x, z, T, IR, key_bias):
        """x (B, L, d) normalised node features, z (B, L, L, d_pair), frames T (B, L, 3),
        IR (B, L, 3, 3), key_bias (B, L) 0 or -inf. Returns (B, L, d)."""
        B, L, _ = x.shape
        H, c = self.cfg.n_heads, self.cfg.head_dim
        q = self.scalar_query(x).view(B, L, H, c)
        k = self.scalar_key(x).view(B, L, H, c)
        v = self.scalar_value(x).view(B, L, H, c)
        logits = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(3 * c)

        qp = global_points(self.point_query(x).view(B, L, H, -1, 3), T, IR)
        kp = global_points(self.point_key(x).view(B, L, H, -1, 3), T, IR)
        vp = global_points(self.point_value(x).view(B, L, H, -1, 3), T, IR)
        dist = (qp[:, :, None] - kp[:, None, :]).norm(dim=-1).sum(-1)          # (B, i, j, H)
        logits = logits + self.point_weight()[:, None, None] * dist.permute(0, 3, 1, 2)
        logits = logits + PAIR_SCALE * self.pair_bias(z).permute(0, 3, 1, 2)
        logits = logits + key_bias[:, None, None, :]
        a = torch.softmax(logits, dim=-1)                                         # (B, H, i, j)

        o_scalar = torch.einsum("bhij,bjhc->bihc", a, v).reshape(B, L, -1)
        o_points = local_points(torch.einsum("bhij,bjhpx->bihpx", a, vp), T, IR)
        o_pair = torch.einsum("bhij,bijhc->bihc", a, self.pair_value(z).view(B, L, L, H, c))
        feats = [o_scalar, o_points.reshape(B, L, -1), o_pair.reshape(B, L, -1),
                 o_points.norm(dim=-1).reshape(B, L, -1)]
        return self.fc_out(torch.cat(feats, dim=-1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ProteinConfig):
        super().__init__()
        # index 2 is the public layout's dropout (off at inference): ff.0 and ff.3 hold weights
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ffn), nn.GELU(), nn.Identity(),
                                nn.Linear(cfg.d_ffn, cfg.d_model))

    def forward(self, x):
        return self.ff(x)


class EncoderLayer(nn.Module):
    """Pre-LN: x + attn(LN x), then x + ffn(LN x)."""

    def __init__(self, cfg: ProteinConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = FrameAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(self, x, z, T, IR, key_bias):
        x = x + self.attn(self.norm1(x), z, T, IR, key_bias)
        return x + self.ffn(self.norm2(x))


def _mlp3(d: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 3))


class DiffusionHead(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc_t = _mlp3(d)     # translation noise, in the residue's frame
        self.fc_eps = _mlp3(d)   # rotation noise, axis-angle in the residue's frame


class Encoder(nn.Module):
    def __init__(self, cfg: ProteinConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))


class StructureModule(nn.Module):
    def __init__(self, cfg: ProteinConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.diff_head = DiffusionHead(cfg.d_model)


def padding_bias(padding: torch.Tensor | None, B: int, L: int, device, dtype) -> torch.Tensor:
    """(B, L) additive key bias: -inf on padded residues; a structure whose residues are all
    marked padded is treated as unpadded (as the public code does)."""
    bias = torch.zeros(B, L, device=device, dtype=dtype)
    if padding is None:
        return bias
    padding = padding.to(device=device, dtype=torch.bool).expand(B, L)
    padding = padding & ~padding.all(dim=1, keepdim=True)
    return bias.masked_fill(padding, float("-inf"))


class ProteinScoreModel(nn.Module):
    """Reference DiG protein score network (public layout and arithmetic)."""

    def __init__(self, cfg: ProteinConfig | None = None):
        super().__init__()
        cfg = cfg or ProteinConfig()
        self.cfg = cfg
        self.step_emb = StepEmbedding(cfg.d_model, cfg.max_period)
        self.x1d_proj = nn.Sequential(nn.LayerNorm(cfg.d_single_in), nn.Linear(cfg.d_single_in, cfg.d_model, bias=False))
        self.x2d_proj = nn.Sequential(nn.LayerNorm(cfg.d_pair_in), nn.Linear(cfg.d_pair_in, cfg.d_pair, bias=False))
        self.rp_proj = RelativePosition(cfg)
        self.st_module = StructureModule(cfg)

    def pair_features(self, pair: torch.Tensor) -> torch.Tensor:
        """z = x2d_proj(pair) + relative-position embedding, (B, L, L, d_pair)."""
        return self.x2d_proj(pair) + self.rp_proj(pair.shape[1])[None]

    def forward(self, T, IR, step, single, pair, padding=None):
        """Raw head outputs (T_eps, IR_eps), each (B, L, 3), as the public forward_step returns
        them: T_eps rotated to global axes by IR^T, IR_eps the body-frame axis-angle output.
        T (B, L, 3), IR (B, L, 3, 3), step (B,) int (0 = t = 1), single (B, L, 384),
        pair (B, L, L, 128), padding (B, L) bool, True = padded residue, or None."""
        B, L = single.shape[:2]
        x = self.x1d_proj(single) + self.step_emb(step)[:, None]
        z = self.pair_features(pair)
        key_bias = padding_bias(padding, B, L, x.device, x.dtype)
        for layer in self.st_module.encoder.layers:
            x = layer(x, z, T, IR, key_bias)
        head = self.st_module.diff_head
        T_eps = torch.einsum("blji,blj->bli", IR, head.fc_t(x))
        return T_eps, head.fc_eps(x)
