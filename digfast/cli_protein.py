"""`digfast sample-protein`: structures of one protein from a public-layout DiG protein
checkpoint, AlphaFold2 representations and the sequence, streamed to XTC/PDB/NPZ."""
from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub):
    p = sub.add_parser("sample-protein", help="sample backbones of a protein with a DiG protein checkpoint")
    p.add_argument("--checkpoint", required=True, help="public-layout checkpoint (.pth with a state_dict)")
    p.add_argument("--inputs", required=True, help="AlphaFold2 single (L, 384) + pair (L, L, 128): .npz or .pkl")
    p.add_argument("--fasta", required=True, help="the sequence (FASTA, one-letter codes)")
    p.add_argument("-n", type=int, default=10, help="structures to draw")
    p.add_argument("-o", "--out", required=True, help="output: .xtc (+ _top.pdb), .pdb (models) or .npz (frames)")
    p.add_argument("--sampler", default="public", choices=["public", "sde", "ode", "dpm2m"],
                   help="public: the public deterministic 500-step update (default)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-sample-id", type=int, default=0, help="resume or split a run: ids start here")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp64"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--path", default="fast", choices=["fast", "reference"],
                   help="reference: the public way (one structure per call); fast: batched, precomputed")
    p.add_argument("--init-state", default=None,
                   help="npz with tr (L, 3) / rot_mat (L, 3, 3) (a public *_init_state.npz) or (n, L, ...) arrays")
    p.add_argument("--ca-tolerance", type=float, default=None,
                   help="reject structures with a consecutive CA-CA distance off 3.8 A by more than this")
    p.add_argument("--min-ca-distance", type=float, default=None,
                   help="reject structures with two non-adjacent C-alphas closer than this (A)")
    p.add_argument("--on-invalid", default="redraw", choices=["redraw", "drop", "keep"],
                   help="NaN/inf or rejected structures: redraw (derived seed), drop or keep")
    p.add_argument("--max-attempts", type=int, default=10)
    p.add_argument("--json", default=None, help="write the run's metadata here")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")


def _init_state(path, n):
    import numpy as np
    import torch

    with np.load(path) as data:
        tr, rot = torch.from_numpy(data["tr"]).double(), torch.from_numpy(data["rot_mat"]).double()
    if tr.dim() == 2:
        tr, rot = tr.expand(n, -1, -1), rot.expand(n, -1, -1, -1)
    if tr.shape[0] < n:
        raise ValueError(f"{path} holds {tr.shape[0]} initial states, {n} asked for")
    return tr, rot


def _validity(args):
    from digfast.protein.validity import BackboneGeometry

    if args.ca_tolerance is None and args.min_ca_distance is None:
        return None
    return BackboneGeometry(tolerance=args.ca_tolerance if args.ca_tolerance is not None else float("inf"),
                            min_distance=args.min_ca_distance or 0.0)


def _cmd_sample_protein(args) -> int:
    import torch

    from digfast.models.protein import load_official_protein
    from digfast.protein.engine import sample_protein
    from digfast.protein.inputs import read_fasta, read_representations

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_official_protein(args.checkpoint)
    single, pair = read_representations(args.inputs)
    sequence = read_fasta(args.fasta)
    init = _init_state(args.init_state, args.n) if args.init_state else None
    res = sample_protein(model, single, pair, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
                         batch_size=args.batch_size, dtype=args.dtype, device=device, path=args.path, out=args.out,
                         sequence=sequence, first_sample_id=args.first_sample_id, progress=not args.quiet, init=init,
                         validity=_validity(args), on_invalid=args.on_invalid, max_attempts=args.max_attempts)
    meta = res.metadata
    if meta["n_invalid_draws"]:
        print(f"digfast: {meta['n_invalid_draws']} invalid draws (NaN/inf or rejected), {meta['n_redrawn']} redrawn, "
              f"{len(meta['dropped_ids'])} dropped")
    print(f"digfast: {meta['n_returned']} structures of {meta['L']} residues in {meta['seconds']:.1f} s "
          f"({meta['structures_per_second']:.3g} structures/s, {args.sampler} x{args.steps}, {args.dtype}, "
          f"{meta['device']}); wrote {', '.join(str(p) for p in res.files)}")
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "files": [str(p) for p in res.files]}, indent=1))
    return 0


COMMANDS = {"sample-protein": _cmd_sample_protein}
