"""Large ensembles on disk: chunked, resumable, shardable over torch.distributed ranks.

A run folder holds
    manifest.json          settings (model, system, sampler, steps, seed, n, chunk size,
                           filters) and, once complete, every chunk's sample-id range and sha256
    chunk-000000.npz       positions (m, N, d) float32 and sample_ids (m,) of one chunk
    chunk-000000.json      that chunk's record: ids, sha256 of the .npz, counts, settings hash

Chunk c covers sample ids [c * chunk_size, (c + 1) * chunk_size) and sample k depends only on
(seed, k), so the ensemble is the same whatever the world size or how often the run was
interrupted. Every file is written to a temporary name and renamed, and a chunk counts as
done only when its record exists and its checksum matches: a killed run resumes by
redrawing just the missing chunks. Memory: each rank holds one chunk at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from digfast import distributed, io
from digfast.arguments import check_fits_in_memory, check_int
from digfast.io import InputError

log = logging.getLogger("digfast")

FORMAT = "digfast-ensemble/1"
MANIFEST = "manifest.json"
CHUNK_BYTES = 64 * 2**20  # automatic chunk size: about this much float32 positions per chunk
COUNTS = ("n_nonfinite", "n_invalid", "n_redrawn", "n_dropped", "n_inverted")


class EnsembleError(InputError):
    """A run folder that cannot be resumed or read: the message names the file and the problem."""


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # first sample id
    stop: int  # one past the last

    @property
    def stem(self) -> str:
        return f"chunk-{self.index:06d}"


def auto_chunk_size(n: int, n_atoms: int, dim: int) -> int:
    """Chunk size from the sample size alone (never from the host), so every rank and every
    resume plans the same chunks."""
    return max(1, min(n, CHUNK_BYTES // (4 * n_atoms * dim)))


def plan(n: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(i, lo, min(n, lo + chunk_size)) for i, lo in enumerate(range(0, n, chunk_size))]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    io.atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EnsembleError(f"{path}: {what} is not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise EnsembleError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no ensemble: {MANIFEST} missing")
    manifest = _read_json(path, "the manifest")
    if manifest.get("format") != FORMAT:
        raise EnsembleError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    settings = manifest.get("settings")
    if not isinstance(settings, dict):
        raise EnsembleError(f"{path}: no 'settings' object")
    for key in ("n", "chunk_size"):
        if not isinstance(settings.get(key), int) or isinstance(settings.get(key), bool) or settings[key] < 1:
            raise EnsembleError(f"{path}: settings.{key} must be a positive integer, got {settings.get(key)!r}")
    return manifest


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} in the folder, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _prepare(folder: Path, settings: dict, resume: bool) -> None:
    """Main rank: create the folder and the manifest, or check that a resume matches it."""
    if not folder.parent.exists():
        raise FileNotFoundError(f"output folder {folder.parent} does not exist")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    folder.mkdir(exist_ok=True)
    if (folder / MANIFEST).exists():
        if not resume:
            raise FileExistsError(f"{folder} already holds an ensemble ({MANIFEST}); pass --resume "
                                  "(resume=True) to finish it, or choose another folder")
        found = read_manifest(folder)["settings"]
        diff = _differences(found, settings)
        if diff:
            raise EnsembleError(f"cannot resume {folder}: settings differ ({'; '.join(diff)})")
        for stale in folder.glob(".*.partial-*"):  # temporary files of a killed writer
            stale.unlink(missing_ok=True)
        return
    leftovers = sorted(p.name for p in folder.glob("chunk-*"))
    if leftovers:
        raise FileExistsError(f"{folder} holds chunk files but no {MANIFEST} ({leftovers[0]}, ...): "
                              "not a digfast run folder, or a damaged one")
    _write_json(folder / MANIFEST, {"format": FORMAT, "complete": False, "settings": settings})


def _chunk_done(folder: Path, chunk: Chunk, digest: str) -> bool:
    record_path = folder / f"{chunk.stem}.json"
    if not record_path.exists():
        return False
    try:
        record = _read_json(record_path, "a chunk record")
    except EnsembleError as err:
        log.warning("digfast: redrawing chunk %d: %s", chunk.index, err)
        return False
    npz = folder / f"{chunk.stem}.npz"
    expected = {"settings_hash": digest, "start": chunk.start, "stop": chunk.stop}
    if any(record.get(k) != v for k, v in expected.items()) or not npz.exists() or sha256_file(npz) != record.get("sha256"):
        log.warning("digfast: redrawing chunk %d: its file is missing, damaged or from other settings", chunk.index)
        return False
    return True


def _write_chunk(folder: Path, chunk: Chunk, result, digest: str) -> None:
    meta = result.metadata
    dropped = set(meta["dropped_sample_ids"])
    ids = np.array([k for k in range(chunk.start, chunk.stop) if k not in dropped], dtype=np.int64)
    npz = folder / f"{chunk.stem}.npz"
    with io.atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, positions=result.positions.numpy(), sample_ids=ids)
    record = {"index": chunk.index, "file": npz.name, "start": chunk.start, "stop": chunk.stop,
              "n_samples": len(ids), "sha256": sha256_file(npz), "settings_hash": digest,
              "seconds": meta["seconds"], "backend": meta["backend"], "dropped_sample_ids": sorted(dropped),
              **{k: meta[k] for k in COUNTS}}
    _write_json(folder / f"{chunk.stem}.json", record)  # written last: the chunk is done once this exists


def _finish(folder: Path, settings: dict, chunks: list[Chunk]) -> dict:
    """Main rank, after every rank is done: the complete manifest."""
    digest = settings_hash(settings)
    records = []
    for chunk in chunks:
        path = folder / f"{chunk.stem}.json"
        if not path.exists():
            raise EnsembleError(f"{folder}: chunk {chunk.index} was never written ({path.name} missing)")
        record = _read_json(path, "a chunk record")
        if record.get("settings_hash") != digest:
            raise EnsembleError(f"{path}: chunk drawn with other settings")
        records.append(record)
    totals = {k: sum(r[k] for r in records) for k in COUNTS}
    manifest = {"format": FORMAT, "complete": True, "settings": settings,
                "n_samples": sum(r["n_samples"] for r in records), **totals,
                "seconds": sum(r["seconds"] for r in records), "backend": records[0].get("backend"),
                "chunks": [{k: r[k] for k in ("index", "file", "start", "stop", "n_samples", "sha256")}
                           for r in records]}
    _write_json(folder / MANIFEST, manifest)
    return manifest


def sample_ensemble(model, out_dir, n: int, *, model_name: str | None = None, steps: int | None = None,
                    sampler: str = "ancestral", seed: int = 0, chunk_size: int | None = None,
                    resume: bool = False, batch_size="auto", device=None, progress: bool = False,
                    t_min: float | None = None, on_nonfinite: str = "redraw", validity=None,
                    on_invalid: str = "drop", max_attempts: int = 10, ranks=None) -> "Ensemble":
    """Draw n samples into the folder out_dir, chunk by chunk (see the module docstring).

    Under torchrun every rank calls this with the same arguments; each draws its round-robin
    share of the chunks, and rank 0 writes the final manifest. resume=True finishes an
    interrupted run with the same settings (chunk_size None: the folder's)."""
    from digfast.api import check_sample_args, sample_batch
    from digfast.validity import describe

    folder = Path(out_dir)
    # every argument checked before the folder is touched: bad input leaves nothing behind
    system, _, n, steps, seed, _, t_min, _ = check_sample_args(
        model, None, n, steps, sampler, seed, 0, t_min, device, on_nonfinite, validity, on_invalid, max_attempts,
        batch_size)
    if chunk_size is None and resume and (folder / MANIFEST).exists():
        chunk_size = read_manifest(folder)["settings"]["chunk_size"]
    chunk_size = (auto_chunk_size(n, system.n_atoms, system.spatial_dim) if chunk_size is None
                  else check_int("chunk_size", chunk_size, minimum=1))
    settings = {"model": model_name if model_name is not None else type(model).__name__,
                "model_sha256": model_fingerprint(model),
                "system": getattr(system, "name", type(system).__name__), "n_atoms": system.n_atoms,
                "spatial_dim": system.spatial_dim, "sampler": sampler, "steps": steps, "seed": seed, "n": n,
                "chunk_size": chunk_size, "t_min": t_min, "on_nonfinite": on_nonfinite,
                "validity": describe(validity), "on_invalid": on_invalid, "max_attempts": max_attempts,
                "scale": float(getattr(model, "position_scale", 1.0))}
    ranks = ranks if ranks is not None else distributed.from_env(device)
    try:
        _prepare_on_main(ranks, folder, settings, resume)
        digest, chunks = settings_hash(settings), plan(n, chunk_size)
        kw = dict(steps=steps, sampler=sampler, seed=seed, batch_size=batch_size, device=ranks.device(device),
                  progress=progress, t_min=t_min, on_nonfinite=on_nonfinite, validity=validity,
                  on_invalid=on_invalid, max_attempts=max_attempts)
        for chunk in ranks.shard(chunks):
            if resume and _chunk_done(folder, chunk, digest):
                continue
            result = sample_batch(model, system, n=chunk.stop - chunk.start, first_sample_id=chunk.start, **kw)
            _write_chunk(folder, chunk, result, digest)
        ranks.barrier()
        if ranks.is_main:
            _finish(folder, settings, chunks)
        ranks.barrier()
    finally:
        ranks.close()
    return Ensemble(folder, system=system, verify=False)


def model_fingerprint(model) -> str:
    """sha256 of the model's weights (its config for analytic models): a resume must use the same model."""
    h = hashlib.sha256(type(model).__name__.encode())
    if callable(getattr(model, "state_dict", None)):
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        config = getattr(getattr(model, "system", None), "config", None)
        h.update(json.dumps(config() if callable(config) else None, sort_keys=True, default=str).encode())
    schedule = getattr(model, "schedule", None)
    if schedule is not None and callable(getattr(schedule, "config", None)):
        h.update(json.dumps(schedule.config(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _prepare_on_main(ranks, folder: Path, settings: dict, resume: bool) -> None:
    error = None
    if ranks.is_main:
        try:
            _prepare(folder, settings, resume)
        except Exception as err:  # every rank must learn of it, or the others wait forever
            error = err
    if not ranks.all_succeeded(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 could not prepare {folder}; see its error")


class Ensemble:
    """A complete run folder: chunks read lazily, checked against the manifest's sha256."""

    def __init__(self, folder, system=None, verify: bool = True):
        from digfast.systems import get_system

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("complete"):
            raise EnsembleError(f"{self.folder} is an unfinished run: finish it with "
                                "`digfast sample ... --out-dir DIR --resume`")
        chunks = self.manifest.get("chunks")
        if not isinstance(chunks, list) or not chunks:
            raise EnsembleError(f"{self.folder / MANIFEST}: no chunk list")
        self.chunks = chunks
        self.settings = self.manifest["settings"]
        self.system = system if system is not None else get_system(self.settings["system"])
        if verify:
            self.verify()

    def __len__(self) -> int:
        return int(self.manifest["n_samples"])

    @property
    def counts(self) -> dict:
        return {k: self.manifest.get(k, 0) for k in COUNTS}

    def verify(self) -> None:
        for c in self.chunks:
            path = self.folder / str(c.get("file"))
            if not path.is_file():
                raise EnsembleError(f"{self.folder}: chunk file {path.name} is missing")
            if sha256_file(path) != c.get("sha256"):
                raise EnsembleError(f"{path}: checksum does not match the manifest (damaged or replaced)")

    def iter_chunks(self):
        """(sample_ids, positions) per chunk, in sample-id order; one chunk in memory at a time."""
        shape = (self.settings["n_atoms"], self.settings["spatial_dim"])
        for c in self.chunks:
            path = self.folder / c["file"]
            try:
                with np.load(path, allow_pickle=False) as data:
                    ids, x = data["sample_ids"], data["positions"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                raise EnsembleError(f"{path}: unreadable chunk ({type(err).__name__}: {err})") from err
            if x.dtype != np.float32 or x.ndim != 3 or x.shape[1:] != shape or ids.shape != (len(x),) \
                    or len(x) != c["n_samples"]:
                raise EnsembleError(f"{path}: expected {c['n_samples']} float32 structures of {shape}, "
                                    f"got {x.dtype} {x.shape} with {ids.shape} ids")
            yield torch.from_numpy(ids), torch.from_numpy(x)

    def sample_ids(self) -> torch.Tensor:
        return torch.cat([ids for ids, _ in self.iter_chunks()])

    def positions(self, max_samples: int | None = None) -> torch.Tensor:
        """All positions in one tensor (or the first max_samples): needs them to fit in memory."""
        n = len(self) if max_samples is None else min(len(self), max_samples)
        check_fits_in_memory(f"ensemble {self.folder} ({n} samples)", 4 * n * self.settings["n_atoms"]
                             * self.settings["spatial_dim"], "read it chunk by chunk (iter_chunks) or export it")
        parts, have = [], 0
        for _, x in self.iter_chunks():
            parts.append(x[: n - have])
            have += len(parts[-1])
            if have >= n:
                break
        return torch.cat(parts)

    def to_result(self, max_samples: int | None = None):
        from digfast.results import SampleResult

        seconds = self.manifest.get("seconds", 0.0)  # summed over ranks: per-process throughput
        meta = {**self.settings, **self.counts, "n_samples": len(self), "folder": str(self.folder),
                "seconds": seconds, "samples_per_second": len(self) / seconds if seconds else float("nan"),
                "backend": self.manifest.get("backend")}
        return SampleResult(positions=self.positions(max_samples), system=self.system, metadata=meta)

    def export(self, path) -> list[Path]:
        """Write the ensemble as one file. .xtc/.dcd/.trr (+ topology PDB) and .npy stream chunk by
        chunk; .npz and .pdb are built in memory. Nothing is left behind on failure."""
        path = io.check_output_path(path)
        suffix = path.suffix.lower()
        if suffix in (".xtc", ".dcd", ".trr"):
            return self._export_trajectory(path)
        if suffix == ".npy":
            with io.atomic_path(path) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(len(self), self.settings["n_atoms"], self.settings["spatial_dim"]))
                lo = 0
                for _, x in self.iter_chunks():
                    out[lo: lo + len(x)] = x.numpy()
                    lo += len(x)
                out.flush()
                del out
            return [path]
        return io.save(path, self.positions(), self.system, metadata={**self.settings, **self.counts})

    def _export_trajectory(self, path: Path) -> list[Path]:
        from mdtraj.formats import DCDTrajectoryFile, TRRTrajectoryFile, XTCTrajectoryFile

        writer = {".xtc": XTCTrajectoryFile, ".dcd": DCDTrajectoryFile, ".trr": TRRTrajectoryFile}[path.suffix.lower()]
        scale = 10.0 if path.suffix.lower() == ".dcd" else 1.0  # DCD holds Angstrom, the others nm
        top_path = path.with_name(path.stem + "_top.pdb")
        with io.atomic_path(top_path) as tmp_top, io.atomic_path(path) as tmp:
            first = None
            with writer(str(tmp), "w") as f:
                for _, x in self.iter_chunks():
                    if first is None:
                        first = x[:1]
                    f.write(io.xyz_nm(x, self.system) * scale)
            io.to_mdtraj(first, self.system).save_pdb(str(tmp_top))
        return [path, top_path]
