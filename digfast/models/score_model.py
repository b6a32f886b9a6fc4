"""A trained score model: network + schedule + system, saved as safetensors + JSON.

The network predicts the noise eps of x_t = alpha x_0 + sigma eps in normalised
coordinates x / position_scale; score(x, t) = -eps / sigma works in those coordinates and
digfast.sample_batch / log_likelihood convert to and from the system's units. With
prior {"name": "boltzmann", "width": w} the network predicts only the difference from a
score built from the system's energy (models/boltzmann_prior.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from digfast.io import InputError
from digfast.models.boltzmann_prior import base_noise
from digfast.models.graphormer3d import Graphormer3D, Graphormer3DConfig
from digfast.ops.sampler_step import remove_com
from digfast.systems.graph import shortest_paths
from digfast.schedules import make_schedule

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ScoreModel(nn.Module):
    def __init__(self, net: Graphormer3D, schedule, system, position_scale: float = 1.0,
                 default_steps: int = 500, info: dict | None = None, prior: dict | None = None):
        super().__init__()
        self.net, self.schedule, self.system = net, schedule, system
        self.prior = _check_prior(prior, system)
        self.position_scale = float(position_scale)
        self.default_steps = int(default_steps)
        self.info = dict(info or {})
        self.register_buffer("atom_types", torch.as_tensor(system.atom_types, dtype=torch.long), persistent=False)
        paths = None
        if net.cfg.max_path > 0:
            if getattr(system, "bonds", None) is None:
                raise ValueError(f"network uses bond-graph paths but system {system.name!r} has no bonds")
            paths = shortest_paths(system.n_atoms, system.bonds)
        self.register_buffer("paths", paths, persistent=False)

    def predict_noise(self, x, t, mask=None):
        return self.noise_of(self.net, x, t, mask)

    def noise_of(self, net, x, t, mask=None):
        """eps(x, t) with `net` (the model's own, or e.g. its EMA copy in training) as the network."""
        dtype = net.embed.weight.dtype  # the likelihood may integrate in float64
        paths = None if self.paths is None else self.paths.to(x.device)
        eps = net(x.to(dtype), t, self.atom_types.to(x.device), mask, paths).to(x.dtype)
        if self.prior is None:
            return eps
        if mask is not None:
            raise NotImplementedError("padded batches with a Boltzmann prior")
        base = base_noise(self.system, self.schedule, self.position_scale, self.prior["width"], x, t, self.prior["cap"])
        onset = self.prior["onset"]
        if onset > 0:  # the network's share of the score, -eps sigma / (sigma^2 + onset^2), vanishes at t = 0
            sigma2 = self.schedule.sigma(t.double()).pow(2)
            eps = eps * (sigma2 / (sigma2 + onset**2)).to(x.dtype)[:, None, None]
        return eps + base

    def score(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None, net=None) -> torch.Tensor:
        """grad log p_t(x) in normalised coordinates, differentiable in x and t (PIDP trains
        through d/dt); net: another network in the model's place (e.g. its EMA copy)."""
        sigma = self.schedule.sigma(t.double()).to(x.dtype)
        eps = self.noise_of(self.net if net is None else net, x, t, mask)
        return -remove_com(eps, mask) / sigma[:, None, None]

    def config(self) -> dict:
        return {"format": "digfast-score-model/1", "architecture": "graphormer3d",
                "network": self.net.cfg.to_dict(), "schedule": self.schedule.config(),
                "system": self.system.name, "position_scale": self.position_scale,
                "default_steps": self.default_steps, "info": self.info,
                **({"prior": self.prior} if self.prior is not None else {})}

    def save(self, folder) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                  str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1))
        return folder

    @classmethod
    def from_config(cls, config: dict, system=None) -> "ScoreModel":
        from digfast.systems import get_system

        if config.get("architecture") != "graphormer3d":
            raise InputError(f"unknown architecture {config.get('architecture')!r}")
        try:
            net = Graphormer3D(Graphormer3DConfig(**config["network"]))
            system = system if system is not None else get_system(config["system"])
            scale = float(config.get("position_scale", 1.0))
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"position_scale must be finite and > 0, got {scale}")
            return cls(net, make_schedule(config["schedule"]), system, scale, int(config.get("default_steps", 500)),
                       config.get("info"), config.get("prior"))
        except (TypeError, ValueError, KeyError) as err:
            raise InputError(f"bad model config: {type(err).__name__}: {err}") from err

    @classmethod
    def load(cls, folder) -> "ScoreModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} not found: a model folder holds {CONFIG_FILE} "
                                        f"and {WEIGHTS_FILE}")
        model = cls.from_config(_read_config(folder / CONFIG_FILE))
        try:
            weights = load_file(str(folder / WEIGHTS_FILE))
        except Exception as err:  # safetensors raises its own SafetensorError for truncated/garbled files
            raise InputError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({err})") from err
        try:
            model.net.load_state_dict(weights)
        except RuntimeError as err:  # missing, unexpected or wrongly shaped tensors
            raise InputError(f"{folder / WEIGHTS_FILE} does not fit {CONFIG_FILE}: {err}") from err
        broken = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise InputError(f"{folder / WEIGHTS_FILE}: NaN/inf in {broken[:3]}")
        return model.eval()


def _check_prior(prior, system) -> dict | None:
    """The validated prior spec: None or {"name": "boltzmann", "width": w > 0, "cap": c > 0,
    "onset": o >= 0} (o > 0: the network's share is scaled by sigma^2 / (sigma^2 + o^2), so the
    score at t = 0 is the Boltzmann one whatever the weights)."""
    if prior is None:
        return None
    if not isinstance(prior, dict) or prior.get("name") != "boltzmann":
        raise ValueError(f"prior must be None or {{'name': 'boltzmann', 'width': w}}, got {prior!r}")
    width, cap, onset = (float(prior.get(k, v)) for k, v in (("width", 0.1), ("cap", 100.0), ("onset", 0.0)))
    if not all(math.isfinite(v) and v > 0 for v in (width, cap)) or not (math.isfinite(onset) and onset >= 0):
        raise ValueError(f"prior width and cap must be finite and > 0, onset >= 0; got {width}, {cap}, {onset}")
    if not getattr(system, "torch_energy", True):
        raise ValueError(f"a Boltzmann prior needs an energy written in torch (differentiable); "
                         f"{system.name}'s is not")
    return {"name": "boltzmann", "width": width, "cap": cap, "onset": onset}


def _read_config(path: Path) -> dict:
    """config.json as a dict with the keys from_config needs, or InputError naming the problem."""
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise InputError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    missing = [k for k in ("architecture", "network", "schedule", "system") if k not in config]
    if missing:
        raise InputError(f"{path}: missing {missing}")
    if not isinstance(config["network"], dict) or not isinstance(config["schedule"], dict):
        raise InputError(f"{path}: 'network' and 'schedule' must be JSON objects")
    return config
