"""Command line: digfast sample | likelihood | train | info."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


def _add_common(p):
    p.add_argument("--model", default="mixture", help="built-in model name (default: mixture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the C++ ops")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    from digfast.samplers import SAMPLERS

    ap = argparse.ArgumentParser(prog="digfast", description="Fast DiG sampling and likelihoods.")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="draw an ensemble and report it")
    _add_common(s)
    s.add_argument("--system", default=None, help="sample the shipped model of this system (same as --model)")
    s.add_argument("-n", type=int, default=2000, help="number of samples")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    s.add_argument("--sampler", default="ancestral", choices=sorted(SAMPLERS))
    s.add_argument("-o", "--output", default=None, help="ensemble file (.xtc/.dcd/.trr/.pdb/.npz)")
    s.add_argument("--plot", default=None, help="PNG against the reference: energy histogram, or the Ramachandran "
                   "free-energy surface for alanine dipeptide")
    s.add_argument("--json", default=None, help="write the report as JSON here")

    lk = sub.add_parser("likelihood", help="log p of structures along the probability-flow ODE")
    _add_common(lk)
    lk.add_argument("input", help="structures: .npz/.npy from digfast, or a trajectory with --top")
    lk.add_argument("--top", default=None)
    lk.add_argument("--divergence", default="hutchinson", choices=["exact", "hutchinson"])
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
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --run-dir")
    tr.add_argument("--init", default=None, help="fine-tune: start from this trained model (name or folder) "
                    "with a fresh optimiser and learning-rate schedule")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--quiet", action="store_true")

    sub.add_parser("info", help="versions and which backends this install has")
    return ap


def _cmd_sample(args) -> int:
    import digfast
    from digfast.report import ensemble_report, format_report, plot_ensemble

    if args.output:  # fail before the run, not after it
        out = Path(args.output)
        if not out.parent.exists():
            raise FileNotFoundError(f"output folder {out.parent} does not exist")
    model = digfast.load(args.system or args.model)
    result = digfast.sample_batch(model, n=args.n, steps=args.steps, sampler=args.sampler,
                                  batch_size=args.batch_size, seed=args.seed, device=args.device,
                                  progress=not args.quiet)
    system = result.system
    reference = system.reference_samples(args.n, seed=args.seed + 1) if hasattr(system, "reference_samples") else None
    rep = ensemble_report(result, reference)
    print(format_report(rep))
    if args.output:
        for path in result.save(args.output):
            print(f"  wrote              {path}")
    if args.plot:
        print(f"  wrote              {plot_ensemble(result, reference, args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"report": rep, "metadata": result.metadata}, indent=2, default=str))
        print(f"  wrote              {args.json}")
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
        np.save(args.output, lp.numpy())
        print(f"  wrote {args.output}")
    return 0


def _cmd_train(args) -> int:
    from digfast.training.recipes import build_trainer, train_and_save

    out = Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out / "run"
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr), ("tsm_sigma", args.tsm_sigma))
                 if v is not None}
    trainer = build_trainer(args.system, args.data, args.val, run_dir, steps=args.steps, seed=args.seed,
                            resume=args.resume, overrides=overrides, init=args.init)
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
    if getattr(args, "batch_size", None) not in (None, "auto"):
        args.batch_size = int(args.batch_size)
    try:
        commands = {"sample": _cmd_sample, "likelihood": _cmd_likelihood, "train": _cmd_train, "info": _cmd_info}
        return commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"digfast: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
