"""PIDP then DSM on a small data set, against DSM alone on the same data (issue: PIDP).

    python bench/pidp_mixed.py --system dw4 --data train_split_DW4.npy --pidp-model runs/pidp_dw4 \
        [--fraction 0.01] [--steps 5000] [--json out.json]

Arms, each trained by DSM for --steps on the same --fraction of --data (seeded draw):
  dsm           the system's recipe (with the PIDP model's network sizes) from scratch
  dsm+prior     the same with the PIDP model's energy-built prior (models/boltzmann_prior.py),
                so that what PIDP adds is separated from what the prior adds
  pidp+dsm      starting from the PIDP model's weights (fresh optimiser and schedule)
and all three are scored by the accuracy report (energy and distance W1 beside their floors,
held-out reference) with the ancestral and SDE-DPM++ samplers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import digfast
from digfast.training.recipes import build_trainer, load_structures, train_and_save
from pidp_demo import scored  # bench/ is on sys.path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="dw4", choices=["dw4", "lj13"])
    ap.add_argument("--data", required=True, help="the full training set; a --fraction of it is used")
    ap.add_argument("--pidp-model", required=True, help="folder of a PIDP-trained model")
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--arms", default="dsm,dsm+prior,pidp+dsm")
    ap.add_argument("-n", type=int, default=2000, help="samples for the evaluation")
    ap.add_argument("--out", default="runs/pidp_mixed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pidp = digfast.load(args.pidp_model)
    system = pidp.system
    full = load_structures(args.data, system)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    few = full[perm[:max(2, round(args.fraction * len(full)))]]
    few_path = out / "few.npy"
    np.save(few_path, few.numpy())
    # the same network as the PIDP model's in every arm
    sizes = {k: v for k, v in pidp.net.cfg.to_dict().items() if k in ("layers", "width", "heads", "ffn", "gaussians")}
    rows = []
    for arm in args.arms.split(","):
        kwargs = {"dsm": {"network": sizes}, "dsm+prior": {"prior": pidp.prior, "network": sizes},
                  "pidp+dsm": {"init": args.pidp_model}}[arm]
        trainer = build_trainer(args.system, str(few_path), run_dir=out / arm / "run", steps=args.steps, **kwargs)
        start = time.perf_counter()
        folder = train_and_save(trainer, out / arm, progress=True)
        seconds = time.perf_counter() - start
        for row in scored(args.system, folder, args.n, label=f"{arm:10s} "):
            rows.append({**row, "arm": arm, "train_seconds": seconds, "n_train": len(few)})
    if args.json:
        Path(args.json).write_text(json.dumps({"system": args.system, "pidp_model": args.pidp_model,
                                               "fraction": args.fraction, "n_train": len(few),
                                               "dsm_steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
