"""PIDP demonstration: train from the energy alone, then score the samples against held-out data.

    python bench/pidp_demo.py --system dw4 [--steps 3000] [--layers 2 --width 32] [--json out.json]
    python bench/pidp_demo.py --system dw4 --steps 0 --prior-width 0.15   # the energy-built prior alone
    python bench/pidp_demo.py --system dw4 --steps 8000 --residual-weight 0 --mc-weight 1 \
        --mc-samples 1024 --batch-size 128                                 # Monte-Carlo term alone

Prints the candidate cost, the training time and the accuracy report's statistics (energy
and distance W1 beside their noise floors, held-out public validation split) for the
ancestral and SDE-DPM++ samplers. No equilibrium sample is used before the evaluation.
"""
from __future__ import annotations

import argparse
import json
import time

import digfast
from accuracy import evaluate  # bench/ is on sys.path
from digfast.training.recipes import build_pidp_trainer, train_and_save

# the samplers every PIDP demonstration is scored with
RUNS = (("ancestral", 500), ("dpm++2m-sde", 50))


def scored(system: str, folder, n: int, label: str = "") -> list[dict]:
    """The accuracy report's rows for a trained model folder, printed as they come."""
    rows = evaluate(system, str(folder), n, RUNS, progress=False)
    for row in rows:
        print(f"{label}{row['sampler']:12s} {row['steps']:4d} {row['statistic']:12s} {row['value']:.4f} "
              f"floor {row['floor']:.4f} ratio {row['ratio']:.2f}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="dw4", choices=["dw4", "lj13"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--probes", type=int, default=None, help="0: exact divergence")
    ap.add_argument("--force-weight", type=float, default=None)
    ap.add_argument("--prior-weight", type=float, default=None)
    ap.add_argument("--t-power", type=float, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--prior-width", type=float, default=None,
                    help="score = energy-built prior + network correction (models/boltzmann_prior.py)")
    ap.add_argument("--prior-onset", type=float, default=0.0,
                    help="> 0: the network's share of the score vanishes at t = 0 (switches on near this sigma)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--init", default=None, help="go on from this PIDP-trained model (fresh optimiser)")
    ap.add_argument("--pidp-floor", type=float, default=None)
    ap.add_argument("--residual-weight", type=float, default=None, help="Fokker-Planck residual (0: left out)")
    ap.add_argument("--mc-weight", type=float, default=None, help="Monte-Carlo score term (pidp.monte_carlo_score)")
    ap.add_argument("--mc-samples", type=int, default=None, help="its proposals per point (x2, antithetic)")
    ap.add_argument("-n", type=int, default=2000, help="samples for the evaluation")
    ap.add_argument("--out", default="runs/pidp_demo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    network = {k: v for k, v in (("layers", args.layers), ("width", args.width)) if v is not None}
    if "width" in network:
        network.update(ffn=2 * network["width"])
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("pidp_probes", args.probes),
                                   ("pidp_force_weight", args.force_weight), ("pidp_prior_weight", args.prior_weight),
                                   ("t_power", args.t_power), ("lr", args.lr),
                                   ("pidp_floor", args.pidp_floor), ("pidp_residual_weight", args.residual_weight),
                                   ("pidp_mc_weight", args.mc_weight), ("pidp_mc_samples", args.mc_samples))
                 if v is not None}
    prior = None if args.prior_width is None else {"name": "boltzmann", "width": args.prior_width,
                                                   "onset": args.prior_onset}
    trainer, report = build_pidp_trainer(args.system, f"{args.out}/run", steps=args.steps, network=network,
                                         overrides=overrides, candidates=args.candidates,
                                         prior=prior, init=args.init)
    print(f"candidates: {report.n} in {report.seconds:.1f} s, {report.energy_evaluations} energy evaluations")
    start = time.perf_counter()
    folder = train_and_save(trainer, args.out, progress=True)
    train_seconds = time.perf_counter() - start
    model = digfast.load(str(folder))
    rows = scored(args.system, folder, args.n)
    out = {"system": args.system, "prior": prior, "candidates": vars(report), "train_steps": trainer.step,
           "train_seconds": train_seconds, "network": model.net.cfg.to_dict(), "rows": rows,
           "history": trainer.history}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
