"""Denoising score matching on structures (DESIGN.md §1).

    L = E_{t, x_0, eps} | eps_theta(alpha_t x_0 + sigma_t eps, t) - eps |^2,   eps in the zero-CoM subspace

(= |sigma_t s_theta + eps|^2 with s = -eps_theta / sigma). AdamW, EMA of the weights,
gradient-norm clipping, t = t_min + (t_max - t_min) u^p with antithetic u (p > 1 favours small t),
periodic validation loss on held-out structures, checkpoints (safetensors + JSON) that resume
bit for bit: weights, EMA, optimiser moments, the data/noise generator and the step.

Forces (target score matching): where the training structures come with their Boltzmann
forces F = -grad U / kT (an MD/MCMC set with a known energy), the score of p_t also equals
E[grad log p_0(x_0) | x_t] / alpha_t, so eps_F = -(sigma_t / alpha_t) F(x_0) (normalised
units) is a second unbiased regression target for eps_theta. At small t it is nearly
deterministic, where eps is pure noise with the signal O(sigma) beneath it; the loss uses
w eps_F + (1 - w) eps with w = 1 / (1 + (sigma_t / (alpha_t tsm_sigma))^2): still unbiased at
every t, and the fine structure that decides energies is learnt from forces, not from noise.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from digfast.arguments import check_device
from digfast.models.score_model import ScoreModel
from digfast.ops.sampler_step import remove_com

CHECKPOINT_TENSORS, CHECKPOINT_STATE = "checkpoint.safetensors", "checkpoint.json"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf."""


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 500
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    t_min: float = 1e-3
    t_power: float = 1.0  # t = t_min + (t_max - t_min) u^p: p > 1 trains small t (fine detail) more
    seed: int = 0
    val_every: int = 500
    val_batches: int = 4
    checkpoint_every: int = 1000
    augment_rotations: bool = True
    tsm_sigma: float = 0.0  # > 0 (with forces): noise level sigma/alpha below which forces set the target
    objective: str = "dsm"  # "pidp": Fokker-Planck residual + force match on candidates (training/pidp.py)
    pidp_force_weight: float = 1.0  # lambda_1 of the force term at t_min
    pidp_probes: int = 0  # divergence: 0 = exact over the subspace basis, k > 0 = k Rademacher probes
    pidp_floor: float = 0.1  # finest length scale (normalised units) in the residual's weight
    pidp_prior_weight: float = 1.0  # anchor at t_max: the prior's score
    pidp_residual_weight: float = 1.0  # the Fokker-Planck residual's weight (0: leave it out)
    pidp_mc_weight: float = 0.0  # > 0: also match the energy-only Monte-Carlo score (pidp.monte_carlo_score)
    pidp_mc_samples: int = 256  # its proposals per point (antithetic pairs: twice as many energies)
    extra: dict = field(default_factory=dict)


