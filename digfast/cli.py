"""Command line: digfast sample | likelihood | train | info."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from digfast import cli_property, cli_protein
from digfast.arguments import check_device


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _batch_size(text: str):
    return "auto" if text == "auto" else _positive_int(text)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def _add_common(p):
    p.add_argument("--model", default="mixture", help="built-in model name (default: mixture)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=_batch_size, default="auto", help="a positive integer or auto")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch and the C++ ops")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    from digfast.likelihood import DIVERGENCES
    from digfast.samplers import SAMPLERS

    ap = argparse.ArgumentParser(prog="digfast", description="Fast DiG sampling and likelihoods.")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="draw an ensemble and report it")
    _add_common(s)
    s.add_argument("--system", default=None, help="sample the shipped model of this system (same as --model)")
    s.add_argument("-n", type=_positive_int, default=2000, help="number of samples")
    s.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the model's)")
    s.add_argument("--sampler", default="ancestral", choices=sorted(SAMPLERS))
    s.add_argument("-o", "--output", default=None, help="ensemble file (.xtc/.dcd/.trr/.pdb/.npz)")
    s.add_argument("--plot", default=None, help="PNG against the reference: energy histogram, or the Ramachandran "
                   "free-energy surface for alanine dipeptide")
    s.add_argument("--json", default=None, help="write the report as JSON here")
    s.add_argument("--out-dir", default=None, help="write the ensemble into this folder as resumable chunk files "
                   "(needed under torchrun, and for ensembles larger than memory)")
    s.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="samples per chunk file (default: about 64 MiB of positions; with --resume: the folder's)")
    s.add_argument("--resume", action="store_true", help="finish the run in --out-dir, keeping its finished chunks")
    s.add_argument("--on-nonfinite", default="redraw", choices=["redraw", "drop", "keep"],
                   help="samples with NaN/inf: redraw with a derived seed (default), drop, or keep")
    s.add_argument("--max-energy", type=float, default=None, help="reject samples above this energy (kT)")
    s.add_argument("--min-distance", type=float, default=None,
                   help="reject samples where atoms more than two bonds apart come closer than this")
    s.add_argument("--bond-tolerance", type=float, default=None,
                   help="reject samples with a bond off its reference length by more than this")
    s.add_argument("--on-invalid", default="drop", choices=["redraw", "drop"],
                   help="rejected samples: drop (default), or redraw until n valid samples")
    s.add_argument("--max-attempts", type=_positive_int, default=10, help="draws per sample before it is dropped")
    cli_property.add_guide_args(s)

    lk = sub.add_parser("likelihood", help="log p of structures along the probability-flow ODE")
    _add_common(lk)
    lk.add_argument("input", help="structures: .npz/.npy from digfast, or a trajectory with --top")
    lk.add_argument("--top", default=None)
    lk.add_argument("--divergence", default="auto", choices=list(DIVERGENCES),
                    help="auto: forward-mode exact for small systems, forward-mode Hutchinson "
                         "otherwise; exact / hutchinson are the reverse-mode references")
    lk.add_argument("--probes", type=int, default=8)
    lk.add_argument("--method", default="rk4", choices=["euler", "heun", "rk4", "dopri5"])
    lk.add_argument("--steps", type=int, default=100)
    lk.add_argument("-o", "--output", default=None, help="write log p per structure (.npy)")

    tr = sub.add_parser("train", help="train a score model on structures (denoising score matching)")
    tr.add_argument("--system", required=True, help="system with a training recipe (dw4, lj13, alanine-dipeptide)")
    tr.add_argument("--data", default=None,
                    help="training structures (.npy/.npz; default: the system's shipped training split)")
    tr.add_argument("--val", default=None, help="validation structures (default: last 5%% of --data)")
    tr.add_argument("--out", required=True, help="folder for the trained model (config.json + safetensors)")
    tr.add_argument("--run-dir", default=None, help="checkpoints (default: OUT/run)")
    tr.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--tsm-sigma", type=float, default=None,
                    help="learn small-noise scores from the system's forces below this sigma/alpha (0: off)")
    tr.add_argument("--t-power", type=float, default=None,
                    help="training times t = t_min + (t_max - t_min) u^p, u uniform: p > 1 trains the "
                         "small and middle noise levels more (default: the recipe's, 1)")
    tr.add_argument("--network", type=_network_sizes, default=None, metavar="KEY=N,...",
                    help="network sizes replacing the recipe's, e.g. layers=6,width=128,heads=8,ffn=256,"
                         "gaussians=64")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu", help="cpu or cuda (DSM and PIDP); batches are "
                    "drawn on the CPU, so a seed gives the same run on either")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --run-dir")
    tr.add_argument("--init", default=None, help="fine-tune: start from this trained model (name or folder) "
                    "with a fresh optimiser and learning-rate schedule")
    tr.add_argument("--pidp", action="store_true",
                    help="pre-train from the energy alone (PIDP) on low-energy candidates; with --data, "
                         "then fine-tune by DSM on those structures")
    tr.add_argument("--pidp-steps", type=int, default=None, help="PIDP steps (default: the recipe's)")
    tr.add_argument("--candidates", type=int, default=None, help="PIDP candidate structures (default: the recipe's)")
    tr.add_argument("--residual-weight", type=_non_negative_float, default=None,
                    help="PIDP: weight of the Fokker-Planck residual (default 1; 0 leaves it out)")
    tr.add_argument("--mc-weight", type=_non_negative_float, default=None,
                    help="PIDP: weight of the energy-only Monte-Carlo score term (default 0: off)")
    tr.add_argument("--mc-samples", type=_positive_int, default=None,
                    help="PIDP: proposal pairs per point of the Monte-Carlo score (default 256)")
    tr.add_argument("--prior-width", type=float, default=None,
                    help="learn the score's difference from one built from the energy, whose wells have this "
                         "width in normalised units (e.g. 0.1); default: no prior")
    tr.add_argument("--prior-cap", type=float, default=100.0, help="cap on each atom's energy score (normalised units)")
    tr.add_argument("--prior-onset", type=float, default=0.0,
                    help="> 0: the network's share of the score vanishes at t = 0, switching on near this sigma")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--quiet", action="store_true")

    cli_property.add_parsers(sub)
    cli_protein.add_parsers(sub)
    sub.add_parser("info", help="versions and which backends this install has")
    return ap


REPORT_MAX_SAMPLES = 200_000  # the report of an on-disk ensemble reads at most this many


def _validity(args):
    from digfast.validity import BondLengths, Clashes, EnergyCutoff, all_of

    return all_of(EnergyCutoff(args.max_energy) if args.max_energy is not None else None,
                  BondLengths(args.bond_tolerance) if args.bond_tolerance is not None else None,
                  Clashes(args.min_distance) if args.min_distance is not None else None)


def _cmd_sample(args) -> int:
    import digfast
    from digfast import distributed
    from digfast.ensemble import sample_ensemble
    from digfast.io import atomic_write_bytes, check_output_path
    from digfast.report import ensemble_report, format_report, plot_ensemble

    if args.output:  # fail before the run, not after it
        check_output_path(args.output)
    for extra in (args.plot, args.json):
        if extra and not Path(extra).parent.exists():
            raise FileNotFoundError(f"output folder {Path(extra).parent} does not exist")
    if args.resume and not args.out_dir:
        raise ValueError("--resume needs --out-dir: the folder of the run to finish")
    ranks = distributed.from_env(args.device)
    if ranks.world_size > 1 and not args.out_dir:
        raise ValueError(f"a distributed run ({ranks.world_size} ranks) needs --out-dir for its chunk files")
    name = args.system or args.model
    model = digfast.load(name)
    kw = dict(steps=args.steps, sampler=args.sampler, batch_size=args.batch_size, seed=args.seed,
              on_nonfinite=args.on_nonfinite, validity=_validity(args), on_invalid=args.on_invalid,
              max_attempts=args.max_attempts)
    if cli_property.guidance_from_args(args) is not None:
        if args.out_dir:
            raise ValueError("--guide does not yet work with --out-dir")
        kw["guidance"] = cli_property.guidance_from_args(args)
    ensemble = None
    if args.out_dir:
        ensemble = sample_ensemble(model, args.out_dir, args.n, model_name=name, chunk_size=args.chunk_size,
                                   resume=args.resume, device=args.device, ranks=ranks,
                                   progress=not args.quiet and ranks.is_main, **kw)
        if not ranks.is_main:
            return 0
        result = ensemble.to_result(max_samples=REPORT_MAX_SAMPLES)
    else:
        result = digfast.sample_batch(model, n=args.n, device=args.device, progress=not args.quiet, **kw)
    if len(result) == 0:
        m = result.metadata
        raise RuntimeError(f"all {args.n} samples were rejected ({m['n_nonfinite']} NaN/inf and {m['n_invalid']} "
                           "invalid draws): loosen the validity filters or raise --max-attempts")
    system = result.system
    reference = (system.reference_samples(len(result), seed=args.seed + 1)
                 if hasattr(system, "reference_samples") else None)
    rep = ensemble_report(result, reference)
    print(format_report(rep))
    if ensemble is not None:
        print(f"  ensemble           {len(ensemble)} samples in {args.out_dir} ({len(ensemble.chunks)} chunks)")
    if result.metadata.get("n_dropped") or result.metadata.get("n_redrawn"):
        print(f"  rejected           {result.metadata['n_nonfinite']} NaN/inf and {result.metadata['n_invalid']} "
              f"invalid draws; {result.metadata['n_redrawn']} samples redrawn, {result.metadata['n_dropped']} dropped")
    if args.output:
        for path in (ensemble.export(args.output) if ensemble is not None else result.save(args.output)):
            print(f"  wrote              {path}")
    if args.plot:
        print(f"  wrote              {plot_ensemble(result, reference, args.plot)}")
    if args.json:
        text = json.dumps({"report": rep, "metadata": result.metadata}, indent=2, default=str)
        print(f"  wrote              {atomic_write_bytes(args.json, text.encode())}")
    return 0


def _cmd_likelihood(args) -> int:
    import numpy as np

    import digfast
    from digfast.io import load_positions

    model = digfast.load(args.model)
    x = load_positions(args.input, top=args.top)
    res = digfast.log_likelihood(model, positions=x, divergence=args.divergence, probes=args.probes,
                                 method=args.method, steps=args.steps, seed=args.seed,
                                 batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    lp = res.log_prob
    print(f"digfast: log p of {len(lp)} structures: mean {float(lp.mean()):.4f}  std {float(lp.std()):.4f}  "
          f"({args.divergence}, {args.method} x{args.steps}, {res.n_evals} score calls)")
    if args.output:
        from digfast.io import atomic_path

        with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
            np.save(f, lp.numpy())
        print(f"  wrote {args.output}")
    return 0


NETWORK_SIZES = ("layers", "width", "heads", "ffn", "gaussians", "max_path")


def _network_sizes(text: str) -> dict:
    """'layers=6,width=128' -> {"layers": 6, "width": 128}; unknown keys and non-positive sizes refused."""
    sizes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in NETWORK_SIZES:
            raise argparse.ArgumentTypeError(f"unknown network size {key!r}; known: {', '.join(NETWORK_SIZES)}")
        try:
            sizes[key] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} must be an integer, got {value!r}") from None
        if sizes[key] < (0 if key == "max_path" else 1):
            raise argparse.ArgumentTypeError(f"{key} must be positive, got {sizes[key]}")
    return sizes


def _cmd_train(args) -> int:
    check_device(args.device)  # before any data are read or forces computed
    from digfast.training.recipes import build_pidp_trainer, build_trainer, train_and_save

    out = Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out / "run"
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr), ("tsm_sigma", args.tsm_sigma),
                                   ("t_power", args.t_power)) if v is not None}
    init = args.init
    prior = None if args.prior_width is None else {"name": "boltzmann", "width": args.prior_width,
                                                   "cap": args.prior_cap, "onset": args.prior_onset}
    pidp_terms = {k: v for k, v in (("pidp_residual_weight", args.residual_weight), ("pidp_mc_weight", args.mc_weight),
                                     ("pidp_mc_samples", args.mc_samples)) if v is not None}
    if pidp_terms and not args.pidp:
        raise ValueError("--residual-weight, --mc-weight and --mc-samples shape the PIDP loss: add --pidp")
    if args.pidp:
        pidp_out = out / "pidp" if args.data else out
        trainer, report = build_pidp_trainer(args.system, pidp_out / "run" if args.data else run_dir,
                                             steps=args.pidp_steps, seed=args.seed, resume=args.resume,
                                             candidates=args.candidates, prior=prior, network=args.network,
                                             overrides=pidp_terms)
        trainer.to(args.device)
        print(f"digfast: {report.n} PIDP candidates in {report.seconds:.1f} s ({report.energy_evaluations} energy "
              f"evaluations; mean energy {report.energy_mean:.2f})")
        folder = train_and_save(trainer, pidp_out, progress=not args.quiet)
        print(f"digfast: PIDP {trainer.step} steps; model in {folder}")
        if not args.data:
            return 0
        # the DSM stage goes on from the PIDP model, prior, network and all
        init, args.resume, prior, args.network = str(folder), False, None, None
    trainer = build_trainer(args.system, args.data, args.val, run_dir, steps=args.steps, seed=args.seed,
                            resume=args.resume, overrides=overrides, init=init, prior=prior,
                            network=args.network).to(args.device)
    folder = train_and_save(trainer, out, progress=not args.quiet)
    last = trainer.history[-1] if trainer.history else {}
    print(f"digfast: trained {args.system} for {trainer.step} steps; val loss {last.get('val_loss', float('nan')):.4f}; "
          f"model in {folder} (load with digfast.load({str(folder)!r}))")
    return 0


def _cmd_info(args) -> int:
    import digfast
    from digfast.ops import _backend

    C = _backend.compiled()
    info = {"digfast": digfast.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "compiled_core": C is not None,
            "build": C.build_info() if C is not None and hasattr(C, "build_info") else None,
            "triton": _backend.triton_available(),
            "cuda_available": torch.cuda.is_available(),
            "sampler_step_backend_cpu": _backend.choose("sampler_step", torch.device("cpu"))}
    print(json.dumps(info, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        commands = {"sample": _cmd_sample, "likelihood": _cmd_likelihood, "train": _cmd_train, "info": _cmd_info,
                    **cli_property.COMMANDS, **cli_protein.COMMANDS}
        return commands[args.command](args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"digfast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
