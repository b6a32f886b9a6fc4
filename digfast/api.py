"""The public entry points: load, sample_batch, log_likelihood."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from digfast import likelihood as _lik
from digfast import samplers as _samplers
from digfast.results import SampleResult
from digfast.schedules import LinearVP

log = logging.getLogger("digfast")



def _builtin_mixture():
    from digfast.systems import GaussianMixture

    return GaussianMixture.default().model(LinearVP())


BUILTIN_MODELS = {"mixture": _builtin_mixture}  # analytic models; trained ones live in weights/


WEIGHTS_DIR = Path(__file__).parent / "weights"


def builtin_names() -> list[str]:
    shipped = [p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").exists()] if WEIGHTS_DIR.exists() else []
    return sorted(set(BUILTIN_MODELS) | set(shipped))


def load(name):
    """A model by built-in name (analytic or shipped weights) or from a folder holding
    config.json + model.safetensors."""
    from digfast.models.score_model import ScoreModel

    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    if (WEIGHTS_DIR / str(name) / "config.json").exists():
        return ScoreModel.load(WEIGHTS_DIR / str(name))
    if Path(name).is_dir():
        return ScoreModel.load(name)
    raise ValueError(f"unknown model {name!r}: not a folder with config.json + model.safetensors, "
                     f"nor a built-in model ({', '.join(builtin_names())})")


def _resolve_system(model, system):
    system = system if system is not None else getattr(model, "system", None)
    if system is None:
        raise ValueError("no system given and the model does not name one")
    for attr in ("n_atoms", "spatial_dim"):
        if not hasattr(system, attr):
            raise TypeError(f"system {system!r} lacks {attr!r}")
    if not callable(getattr(model, "score", None)) or getattr(model, "schedule", None) is None:
        raise TypeError("model must have .schedule and .score(x, t, mask=None)")
    return system


def _resolve_device(device) -> torch.device:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no GPU")
    return device


def _score_fn(model):
    """The library's score_fn(x, t, mask); models without padding need not take a mask."""
    return lambda x, t, mask: model.score(x, t) if mask is None else model.score(x, t, mask=mask)


def _guided(model, guidance):
    from digfast.guidance import guided_score_fn

    return guided_score_fn(_score_fn(model), guidance, model.schedule, _scale(model))