def random_rotations(b: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(b, dim, dim) orthogonal matrices, Haar-distributed (QR with sign fix)."""
    q, r = torch.linalg.qr(torch.randn(b, dim, dim, generator=generator))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


class Trainer:
    def __init__(self, model: ScoreModel, train: torch.Tensor, val: torch.Tensor | None, config: TrainConfig,
                 out_dir: str | Path | None = None, weights: torch.Tensor | None = None,
                 forces: torch.Tensor | None = None):
        """weights: optional (n,) non-negative per-structure weights of the training set (e.g.
        reweighting from a biased simulation); batches are then drawn in proportion to them.
        forces: optional (n, N, d) -grad U / kT of the training structures in the system's
        units; used when config.tsm_sigma > 0 (see the module docstring)."""
        if train.dim() != 3 or train.shape[1:] != (model.system.n_atoms, model.system.spatial_dim):
            raise ValueError(f"training data must be (n, {model.system.n_atoms}, {model.system.spatial_dim}), "
                             f"got {tuple(train.shape)}")
        for name, data in (("training", train), ("validation", val)):
            if data is not None and not torch.isfinite(data).all():
                raise ValueError(f"{name} data contain NaN or inf")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            if weights.shape != (train.shape[0],) or not torch.isfinite(weights).all() or (weights < 0).any() \
                    or weights.sum() <= 0:
                raise ValueError(f"weights must be ({train.shape[0]},), finite, non-negative, not all zero")
        if config.objective not in ("dsm", "pidp"):
            raise ValueError(f"unknown objective {config.objective!r}: 'dsm' or 'pidp'")
        if not config.t_power > 0:
            raise ValueError(f"t_power must be > 0, got {config.t_power}")
        if (forces is None) != (config.tsm_sigma <= 0 and config.objective == "dsm"):
            raise ValueError("tsm_sigma > 0 and PIDP need forces, and forces need one of them")
        if forces is not None and (forces.shape != train.shape or not torch.isfinite(forces).all()):
            raise ValueError(f"forces must be finite and shaped like the training data {tuple(train.shape)}")
        self.weights = weights
        self.model, self.cfg = model, config
        scale = model.position_scale
        # grad in x / scale = scale * grad in x
        self.forces = None if forces is None else remove_com(forces.float()) * scale
        self.train = remove_com(train.float()) / scale
        self.val = None if val is None else remove_com(val.float()) / scale
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if config.objective == "pidp":  # third-order autograd: the Triton backwards are once-differentiable
            model.net.backend = "reference"
        self.ema = copy.deepcopy(model.net).requires_grad_(False)
        self.opt = torch.optim.AdamW(model.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.device = torch.device("cpu")
        self.step = 0
        self.history: list[dict] = []

    def to(self, device) -> "Trainer":
        """Train on device (e.g. "cuda"): the network, its EMA copy and the optimiser state move
        there. Batches are still drawn on the CPU from the trainer's generator, so a run draws the
        same data, times and noise on every device."""
        device = check_device(device)
        self.model.net.to(device)
        self.ema.to(device)
        for state in self.opt.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":  # Adam keeps its step count on the CPU
                    state[key] = value.to(device)
        if device.type == "cuda" and self.model.net.backend is None and not os.environ.get("DIGFAST_BACKEND"):
            # training through the Triton kernels ran at 0.11x eager on an H200 (bench/RESULTS.md,
            # 2026-11-28): the eager ops until a GPU run shows the kernels ahead
            self.model.net.backend = self.ema.backend = "reference"
        self.device = device
        return self

    # -- one step -------------------------------------------------------------------
    def _times(self, b):
        half = torch.rand((b + 1) // 2, generator=self.gen)
        u = torch.cat([half, 1.0 - half])[:b]  # antithetic
        sched = self.model.schedule
        return (self.cfg.t_min + u ** self.cfg.t_power * (sched.t_max - self.cfg.t_min)).float()

    def _target(self, eps, f0, alpha, sigma):
        if f0 is None:
            return eps
        noise = sigma / alpha
        w = 1.0 / (1.0 + (noise / self.cfg.tsm_sigma) ** 2)
        return w * (-noise * f0) + (1.0 - w) * eps

    def _loss(self, net, x0, t, eps, f0=None):
        if self.cfg.objective == "pidp":
            from digfast.training.pidp import pidp_loss

            return pidp_loss(self.model, net, x0, t, eps, f0, self.cfg, self.gen)
        sched = self.model.schedule
        tt = t.double()
        alpha, sigma = sched.alpha(tt).float()[:, None, None], sched.sigma(tt).float()[:, None, None]
        xt = alpha * x0 + sigma * eps
        pred = remove_com(self.model.noise_of(net, xt, t))
        return (pred - self._target(eps, f0, alpha, sigma)).pow(2).sum((1, 2)).mean() / self.model.system.dof

    def _batch(self, data, weights=None, forces=None):
        if weights is None:
            idx = torch.randint(0, data.shape[0], (self.cfg.batch_size,), generator=self.gen)
        else:
            idx = torch.multinomial(weights, self.cfg.batch_size, replacement=True, generator=self.gen)
        x0 = data[idx]
        f0 = None if forces is None else forces[idx]
        if self.cfg.augment_rotations:
            rot = random_rotations(x0.shape[0], x0.shape[2], self.gen)
            x0 = x0 @ rot
            f0 = None if f0 is None else f0 @ rot  # forces rotate with the structure
        eps = remove_com(torch.randn(x0.shape, generator=self.gen))
        t, dev = self._times(x0.shape[0]), self.device
        return x0.to(dev), t.to(dev), eps.to(dev), None if f0 is None else f0.to(dev)

    def _lr(self):
        if self.step < self.cfg.warmup:
            return self.cfg.lr * (self.step + 1) / self.cfg.warmup
        frac = (self.step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return self.cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))  # cosine decay

    def train_step(self) -> float:
        net = self.model.net.train()
        x0, t, eps, f0 = self._batch(self.train, self.weights, self.forces)
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        loss = self._loss(net, x0, t, eps, f0)
        if not torch.isfinite(loss):  # stop before the weights (and the next checkpoint) are spoiled
            raise TrainingDiverged(f"{self.cfg.objective} loss is {float(loss)} at step {self.step + 1}: "
                                   f"stopped before the update, so the weights and any checkpoint are "
                                   f"those of earlier steps; try a lower --lr or a different --seed")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), net.parameters()):
                pe.lerp_(p, 1.0 - self.cfg.ema_decay)
        self.step += 1
        return float(loss.detach())

    def validate(self) -> float:
        """EMA loss on fixed validation batches (own generator: training stays reproducible):
        the plain DSM target, or for PIDP the Fokker-Planck residual (no forces for these)."""
        if self.val is None:
            return float("nan")
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        saved, self.gen = self.gen, g
        # PIDP differentiates in x, so only the DSM loss runs without a graph
        grad_mode = torch.enable_grad() if self.cfg.objective == "pidp" else torch.no_grad()
        try:
            with grad_mode:
                losses = [float(self._loss(self.ema.eval(), *self._batch(self.val)).detach())
                          for _ in range(self.cfg.val_batches)]
        finally:
            self.gen = saved
        return sum(losses) / len(losses)

    # -- loop -------------------------------------------------------------------------
    def fit(self, progress: bool = True, until: int | None = None, deadline: float | None = None) -> list[dict]:
        """Train to cfg.steps, or stop early at step `until` (e.g. to test resumption) or once
        time.monotonic() passes `deadline` (a wall-clock budget; a checkpoint is then saved, so
        the run can be resumed)."""
        from tqdm.auto import tqdm

        stop = self.cfg.steps if until is None else min(until, self.cfg.steps)
        bar = tqdm(total=stop, initial=self.step, desc="train", unit="step", disable=not progress,
                   mininterval=1.0)
        start, start_step, running = time.perf_counter(), self.step, None
        while self.step < stop:
            if deadline is not None and time.monotonic() >= deadline:
                if self.out_dir is not None and self.step > start_step:
                    self.save_checkpoint(self.out_dir)
                break
            loss = self.train_step()
            running = loss if running is None else 0.98 * running + 0.02 * loss
            bar.update()
            if self.step % self.cfg.val_every == 0 or self.step == self.cfg.steps:
                rate = (self.step - start_step) / (time.perf_counter() - start)
                row = {"step": self.step, "loss": running, "val_loss": self.validate(), "steps_per_s": rate,
                       "lr": self._lr()}
                self.history.append(row)
                bar.set_postfix(loss=f"{running:.4f}", val=f"{row['val_loss']:.4f}", refresh=False)
            if self.out_dir is not None and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps):
                self.save_checkpoint(self.out_dir)
        bar.close()
        return self.history

    def ema_model(self) -> ScoreModel:
        """The EMA weights behind the model interface (what gets shipped)."""
        m = copy.deepcopy(self.model)
        m.net.load_state_dict(self.ema.state_dict())
        m.net.to("cpu").backend = None  # a model comes back on the CPU, each op free to pick its backend
        m.info.update({"train_steps": self.step, "train_config": asdict(self.cfg)})
        return m.eval()

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, folder) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v for k, v in self.model.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors["generator"] = self.gen.get_state()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / CHECKPOINT_TENSORS))
        state = {"step": self.step, "config": asdict(self.cfg), "model": self.model.config(),
                 "param_groups": opt["param_groups"], "history": self.history}
        (folder / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
        self.ema_model().save(folder / "ema_model")
        return folder

    @classmethod
    def resume(cls, folder, train, val, out_dir=None, weights=None, forces=None) -> "Trainer":
        from safetensors.torch import load_file

        from digfast.io import InputError

        folder = Path(folder)
        if not (folder / CHECKPOINT_STATE).exists():
            raise FileNotFoundError(f"no checkpoint in {folder} ({CHECKPOINT_STATE} missing)")
        from safetensors import SafetensorError

        try:
            state = json.loads((folder / CHECKPOINT_STATE).read_text())
            tensors = load_file(str(folder / CHECKPOINT_TENSORS))
        except (OSError, ValueError, SafetensorError) as err:  # truncated, not JSON, not safetensors
            raise InputError(f"checkpoint in {folder} is unreadable: {type(err).__name__}: {err}") from err
        try:
            model = ScoreModel.from_config(state["model"])
            cfg = TrainConfig(**state["config"])
            trainer = cls(model, train, val, cfg, out_dir if out_dir is not None else folder, weights, forces)
            model.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            trainer.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            opt_state: dict = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, i, name = k.split(".", 2)
                    opt_state.setdefault(int(i), {})[name] = v
            trainer.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
            trainer.gen.set_state(tensors["generator"])
            trainer.step, trainer.history = state["step"], state["history"]
        except (KeyError, TypeError, RuntimeError) as err:  # missing entries, shapes that do not fit
            raise InputError(f"checkpoint in {folder} does not fit its own config or this data: "
                             f"{type(err).__name__}: {err}") from err
        return trainer
