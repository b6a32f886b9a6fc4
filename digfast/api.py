"""The public entry points: load, sample_batch, log_likelihood."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from digfast import likelihood as _lik
from digfast import samplers as _samplers
from digfast.arguments import check_choice, check_device, check_fits_in_memory, check_float, check_int
from digfast.io import InputError, check_positions
from digfast.ops.philox import check_seed
from digfast.results import SampleResult
from digfast.validity import describe as describe_validity
from digfast.validity import redraw_seed, run_check
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

    if not isinstance(name, (str, Path)) or not str(name):
        raise TypeError(f"model name must be a non-empty string or path, got {type(name).__name__} {name!r}")
    if "\0" in str(name):
        raise ValueError(f"model name {name!r} contains a NUL byte")
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



def _score_fn(model):
    """The library's score_fn(x, t, mask); models without padding need not take a mask."""
    return lambda x, t, mask: model.score(x, t) if mask is None else model.score(x, t, mask=mask)


def _guided(model, guidance):
    from digfast.guidance import guided_score_fn

    return guided_score_fn(_score_fn(model), guidance, model.schedule, _scale(model))


def _batch_size(batch_size, n: int, n_atoms: int) -> int:
    if batch_size in (None, "auto"):
        return max(1, min(n, 2**16 // max(n_atoms, 1)))
    if isinstance(batch_size, str):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return min(check_int("batch_size", batch_size, minimum=1), n)


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
                 first_sample_id: int = 0, t_min: float | None = None, guidance=None,
                 on_nonfinite: str = "redraw", validity=None, on_invalid: str = "drop",
                 max_attempts: int = 10) -> SampleResult:
    """Draw n independent samples of system from model.

    guidance (digfast.Guidance) steers every sampler towards a property value: the score
    becomes s + w grad log q(c | x) (see digfast/guidance.py).

    Sample k (k = first_sample_id .. first_sample_id + n - 1) uses noise keyed by (seed, k), so
    the result does not depend on batch_size or device count, and a run can resume or be
    split across processes by first_sample_id. mask ((N,) or (n, N) bool) marks real atoms
    of padded structures.

    Rejected samples: one with NaN/inf coordinates (on_nonfinite) or one that validity
    rejects (validity(positions, system) -> (n,) bool; digfast.validity has energy cut-off,
    bond-length and clash checks; on_invalid) is "redraw"n: draw a of sample k uses the seed
    validity.redraw_seed(seed, a) and the same id k, so results stay reproducible and
    independent of the split; "drop" removes it; "keep" (non-finite only) keeps it with a
    warning. A sample still rejected after max_attempts draws is dropped. metadata counts
    them and lists the dropped sample ids.
    """
    system, run, n, steps, seed, first_sample_id, t_min, device = check_sample_args(
        model, system, n, steps, sampler, seed, first_sample_id, t_min, device, on_nonfinite, validity, on_invalid,
        max_attempts, batch_size)
    mask = _check_mask(mask, n, system.n_atoms)
    check_fits_in_memory(f"sample_batch(n={n}) of {system.n_atoms} atoms", 4 * n * system.n_atoms * system.spatial_dim,
                         "write the ensemble to disk in chunks: digfast.ensemble.sample_ensemble or "
                         "`digfast sample --out-dir DIR`")
    bs = _batch_size(batch_size, n, system.n_atoms)
    bar = _progress(progress, -(-n // bs) * steps, f"{sampler} x{steps}")
    score_fn = _score_fn(model) if guidance is None else _guided(model, guidance)
    sampler_args = (model, system, run, score_fn, steps, t_min, device, bar)
    start = time.perf_counter()
    rows = torch.arange(n)
    positions, bs = _draw(sampler_args, seed, first_sample_id + rows, mask, bs)
    keep = torch.ones(n, dtype=torch.bool)
    counts = {"n_nonfinite": 0, "n_invalid": 0}
    redrawn = torch.zeros(n, dtype=torch.bool)
    pending = rows
    for attempt in range(max_attempts):
        if attempt:
            redrawn[pending] = True
            positions[pending], bs = _draw(sampler_args, redraw_seed(seed, attempt), first_sample_id + pending,
                                           None if mask is None else mask[pending], bs)
        redo, drop = _rejections(positions[pending], system, validity, on_nonfinite, on_invalid, counts)
        keep[pending[drop]] = False
        pending = pending[redo]
        if len(pending) == 0:
            break
    keep[pending] = False  # still rejected after max_attempts draws
    seconds = time.perf_counter() - start
    if bar:
        bar.close()
    positions = positions[keep]
    n_inverted = 0
    if hasattr(system, "canonicalise"):  # e.g. mirror images of a chiral molecule
        positions, n_inverted = system.canonicalise(positions)
    if on_nonfinite == "keep" and counts["n_nonfinite"]:
        log.warning("digfast: %d of %d samples contain NaN/inf: the model or step count is unstable",
                    counts["n_nonfinite"], n)
    dropped = (first_sample_id + rows[~keep]).tolist()
    if dropped:
        log.warning("digfast: dropped %d of %d samples (NaN/inf or invalid; %d after %d draws)",
                    len(dropped), n, len(pending), max_attempts)
    meta = {
        "sampler": sampler, "steps": steps, "seed": seed, "n": n, "batch_size": bs,
        "first_sample_id": first_sample_id, "device": str(device), "seconds": seconds,
        "samples_per_second": len(positions) / seconds if seconds > 0 else float("inf"),
        "score_evals_per_sample": steps * _samplers.EVALS_PER_STEP[sampler],
        "schedule": model.schedule.config(), "backend": _step_backend(device), **counts,
        "n_redrawn": int(redrawn.sum()), "n_dropped": len(dropped), "dropped_sample_ids": dropped,
        "on_nonfinite": on_nonfinite, "on_invalid": on_invalid, "validity": describe_validity(validity),
        "max_attempts": max_attempts, "n_inverted": n_inverted,
    }
    return SampleResult(positions=positions, system=system, metadata=meta,
                        mask=None if mask is None else mask[keep])


def check_sample_args(model, system, n, steps, sampler, seed, first_sample_id, t_min, device, on_nonfinite,
                      validity, on_invalid, max_attempts, batch_size):
    """sample_batch's arguments checked (before any work or output), some normalised:
    (system, sampler function, n, steps, seed, first_sample_id, t_min, device)."""
    system = _resolve_system(model, system)
    run = _samplers.get_sampler(check_choice("sampler", sampler, _samplers.SAMPLERS))
    n = check_int("n", n, minimum=1, maximum=2**32)
    steps = check_int("steps", steps if steps is not None else getattr(model, "default_steps", 500), minimum=1)
    seed = check_seed(check_int("seed", seed))
    first_sample_id = check_int("first_sample_id", first_sample_id, minimum=0, maximum=2**32 - n)
    check_choice("on_nonfinite", on_nonfinite, ("redraw", "drop", "keep"))
    check_choice("on_invalid", on_invalid, ("redraw", "drop"))
    check_int("max_attempts", max_attempts, minimum=1)
    if validity is not None and not callable(validity):
        raise TypeError(f"validity must be a callable check(positions, system) -> (n,) bool, got {validity!r}")
    if hasattr(validity, "check_system"):  # e.g. a bond check on a system without bonds
        validity.check_system(system)
    if t_min is not None:
        t_min = check_float("t_min", t_min, minimum=0.0, maximum=float(model.schedule.t_max))
    _batch_size(batch_size, 1, system.n_atoms)
    return system, run, n, steps, seed, first_sample_id, t_min, check_device(device)


def _draw(sampler_args, seed: int, sample_ids: torch.Tensor, mask, bs: int):
    """Samples of the given ids, in system units; halves the batch on out-of-memory (the noise
    is keyed by sample id, so the result does not change). Returns (positions, batch size)."""
    model, system, run, score_fn, steps, t_min, device, bar = sampler_args
    out, lo = [], 0
    with torch.no_grad():
        while lo < len(sample_ids):
            hi = min(len(sample_ids), lo + bs)
            ids = sample_ids[lo:hi].to(device)
            m = None if mask is None else mask[lo:hi].to(device)
            try:
                x = _samplers.prior_sample(model.schedule, seed, ids, system.n_atoms, system.spatial_dim, m)
                ctx = _samplers.StepContext(seed, ids, m, on_step=bar.update if bar else None)
                out.append(run(score_fn, model.schedule, x, steps, ctx, t_min=t_min).cpu())
            except torch.OutOfMemoryError:
                if bs == 1:
                    raise
                bs = max(1, bs // 2)
                log.warning("digfast: out of memory; batch size halved to %d", bs)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            lo = hi
    return torch.cat(out) * _scale(model), bs


def _rejections(x, system, validity, on_nonfinite: str, on_invalid: str, counts: dict):
    """(redraw, drop) bool masks over the structures x; adds to the counts."""
    finite = torch.isfinite(x).flatten(1).all(1)
    counts["n_nonfinite"] += int((~finite).sum())
    invalid = torch.zeros_like(finite)
    if validity is not None and finite.any():
        shown = x[finite]
        if hasattr(system, "canonicalise"):  # judge the structure the caller will get
            shown = system.canonicalise(shown)[0]
        invalid[finite] = ~run_check(validity, shown, system)
        counts["n_invalid"] += int(invalid.sum())
    redo, drop = torch.zeros_like(finite), torch.zeros_like(finite)
    for bad, action in ((~finite, on_nonfinite), (invalid, on_invalid)):
        if action == "redraw":
            redo |= bad
        elif action == "drop":
            drop |= bad
    return redo, drop


def log_likelihood(model, system=None, positions=None, *, divergence: str = "auto", probes: int = 8,
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
    if not torch.is_tensor(positions):
        try:
            positions = np.asarray(positions)
        except ValueError as err:  # ragged nested lists
            raise InputError(f"positions are not a rectangular array: {err}") from err
    if positions.ndim == 2:  # one structure
        positions = positions[None]
    positions = check_positions(positions)  # real dtype, non-empty, finite: InputError otherwise
    steps = check_int("steps", steps, minimum=1)
    probes = check_int("probes", probes, minimum=1)
    rtol, atol = check_float("rtol", rtol, minimum=0.0), check_float("atol", atol, minimum=0.0)
    seed = check_seed(check_int("seed", seed))
    if positions.shape[1:] != (system.n_atoms, system.spatial_dim):
        raise ValueError(f"positions must be (n, {system.n_atoms}, {system.spatial_dim}), "
                         f"got {tuple(positions.shape)}")
    device = check_device(device)
    n = positions.shape[0]
    mask = _check_mask(mask, n, system.n_atoms)
    if t_min is None:
        t_min = 1e-5 if model.schedule.kind == "vp" else 0.0
    bs = _batch_size(batch_size, n, system.n_atoms)
    scale = _scale(model)
    bar, score_fn = _likelihood_progress(model, progress, method, steps, -(-n // bs), f"log p ({method})")
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


def sample_with_likelihood(model, system=None, n: int = 1000, *, method: str = "rk4", steps: int = 100,
                           divergence: str = "auto", probes: int = 8, rtol: float = 1e-5, atol: float = 1e-5,
                           seed: int = 0, first_sample_id: int = 0, batch_size="auto", device=None,
                           t_min: float | None = None, dtype=torch.float64,
                           progress: bool = False) -> _lik.LikelihoodResult:
    """n samples from the probability-flow ODE and the log density of each, in one integration.

    The prior draws and the fixed-step grid (uniform in log-SNR, short steps where the ODE
    stiffens) are sample_batch's, so rk4 positions match sample_batch(sampler="rk4") up to
    precision. log_prob is the density of the samples as drawn, along the decoding path
    itself: what importance weights exp(-E/kT) / q need (digfast.reweight). Returns a
    LikelihoodResult with .positions (float32, system units) and .latent the prior draws."""
    system = _resolve_system(model, system)
    n = check_int("n", n, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    probes = check_int("probes", probes, minimum=1)
    rtol, atol = check_float("rtol", rtol, minimum=0.0), check_float("atol", atol, minimum=0.0)
    seed = check_seed(check_int("seed", seed))
    first_sample_id = check_int("first_sample_id", first_sample_id, minimum=0)
    check_choice("method", method, sorted(_LIKELIHOOD_EVALS) + ["dopri5"])
    check_choice("divergence", divergence, _lik.DIVERGENCES)
    device = check_device(device)
    if t_min is None:
        t_min = _samplers.default_t_min(model.schedule)
    times = (_samplers.time_grid(model.schedule, steps, t_min, spacing="logsnr")
             if method in _LIKELIHOOD_EVALS else None)
    bs = _batch_size(batch_size, n, system.n_atoms)
    scale = _scale(model)
    bar, score_fn = _likelihood_progress(model, progress, method, steps, -(-n // bs),
                                         f"sample + log p ({method})")
    xs, parts = [], []
    for lo in range(first_sample_id, first_sample_id + n, bs):
        ids = torch.arange(lo, min(first_sample_id + n, lo + bs))
        z = _samplers.prior_sample(model.schedule, seed, ids, system.n_atoms, system.spatial_dim)
        x, part = _lik.decode_log_likelihood(
            score_fn, model.schedule, z.to(device, dtype), divergence=divergence, probes=probes, seed=seed,
            sample_ids=ids.to(device), method=method, steps=steps, rtol=rtol, atol=atol, t_min=t_min, times=times)
        xs.append(x.cpu())
        parts.append(part)
    if bar:
        bar.close()
    positions = torch.cat(xs) * scale
    log_prob = torch.cat([p.log_prob for p in parts]).cpu() - _lik.dof(positions, None).double() * math.log(scale)
    if hasattr(system, "canonicalise"):  # as sample_batch: the density of the canonical ensemble
        positions = system.canonicalise(positions)[0]
        log_prob = log_prob + system.canonical_log_density_offset(positions)
    return _lik.LikelihoodResult(log_prob=log_prob, latent=torch.cat([p.latent for p in parts]).cpu(),
                                 prior_log_prob=torch.cat([p.prior_log_prob for p in parts]).cpu(),
                                 n_evals=sum(p.n_evals for p in parts), positions=positions.float())


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


def _likelihood_progress(model, progress: bool, method: str, steps: int, batches: int, desc: str):
    """A bar ticking once per ODE right-hand side (no total for adaptive dopri5), and the
    model's score function wired to it."""
    per_batch = steps * _LIKELIHOOD_EVALS[method] if method in _LIKELIHOOD_EVALS else None
    bar = _progress(progress, per_batch * batches if per_batch else None, desc, "eval")
    score_fn = _score_fn(model)
    if bar:
        def score_fn(x, t, m, _inner=score_fn):
            bar.update()
            return _inner(x, t, m)
    return bar, score_fn


def load_official_protein(path, config=None, *, dtype=torch.float32, device="cpu"):
    """The DiG protein score model with the weights of a public-layout checkpoint
    (torch.load(path)["state_dict"], "module." prefixes allowed), loaded strictly: a
    CheckpointError names every missing, unexpected or mis-shaped key."""
    from digfast.models.protein.checkpoint import load_official_protein as _load

    return _load(path, config, dtype=dtype, device=device)
