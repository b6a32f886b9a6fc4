"""A time-conditioned property predictor trained on noised structures, for guidance.

It learns q_t(c | x_t) ≈ N(mean(x_t, t), std(x_t, t)^2) of a property c = f(x_0) from the
structures alone: x_t = alpha x_0 + sigma eps (the score model's schedule and coordinates),
Gaussian negative log-likelihood. So guidance needs no conditional data set and no denoising:
Guidance(model, target=c, kind="gaussian") with the predicted std. Input features are the
pair distances (invariant to rotations and translations) and a Fourier embedding of t.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from digfast.guidance import parse_property
from digfast.ops.sampler_step import remove_com
from digfast.schedules import make_schedule


class NoisyPropertyModel(nn.Module):
    def __init__(self, n_atoms: int, prop: str, schedule, position_scale: float, width: int = 128,
                 n_freq: int = 8, c_mean: float = 0.0, c_std: float = 1.0):
        super().__init__()
        self.n_atoms, self.prop, self.schedule = n_atoms, prop, schedule
        self.position_scale, self.width, self.n_freq = float(position_scale), width, n_freq
        self.register_buffer("c_stats", torch.tensor([c_mean, c_std], dtype=torch.float32))
        n_pairs = n_atoms * (n_atoms - 1) // 2
        self.net = nn.Sequential(nn.Linear(n_pairs + 2 * n_freq, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def _features(self, x, t):
        i, j = torch.triu_indices(self.n_atoms, self.n_atoms, 1, device=x.device)
        d = ((x[:, i] - x[:, j]).pow(2).sum(-1) + 1e-12).sqrt() / self.position_scale
        freq = (2.0 ** torch.arange(self.n_freq, device=x.device, dtype=x.dtype)) * math.pi
        tt = t.to(x.dtype)[:, None] * freq
        return torch.cat([d, torch.sin(tt), torch.cos(tt)], -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        """(mean, std) of the property given noised positions x (system units) at times t."""
        out = self.net(self._features(x.float(), t.float()))
        mean = self.c_stats[0] + self.c_stats[1] * out[:, 0]
        std = self.c_stats[1] * (nn.functional.softplus(out[:, 1]) + 1e-3)
        return mean.to(x.dtype), std.to(x.dtype)

    def config(self) -> dict:
        return {"format": "digfast-property-model/1", "n_atoms": self.n_atoms, "property": self.prop,
                "schedule": self.schedule.config(), "position_scale": self.position_scale, "width": self.width,
                "n_freq": self.n_freq, "c_mean": float(self.c_stats[0]), "c_std": float(self.c_stats[1])}

    def save(self, folder) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "property.safetensors"))
        (folder / "property.json").write_text(json.dumps(self.config(), indent=1))
        return folder

    @classmethod
    def load(cls, folder) -> "NoisyPropertyModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "property.json").exists():
            raise FileNotFoundError(f"{folder / 'property.json'} not found (made by digfast train-property)")
        c = json.loads((folder / "property.json").read_text())
        model = cls(c["n_atoms"], c["property"], make_schedule(c["schedule"]), c["position_scale"], c["width"],
                    c["n_freq"], c["c_mean"], c["c_std"])
        model.load_state_dict(load_file(str(folder / "property.safetensors")))
        return model.eval()


def train_property_model(score_model, prop: str, data: torch.Tensor, *, steps: int = 3000, batch_size: int = 256,
                         lr: float = 2e-3, seed: int = 0, t_min: float = 1e-3, log_every: int = 500,
                         progress=print) -> NoisyPropertyModel:
    """Fit q_t(c | x_t) for c = prop(x_0) on structures data (n, N, d), system units, with the
    schedule and coordinate scale of score_model (the model the guidance will steer)."""
    f = parse_property(prop)
    data = remove_com(data.float())
    c = f(data.double(), None).float()
    scale = float(getattr(score_model, "position_scale", 1.0))
    sched = score_model.schedule
    model = NoisyPropertyModel(data.shape[1], prop, sched, scale, c_mean=float(c.mean()), c_std=float(c.std()))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lr_at = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        t = t_min + (sched.t_max - t_min) * torch.rand(batch_size, generator=g, dtype=torch.float64)
        alpha, sigma = sched.alpha(t).float()[:, None, None], sched.sigma(t).float()[:, None, None]
        eps = remove_com(torch.randn(batch_size, *data.shape[1:], generator=g))
        xt = scale * (alpha * data[idx] / scale + sigma * eps)
        mean, std = model(xt, t.float())
        loss = (0.5 * ((c[idx] - mean) / std) ** 2 + torch.log(std)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_at.step()
        if progress and (step % log_every == 0 or step == steps):
            progress(f"step {step}/{steps}  nll {loss.item():.4f}")
    return model.eval()
