"""sample_protein: many structures of one protein from a DiG protein model.

Two paths compute the same thing:
- "fast": digfast.models.protein.fast (per-protein precompute, pair-value rewrite, a batch
  of samples per call sharing the pair data);
- "reference": the public way, one structure per network call through the reference model
  (Linear over all pairs in every layer, pair bias recomputed each step).
Sample k starts from noise keyed by (seed, k), so results do not depend on batch size; the
structures can be streamed to disk chunk by chunk (out=...xtc/.pdb/.npz).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from digfast.models.protein.fast import FastProteinModel
from digfast.models.protein.model import ProteinScoreModel
from digfast.protein import sampler as _sampler
from digfast.protein.graph import GRAPH_SAMPLERS, GraphedSampler
from digfast.protein.inputs import check_representations

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp64": torch.float64, "float64": torch.float64}


@dataclass
class ProteinSamples:
    tr: torch.Tensor                    # (n, L, 3) CA positions / frame translations, Angstrom
    rot: torch.Tensor                   # (n, L, 3, 3) frame rotations (public IR convention)
    metadata: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def backbone(self) -> torch.Tensor:
        """(n, L, 4, 3) N, CA, C, O."""
        from digfast.protein.backbone import backbone_atoms

        return backbone_atoms(self.tr, self.rot)

    def save(self, path, sequence: str):
        from digfast.protein.output import save_backbones

        return save_backbones(path, self.tr, self.rot, sequence)


def reference_score_fn(model: ProteinScoreModel, single: torch.Tensor, pair: torch.Tensor):
    """score_fn(tr, rot, step) of the public way: the reference model, one structure per call."""
    dt = next(model.parameters()).dtype
    single, pair = single.to(dt)[None], pair.to(dt)[None]

    def score(tr, rot, step):
        outs = []
        with torch.no_grad():
            for b in range(tr.shape[0]):
                outs.append(model(tr[b:b + 1].to(dt), rot[b:b + 1].to(dt), torch.tensor([step], device=tr.device),
                                  single, pair))
        return torch.cat([o[0] for o in outs]).to(tr.dtype), torch.cat([o[1] for o in outs]).to(tr.dtype)
    return score


def _on(model: ProteinScoreModel, device: torch.device, dtype) -> ProteinScoreModel:
    """model on device in dtype: itself when it already is, else a copy (the caller's model
    is left as it was)."""
    p = next(model.parameters())
    same_device = p.device.type == device.type and (device.index is None or p.device.index == device.index)
    if same_device and p.dtype == dtype:
        return model.eval()
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def fast_score_fn(fast: FastProteinModel, single: torch.Tensor, pair: torch.Tensor):
    ctx = fast.context(single, pair)
    return lambda tr, rot, step: fast(ctx, tr, rot, step), ctx


def auto_batch_size(n: int, L: int, cfg, device: torch.device, path: str) -> int:
    """Structures per call from the transient memory one structure needs (the reference
    attention's (H, L, L, ...) tensors, or with the fused kernel per-residue activations
    only): a third of the free GPU memory (the estimate is low: on an H200 a CUDA graph of the
    fast step sized for half the free memory held 94 GB), or 2 GB on the CPU."""
    if path == "reference":
        return 1
    from digfast.ops import _backend

    if _backend.choose("ipa_attention", device) == "reference":  # (B, H, L, L, ...) transients
        per_sample = 4 * cfg.n_heads * L * L * (cfg.qk_points * 4 + 8) + 64 * L * cfg.d_model
    else:  # fused kernel: per-residue activations and the (H, L, d_pair) pair sums only
        per_sample = 4 * L * (16 * cfg.d_model + 2 * cfg.n_heads * cfg.d_pair)
    budget = 2 * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 3
    return max(1, min(n, budget // per_sample))


def _enforce_validity(draw, tr, rot, ids, seed, check, on_invalid, max_attempts, counts):
    """Redraw (derived seeds), drop or keep the structures of one batch that fail check."""
    from digfast.protein.validity import valid
    from digfast.validity import redraw_seed

    ok = valid(check, tr, rot)
    counts["n_invalid_draws"] += int((~ok).sum())
    if on_invalid == "keep":
        return tr, rot, ids
    attempt = 1
    while on_invalid == "redraw" and not ok.all() and attempt < max_attempts:
        bad = (~ok).nonzero().flatten()
        tr_new, rot_new = draw(ids[bad], redraw_seed(seed, attempt), tick=False)
        tr[bad], rot[bad] = tr_new, rot_new
        counts["n_redrawn"] += len(bad)
        ok_new = valid(check, tr_new, rot_new)
        counts["n_invalid_draws"] += int((~ok_new).sum())
        ok[bad] = ok_new
        attempt += 1
    counts["dropped_ids"] += ids[~ok].tolist()
    return tr[ok], rot[ok], ids[ok]


def sample_protein(model: ProteinScoreModel, single, pair, n: int = 1, *, sampler: str = "public",
                   steps: int = 500, seed: int = 0, batch_size="auto", dtype="fp32", device="cpu",
                   path: str = "fast", out=None, sequence: str | None = None, first_sample_id: int = 0,
                   progress: bool = False, init=None, cuda_graph: bool = True,
                   keep: bool = True, validity=None, on_invalid: str = "redraw",
                   max_attempts: int = 10) -> ProteinSamples:
    """n structures of the protein with AlphaFold2 representations single (L, 384), pair
    (L, L, 128). out (.xtc/.pdb/.npz) streams each finished batch to disk (needs sequence).
    init = (tr (n, L, 3), rot (n, L, 3, 3)) replaces the random start (exact reproduction of a
    public run from its saved init state). On a GPU the fast path captures the step of the
    deterministic samplers ("public", "ode") in a CUDA graph (cuda_graph=False: eager).
    keep=False returns no structures (only the files written): for ensembles larger than
    memory. Structures with NaN/inf, or failing validity(tr, rot) -> (n,) bool (e.g.
    digfast.protein.validity.BackboneGeometry()), are redrawn from the start state of seed
    validity.redraw_seed(seed, attempt) (same sample id: reproducible, independent of batching)
    up to max_attempts draws, then dropped; on_invalid="drop" drops them at once, "keep" keeps
    them. The metadata counts invalid draws and lists dropped ids."""
    if on_invalid not in ("redraw", "drop", "keep"):
        raise ValueError(f"unknown on_invalid {on_invalid!r}: 'redraw', 'drop' or 'keep'")
    if int(max_attempts) < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if path not in ("fast", "reference"):
        raise ValueError(f"path must be 'fast' or 'reference', got {path!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out is not None and sequence is None:
        raise ValueError("writing structures needs the sequence (topology)")
    device = torch.device(device)
    single, pair = check_representations(single, pair)
    L = single.shape[0]
    if sequence is not None and len(sequence) != L:
        raise ValueError(f"sequence has {len(sequence)} residues, the representations {L}")
    torch_dtype = DTYPES[dtype]
    if path == "fast":
        if torch_dtype == torch.float64:
            raise ValueError("the fast path runs fp32 or bf16; fp64 is the reference path's")
        fast = FastProteinModel(_on(model, device, torch.float32), dtype=torch_dtype)
        score, ctx = fast_score_fn(fast, single.to(device), pair.to(device))
        state_dtype = torch.float64  # frames and updates in fp64 (L x 12 numbers): no drift
    else:
        model = _on(model, device, torch_dtype)
        score = reference_score_fn(model, single.to(device), pair.to(device))
        state_dtype = torch_dtype
    bs = auto_batch_size(n, L, model.cfg, device, path) if batch_size in (None, "auto") else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size}")
    writer = None
    if out is not None:
        from digfast.protein.output import BackboneWriter
        writer = BackboneWriter(out, sequence)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=-(-n // bs) * steps, desc=f"{sampler} x{steps}", unit="step", leave=False)
    trs, rots = [], []
    counts = {"n_invalid_draws": 0, "n_redrawn": 0, "dropped_ids": []}
    graphs = {}
    use_graph = (cuda_graph and path == "fast" and device.type == "cuda"
                 and sampler in GRAPH_SAMPLERS)
    start = time.perf_counter()
    try:
        for lo in range(0, n, bs):
            ids = torch.arange(first_sample_id + lo, first_sample_id + min(n, lo + bs))
            def draw(draw_ids, draw_seed, start=None, tick=True):
                if start is not None:
                    tr0, rot0 = (torch.as_tensor(a).to(device, state_dtype) for a in start)
                else:
                    tr0, rot0 = _sampler.initial_state(draw_seed, draw_ids, L, dtype=state_dtype, device=device)
                on_step = bar.update if bar and tick else None
                if use_graph and len(draw_ids) == len(ids):
                    if len(ids) not in graphs:
                        graphs[len(ids)] = GraphedSampler(fast, ctx, len(ids), sampler=sampler, steps=steps,
                                                          device=device)
                    tr_, rot_ = graphs[len(ids)].run(tr0, rot0, on_step=on_step)
                else:
                    tr_, rot_ = _sampler.run(score, tr0, rot0, sampler=sampler, steps=steps, seed=draw_seed,
                                             sample_ids=draw_ids, on_step=on_step)
                out_dtype = torch.float64 if torch_dtype == torch.float64 else torch.float32
                return tr_.cpu().to(out_dtype), rot_.cpu().to(out_dtype)

            start_state = None if init is None else (init[0][lo:lo + len(ids)], init[1][lo:lo + len(ids)])
            tr, rot = draw(ids, seed, start_state)
            tr, rot, _ = _enforce_validity(draw, tr, rot, ids, seed, validity, on_invalid,
                                                  1 if init is not None else int(max_attempts), counts)
            if writer is not None:
                writer.write(tr, rot)
            if keep:
                trs.append(tr)
                rots.append(rot)
    except BaseException:
        if writer is not None:
            writer.close(ok=False)
        raise
    seconds = time.perf_counter() - start
    files = writer.close() if writer is not None else []
    if bar:
        bar.close()
    meta = {"sampler": sampler, "steps": steps, "seed": seed, "n": n, "L": L, "batch_size": bs, "path": path,
            "dtype": dtype, "device": str(device), "seconds": seconds, "structures_per_second": n / seconds,
            "first_sample_id": first_sample_id, "cuda_graph": use_graph, **counts,
            "n_returned": n - len(counts["dropped_ids"])}
    if not keep:
        return ProteinSamples(tr=torch.empty(0, L, 3), rot=torch.empty(0, L, 3, 3), metadata=meta, files=files)
    return ProteinSamples(tr=torch.cat(trs), rot=torch.cat(rots), metadata=meta, files=files)
