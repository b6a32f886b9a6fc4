"""Fast path of the DiG protein score model: what never changes during sampling is computed
once per protein, and many samples of that protein run in one call.

Per protein (ProteinContext, from the reference model's weights):
- z = x2d_proj(pair) + relative-position embedding, (L, L, d_pair): shared, never copied
  per sample;
- every layer's pair bias (1/sqrt 3) W_b z, (layers, H, L, L);
- the single features x1d_proj(single), (L, d); the step embedding is added per step, so
  layer 0's input is the same for every structure of a batch and is projected once.
Per step, for a batch of B structures of the protein:
- the pair-value output uses the exact rewrite
      sum_j a_hij (W_v z_ij)_h = W_v,h (sum_j a_hij z_ij)
  so Linear(d_pair -> d_model) is applied to L (not L^2) vectors per head and sample;
- the attention core (scalar + point + pair-bias logits, softmax, scalar / point / pair
  sums) is one op, digfast.ops.ipa_attention (pure-torch reference on the CPU, a fused
  Triton kernel on a GPU).
Precision: fp32 by default (parity with the reference); a bf16 context keeps z and the
biases in bf16 and runs the linears in bf16 with fp32 frames and softmax statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from digfast.models.protein.features import step_embedding
from digfast.models.protein.model import PAIR_SCALE, ProteinScoreModel, global_points, local_points
from digfast.ops.ipa_attention import ipa_attention


@dataclass
class ProteinContext:
    """Step-invariant tensors of one protein (see module docstring)."""
    x1d: torch.Tensor          # (L, d)
    z: torch.Tensor            # (L, L, d_pair)
    pair_bias: torch.Tensor    # (layers, H, L, L), already scaled by 1/sqrt(3)
    L: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x1d, self.z, self.pair_bias))


class FastProteinModel:
    """Batched evaluation of a ProteinScoreModel's outputs for many structures of one
    protein. Same results as the reference up to float rounding."""

    def __init__(self, model: ProteinScoreModel, dtype=torch.float32, backend=None):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"fast path dtype must be float32, bfloat16 or float16, got {dtype} "
                             "(float64: use the reference ProteinScoreModel)")
        if next(model.parameters()).dtype != torch.float32:
            raise ValueError("the fast path is built from a float32 ProteinScoreModel")
        self.model = model.eval()
        self.cfg = model.cfg
        self.dtype = dtype
        self.backend = backend
        layers = model.st_module.encoder.layers
        c, H = self.cfg.head_dim, self.cfg.n_heads
        with torch.no_grad():
            cast = lambda t: t.detach().to(dtype)  # noqa: E731
            # fused projections per layer: scalar q, k, v and point q, k, v in one matmul
            self.w_in = [cast(torch.cat([l.attn.scalar_query.weight / math.sqrt(3 * c), l.attn.scalar_key.weight,
                                         l.attn.scalar_value.weight, l.attn.point_query.weight,
                                         l.attn.point_key.weight, l.attn.point_value.weight]))
                         for l in layers]
            # pair_value weight per head: (H, c, d_pair)
            self.w_pv = [cast(l.attn.pair_value.weight.view(H, c, -1)) for l in layers]
            self.point_w = [l.attn.point_weight().detach().float() for l in layers]
            self.w_out = [(cast(l.attn.fc_out.weight), cast(l.attn.fc_out.bias)) for l in layers]
            self.w_ffn = [(cast(l.ffn.ff[0].weight), cast(l.ffn.ff[0].bias), cast(l.ffn.ff[3].weight),
                           cast(l.ffn.ff[3].bias)) for l in layers]

    def context(self, single: torch.Tensor, pair: torch.Tensor) -> ProteinContext:
        """Precompute the step-invariant tensors of one protein: single (L, 384), pair (L, L, 128)."""
        m = self.model
        with torch.no_grad():
            w = m.x1d_proj[1].weight
            single, pair = single.to(w.device, w.dtype), pair.to(w.device, w.dtype)
            x1d = m.x1d_proj(single)
            z = m.pair_features(pair[None])[0]
            bias = torch.stack([PAIR_SCALE * F.linear(z, l.attn.pair_bias.weight).permute(2, 0, 1)
                                for l in m.st_module.encoder.layers])
        return ProteinContext(x1d=x1d.float(), z=z.to(self.dtype).contiguous(),
                              pair_bias=bias.to(self.dtype).contiguous(), L=single.shape[0])

    def __call__(self, ctx: ProteinContext, T: torch.Tensor, IR: torch.Tensor, step: int, padding=None):
        """Raw outputs (T_eps, IR_eps), each (B, L, 3), for frames T (B, L, 3), IR (B, L, 3, 3)
        of the context's protein at one step index (shared by the batch)."""
        with torch.no_grad():
            return self.forward_embedded(ctx, T, IR, self.step_embeddings([step], T.device)[0], padding)

    def step_embeddings(self, steps, device) -> torch.Tensor:
        """(len(steps), d_model) float32 embeddings of step indices (a table for a whole run)."""
        return step_embedding(torch.as_tensor(steps, device=device), self.cfg.d_model, self.cfg.max_period)

    def forward_embedded(self, ctx, T, IR, emb, padding=None):
        """As __call__, with the step given by its embedding emb (d_model,) (a tensor, so that
        a captured CUDA graph can be replayed for every step with new contents)."""
        cfg, m = self.cfg, self.model
        B, L = T.shape[:2]
        H, c, Pq, Pv = cfg.n_heads, cfg.head_dim, cfg.qk_points, cfg.v_points
        d = cfg.d_model
        x = (ctx.x1d + emb).expand(B, L, d).float()
        Tf, IRf = T.float(), IR.float()
        key_mask = None
        if padding is not None:
            padding = padding.to(T.device).bool().expand(B, L)
            key_mask = ~(padding & ~padding.all(dim=1, keepdim=True))
        sizes = [d, d, d, H * Pq * 3, H * Pq * 3, H * Pv * 3]
        for li, layer in enumerate(m.st_module.encoder.layers):
            if li == 0:  # layer 0's input is the same for every structure: project it once
                h = F.layer_norm(x[:1], (d,), layer.norm1.weight, layer.norm1.bias).to(self.dtype)
                proj = (h @ self.w_in[li].T).expand(B, L, -1)
            else:
                h = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias).to(self.dtype)
                proj = h @ self.w_in[li].T
            q, k, v, qp, kp, vp = proj.split(sizes, dim=-1)
            qp = global_points(qp.float().view(B, L, H, Pq, 3), Tf, IRf)
            kp = global_points(kp.float().view(B, L, H, Pq, 3), Tf, IRf)
            vp = global_points(vp.float().view(B, L, H, Pv, 3), Tf, IRf)
            o_s, o_p, o_z = ipa_attention(
                q.view(B, L, H, c).transpose(1, 2), k.view(B, L, H, c).transpose(1, 2),
                v.view(B, L, H, c).transpose(1, 2), qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                self.point_w[li], ctx.pair_bias[li], ctx.z, key_mask, backend=self.backend)
            # o_s (B, H, L, c), o_p (B, H, L, Pv, 3) global, o_z (B, H, L, d_pair)
            o_p = local_points(o_p.transpose(1, 2), Tf, IRf)                       # (B, L, H, Pv, 3)
            o_pair = torch.einsum("bhld,hcd->blhc", o_z.to(self.dtype), self.w_pv[li])
            feats = torch.cat([o_s.transpose(1, 2).reshape(B, L, d).to(self.dtype),
                               o_p.reshape(B, L, -1).to(self.dtype), o_pair.reshape(B, L, d),
                               o_p.norm(dim=-1).reshape(B, L, -1).to(self.dtype)], dim=-1)
            x = x + F.linear(feats, *self.w_out[li]).float()
            h2 = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias).to(self.dtype)
            w0, b0, w3, b3 = self.w_ffn[li]
            x = x + F.linear(F.gelu(F.linear(h2, w0, b0)), w3, b3).float()
        head = m.st_module.diff_head
        t_local = head.fc_t(x)
        return torch.einsum("blji,blj->bli", IRf, t_local), head.fc_eps(x)
