"""Training recipes of the shipped models, and the driver behind `digfast train`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from digfast.io import load_positions
from digfast.models import Graphormer3D, Graphormer3DConfig
from digfast.models.score_model import ScoreModel
from digfast.schedules import make_schedule
from digfast.systems import get_system
from digfast.training.dsm import TrainConfig, Trainer

RECIPES = {
    "dw4": dict(network=dict(layers=3, width=64, heads=4, ffn=128, gaussians=32),
                schedule={"name": "linear"}, default_steps=500,
                train=dict(steps=30_000, batch_size=512, lr=1e-3, warmup=500, ema_decay=0.9995, t_power=2.0,
                           tsm_sigma=0.1)),
    "lj13": dict(network=dict(layers=4, width=128, heads=8, ffn=256, gaussians=64),
                 schedule={"name": "linear"}, default_steps=500,
                 train=dict(steps=12_000, batch_size=128, lr=5e-4, warmup=500, ema_decay=0.999, t_power=3.0,
                            tsm_sigma=0.1)),
    # element types + bond-graph path bias; trained on the shipped reference's training split
    "alanine-dipeptide": dict(network=dict(layers=5, width=96, heads=8, ffn=192, gaussians=32, max_path=3),
                              schedule={"name": "linear"}, default_steps=200,
                              train=dict(steps=16_000, batch_size=128, lr=1e-3, warmup=500, ema_decay=0.999,
                                         t_power=1.5)),
}


# PIDP pre-training from the energy alone (training/pidp.py); the network is the system's recipe
PIDP_RECIPES = {
    "dw4": dict(candidates=4000, train=dict(steps=3000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.999,
                                            pidp_probes=0, val_every=250, val_batches=2)),
    "lj13": dict(candidates=4000, train=dict(steps=3000, batch_size=32, lr=1e-3, warmup=200, ema_decay=0.999,
                                             pidp_probes=2, val_every=250, val_batches=2)),
}


def load_structures(path, system) -> torch.Tensor:
    """(n, N, d) float32 from .npy ((n, N*d) or (n, N, d)) or .npz with `positions`."""
    arr = load_positions(path).to(torch.float32)
    if arr.numel() % (system.n_atoms * system.spatial_dim):
        raise ValueError(f"{Path(path).name}: {tuple(arr.shape)} does not hold whole {system.name} structures "
                         f"({system.n_atoms} x {system.spatial_dim})")
    return arr.reshape(-1, system.n_atoms, system.spatial_dim)


def training_forces(system, structures: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """-grad U / kT of every training structure, from the system's force function."""
    if not hasattr(system, "force"):
        raise ValueError(f"{system.name} has no force function: train without tsm_sigma")
    return torch.cat([system.force(part.double()).float() for part in structures.split(chunk)])


def _datasets(system, data, val):
    """(train, val, source name): files if given, else the system's shipped training split;
    without a validation file, the last 5% of the training file."""
    if data is None:
        if not hasattr(system, "training_split"):
            raise ValueError(f"{system.name} ships no training data: pass --data")
        train, shipped_val = system.training_split()
        val = shipped_val if val is None else load_structures(val, system)
        return train, val, f"{system.name} shipped training split"
    train = load_structures(data, system)
    if val is not None:
        return train, load_structures(val, system), Path(data).name
    cut = int(0.95 * len(train))
    return train[:cut], train[cut:], Path(data).name


def build_trainer(system_name: str, data, val=None, run_dir=None, steps: int | None = None, seed: int = 0,
                  resume: bool = False, overrides: dict | None = None, init=None, prior: dict | None = None,
                  network: dict | None = None) -> Trainer:
    """A Trainer for a recipe (data None: the system's shipped training split); resume reads run_dir;
    init (a model name or folder) starts from trained weights with a fresh optimiser and schedule;
    prior (e.g. {"name": "boltzmann", "width": 0.1}): the network learns the score's difference from
    the energy's (models/boltzmann_prior.py); network: sizes that replace the recipe's."""
    if system_name not in RECIPES:
        raise ValueError(f"no training recipe for {system_name!r}; known: {sorted(RECIPES)}")
    recipe, system = RECIPES[system_name], get_system(system_name)
    train, val, source = _datasets(system, data, val)
    settings = {**recipe["train"], **(overrides or {}), **({"steps": steps} if steps else {})}
    forces = training_forces(system, train) if settings.get("tsm_sigma", 0) > 0 else None
    if resume:
        return Trainer.resume(run_dir, train, val, forces=forces)
    torch.manual_seed(seed)
    if init is not None:
        return Trainer(_fine_tune_start(init, system, source, len(train), prior, network), train, val,
                       TrainConfig(seed=seed, **settings), out_dir=run_dir, forces=forces)
    net = _network(system, {**recipe["network"], **(network or {})}, prior)
    centred = train - train.mean(1, keepdim=True)
    model = ScoreModel(net, make_schedule(recipe["schedule"]), system, position_scale=float(centred.std()),
                       default_steps=recipe["default_steps"], info={"data": source, "n_train": len(train)},
                       prior=prior)
    return Trainer(model, train, val, TrainConfig(seed=seed, **settings), out_dir=run_dir, forces=forces)


