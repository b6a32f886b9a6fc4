"""The deterministic protein sampler step captured in one CUDA graph (fast path, GPU).

One sampler step = the fast network on a batch + the frame update. Everything that changes
from step to step (the step embedding, the two update coefficients) lives in device buffers
that are overwritten before each replay, so one capture serves all steps; the per-step host
work is two small copies and a replay. Deterministic samplers only ("public", "ode": their
update is tr += c_tr T_eps, R <- exp(c_rot IR_eps) R); "sde" and "dpm2m" run eagerly.
"""
from __future__ import annotations

import torch

from digfast.protein import so3
from digfast.protein.sampler import ProteinSchedule, plan

GRAPH_SAMPLERS = {"public": 1.0, "ode": 0.5}


def step_coefficients(schedule: ProteinSchedule, steps: int, sampler: str) -> torch.Tensor:
    """(steps, 2) float64: c_tr = f g_tr^2 dt / sigma_tr, c_rot = f g_r^2 dt E(sigma_r), f = 1
    (public) or 1/2 (probability-flow ODE)."""
    f = GRAPH_SAMPLERS[sampler]
    p = plan(schedule, steps)
    return torch.tensor([[f * g * dt / s, f * gr * dt * e] for g, dt, s, gr, e in
                         zip(p.g2_tr, p.dt, p.sigma_tr, p.g2_rot, p.score_norm)], dtype=torch.float64)


class GraphedSampler:
    """Capture once for a batch size, then run(tr, rot) integrates all steps by replays."""

    def __init__(self, fast, ctx, batch: int, *, sampler: str = "public", steps: int = 500,
                 schedule: ProteinSchedule = ProteinSchedule(), device="cuda"):
        if sampler not in GRAPH_SAMPLERS:
            raise ValueError(f"CUDA graphs serve the deterministic samplers {sorted(GRAPH_SAMPLERS)}, not {sampler!r}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.fast, self.ctx = fast, ctx
        p = plan(schedule, steps)
        self.emb = fast.step_embeddings(p.index, device)                       # (steps, d)
        self.coef = step_coefficients(schedule, steps, sampler).to(device)     # (steps, 2)
        L = ctx.L
        self.tr = torch.zeros(batch, L, 3, dtype=torch.float64, device=device)
        self.rot = torch.eye(3, dtype=torch.float64, device=device).expand(batch, L, 3, 3).contiguous()
        self.emb_now = self.emb[0].clone()
        self.coef_now = self.coef[0].clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up: allocations, Triton compilation, cuBLAS handles
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._step()

    def _step(self):
        T_eps, IR_eps = self.fast.forward_embedded(self.ctx, self.tr, self.rot, self.emb_now)
        self.tr.add_(self.coef_now[0] * T_eps.double())
        self.rot.copy_(so3.expmap(self.coef_now[1] * IR_eps.double()) @ self.rot)

    def load(self, tr: torch.Tensor, rot: torch.Tensor) -> None:
        self.tr.copy_(tr)
        self.rot.copy_(rot)

    def step(self, k: int) -> None:
        """Advance the loaded frames by step k of the plan (one replay)."""
        self.emb_now.copy_(self.emb[k])
        self.coef_now.copy_(self.coef[k])
        self.graph.replay()

    def run(self, tr: torch.Tensor, rot: torch.Tensor, on_step=None):
        """Frames (batch, L, 3) + (batch, L, 3, 3) after all steps (float64)."""
        self.load(tr, rot)
        for k in range(len(self.coef)):
            self.step(k)
            if on_step is not None:
                on_step()
        return self.tr.clone(), self.rot.clone()