def _batch_size(batch_size, n: int, n_atoms: int) -> int:
    if batch_size in (None, "auto"):
        return max(1, min(n, 2**16 // max(n_atoms, 1)))
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size}")
    return min(int(batch_size), n)


def _check_mask(mask, n, n_atoms):
    if mask is None:
        return None
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.dim() == 1:
        mask = mask.expand(n, -1)
    if mask.shape != (n, n_atoms):
        raise ValueError(f"mask must be ({n_atoms},) or ({n}, {n_atoms}), got {tuple(mask.shape)}")
    if (mask.sum(1) < 1).any():
        raise ValueError("every structure needs at least one real atom")
    return mask


def sample_batch(model, system=None, n: int = 1000, steps: int | None = None, *, sampler: str = "ancestral",
                 batch_size="auto", seed: int = 0, device=None, progress: bool = True, mask=None,
                 first_sample_id: int = 0, t_min: float | None = None, guidance=None) -> SampleResult:
    """Draw n independent samples of system from model.

    guidance (digfast.Guidance) steers every sampler towards a property value: the score
    becomes s + w grad log q(c | x) (see digfast/guidance.py).

    Sample k (k = first_sample_id .. first_sample_id + n - 1) uses noise keyed by (seed, k), so
    the result does not depend on batch_size or device count, and a run can resume or be
    split across processes by first_sample_id. mask ((N,) or (n, N) bool) marks real atoms
    of padded structures.
    """
    system = _resolve_system(model, system)
    run = _samplers.get_sampler(sampler)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    steps = steps if steps is not None else getattr(model, "default_steps", 500)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = _resolve_device(device)
    mask = _check_mask(mask, n, system.n_atoms)
    bs = _batch_size(batch_size, n, system.n_atoms)
    n_batches = -(-n // bs)
    bar = _progress(progress, n_batches * steps, f"{sampler} x{steps}")
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, bs):
            hi = min(n, lo + bs)
            ids = torch.arange(first_sample_id + lo, first_sample_id + hi, dtype=torch.int64, device=device)
            m = None if mask is None else mask[lo:hi].to(device)
            x = _samplers.prior_sample(model.schedule, seed, ids, system.n_atoms, system.spatial_dim, m)
            ctx = _samplers.StepContext(seed, ids, m, on_step=bar.update if bar else None)
            score_fn = _score_fn(model) if guidance is None else _guided(model, guidance)
            out.append(run(score_fn, model.schedule, x, steps, ctx, t_min=t_min).cpu())
    seconds = time.perf_counter() - start
    if bar:
        bar.close()
    positions = torch.cat(out) * _scale(model)
    n_inverted = 0
    if hasattr(system, "canonicalise"):  # e.g. mirror images of a chiral molecule
        positions, n_inverted = system.canonicalise(positions)
    bad = int((~torch.isfinite(positions)).flatten(1).any(1).sum())
    if bad:  # keep the run: the caller decides what to do with the broken structures
        log.warning("digfast: %d of %d samples contain NaN/inf: the model or step count is unstable", bad, n)
    meta = {
        "sampler": sampler, "steps": steps, "seed": seed, "n": n, "batch_size": bs,
        "first_sample_id": first_sample_id, "device": str(device), "seconds": seconds,
        "samples_per_second": n / seconds if seconds > 0 else float("inf"),
        "score_evals_per_sample": steps * _samplers.EVALS_PER_STEP[sampler],
        "schedule": model.schedule.config(), "backend": _step_backend(device), "n_nonfinite": bad,
        "n_inverted": n_inverted,
    }
    return SampleResult(positions=positions, system=system, metadata=meta, mask=mask)


def log_likelihood(model, system=None, positions=None, *, divergence: str = "exact", probes: int = 8,
                   method: str = "rk4", steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5,
                   seed: int = 0, batch_size="auto", device=None, mask=None, t_min: float | None = None,
                   dtype=torch.float64, prior_log_prob=None, progress: bool = False) -> _lik.LikelihoodResult:
    """log p_0 of each structure under the model (probability-flow ODE), and its latent x_T.

    For systems whose samples sample_batch canonicalises (chiral molecules: the D mirror
    images are inverted), this is the density of that canonical ensemble: log 2 added on L
    structures, -inf on D ones."""
    system = _resolve_system(model, system)
    if positions is None:
        raise ValueError("positions are required")
    positions = torch.as_tensor(positions)
    if positions.dim() == 2:
        positions = positions.unsqueeze(0)
    if positions.dim() != 3 or positions.shape[1:] != (system.n_atoms, system.spatial_dim):
        raise ValueError(f"positions must be (n, {system.n_atoms}, {system.spatial_dim}), "
                         f"got {tuple(positions.shape)}")
    device = _resolve_device(device)
    n = positions.shape[0]
    mask = _check_mask(mask, n, system.n_atoms)
    if t_min is None:
        t_min = 1e-5 if model.schedule.kind == "vp" else 0.0
    bs = _batch_size(batch_size, n, system.n_atoms)
    scale = _scale(model)
    per_batch = steps * _LIKELIHOOD_EVALS[method] if method in _LIKELIHOOD_EVALS else None  # dopri5: adaptive
    bar = _progress(progress, per_batch * -(-n // bs) if per_batch else None, f"log p ({method})", "eval")
    score_fn = _score_fn(model)
    if bar:
        def score_fn(x, t, m, _inner=score_fn):  # one tick per ODE right-hand side
            bar.update()
            return _inner(x, t, m)
    parts = []
    for lo in range(0, n, bs):
        hi = min(n, lo + bs)
        m = None if mask is None else mask[lo:hi].to(device)
        parts.append(_lik.log_likelihood(
            score_fn, model.schedule, positions[lo:hi].to(device, dtype) / scale, mask=m,
            divergence=divergence, probes=probes, seed=seed,
            sample_ids=torch.arange(lo, hi, device=device), method=method, steps=steps, rtol=rtol,
            atol=atol, t_min=t_min, prior_log_prob=prior_log_prob))
    if bar:
        bar.close()
    # density in the system's units: p_x(x) = p_y(x / scale) / scale^D
    log_jac = _lik.dof(positions, mask).double() * math.log(scale)
    log_prob = torch.cat([p.log_prob for p in parts]).cpu() - log_jac
    if hasattr(system, "canonical_log_density_offset"):
        log_prob = log_prob + system.canonical_log_density_offset(positions.cpu())
    return _lik.LikelihoodResult(log_prob=log_prob,
                                 latent=torch.cat([p.latent for p in parts]).cpu(),
                                 prior_log_prob=torch.cat([p.prior_log_prob for p in parts]).cpu(),
                                 n_evals=sum(p.n_evals for p in parts))


def _scale(model) -> float:
    """Models may work in normalised coordinates x / position_scale."""
    return float(getattr(model, "position_scale", 1.0))


def _step_backend(device) -> str:
    from digfast.ops import _backend

    return _backend.choose("sampler_step", device)


def _progress(enabled: bool, total: int | None, desc: str, unit: str = "step"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=0.5)


_LIKELIHOOD_EVALS = {"euler": 1, "heun": 2, "rk4": 4}  # ODE right-hand sides per fixed step