def build_pidp_trainer(system_name: str, run_dir=None, steps: int | None = None, seed: int = 0,
                       resume: bool = False, overrides: dict | None = None, candidates: int | None = None,
                       network: dict | None = None, prior: dict | None = None, init=None):
    """(Trainer with objective 'pidp' on low-energy candidates, CandidateReport); no samples used.
    network: sizes that replace the recipe's (e.g. a smaller net for a quick run); init: go on
    from a PIDP-trained model (name or folder) with a fresh optimiser and schedule."""
    from digfast.training.candidates import low_energy_candidates

    if system_name not in PIDP_RECIPES:
        raise ValueError(f"no PIDP recipe for {system_name!r}; known: {sorted(PIDP_RECIPES)}")
    recipe, system = PIDP_RECIPES[system_name], get_system(system_name)
    n = int(candidates or recipe["candidates"])
    train, report = low_energy_candidates(system, n, seed=seed)
    val, _ = low_energy_candidates(system, max(64, n // 20), seed=seed + 10_000)
    forces = training_forces(system, train)
    settings = {**RECIPES[system_name]["train"], "tsm_sigma": 0.0, **recipe["train"], "objective": "pidp",
                **(overrides or {}), **({"steps": steps} if steps is not None else {})}
    if resume:
        return Trainer.resume(run_dir, train, val, forces=forces), report
    torch.manual_seed(seed)
    info = {"data": f"PIDP on {len(train)} low-energy candidates (no samples)", "candidates": vars(report)}
    if init is not None:
        model = _fine_tune_start(init, system, info["data"], len(train), prior, network)
        model.info["candidates"] = vars(report)
        return Trainer(model, train, val, TrainConfig(seed=seed, **settings), out_dir=run_dir, forces=forces), report
    net = _network(system, {**RECIPES[system_name]["network"], **(network or {})}, prior)
    centred = train - train.mean(1, keepdim=True)
    model = ScoreModel(net, make_schedule(RECIPES[system_name]["schedule"]), system,
                       position_scale=float(centred.std()), default_steps=RECIPES[system_name]["default_steps"],
                       info=info, prior=prior)
    return Trainer(model, train, val, TrainConfig(seed=seed, **settings), out_dir=run_dir, forces=forces), report


def _network(system, sizes: dict, prior) -> Graphormer3D:
    net = Graphormer3D(Graphormer3DConfig(n_atom_types=int(system.atom_types.max()) + 1, **sizes))
    if prior is not None:  # start at the prior's score: the network learns a correction
        torch.nn.init.zeros_(net.head_out.weight)
    return net


def _fine_tune_start(init, system, source: str, n_train: int, prior=None, network=None) -> ScoreModel:
    from digfast.api import load

    if prior is not None or network:
        raise ValueError("a fine-tune (init) keeps its model's network and prior: pass neither")

    model = load(init)
    if not isinstance(model, ScoreModel) or model.system.name != system.name:
        raise ValueError(f"--init {init!r} is not a trained {system.name} model")
    model.info = {"data": source, "n_train": n_train, "init": str(init),
                  "init_train_steps": model.info.get("train_steps"), "init_data": model.info.get("data")}
    return model.train()


def train_and_save(trainer: Trainer, out: str | Path, progress: bool = True) -> Path:
    history = trainer.fit(progress=progress)
    folder = trainer.ema_model().save(out)
    (Path(folder) / "history.json").write_text(json.dumps(history, indent=1))
    return folder
