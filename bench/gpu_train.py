"""Particle models on a GPU: train variants side by side for a wall-clock budget, then score each
beside the shipped models of its system (bench/accuracy.py's statistics, same samples).

    python bench/gpu_train.py --data runs/lj13_train.npz --minutes 6 --out $OUT/gpu_train --device cuda

A variant is NAME:key=value,... of TrainConfig fields, plus system=lj13|dw4 (default lj13):
 - objective dsm (default): fine-tune the system's shipped model on --data (LJ-13; issue 3's target,
   W1 <= 2x the floor, is out of CPU reach: each 24k CPU steps at batch 128 gained 1-7%,
   bench/RESULTS.md session 11); with scratch=1 or network sizes (layers, width, heads, ffn,
   gaussians) it trains the recipe's or that network from scratch instead (capacity vs steps);
 - objective=pidp: from the energy alone, from scratch (issue 6; the Monte-Carlo score costs 2.1 s a
   step for LJ-13 on one CPU core, and its bias falls with the proposals per point).
Small particle models leave a GPU mostly idle, so the variants train side by side, one process
each, for about the time of one. Each calibrates its steps/s on the first steps, sets its cosine
schedule to end at the budget, and stops at the deadline in any case. Every variant's model
(config.json + safetensors, about 1 MB) and history land in --out, with accuracy.json and the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from accuracy import evaluate, parse_runs  # noqa: E402
from common import environment  # noqa: E402

MC = "objective=pidp,pidp_residual_weight=0,pidp_mc_weight=1"
DEFAULT_VARIANTS = ["b1024:batch_size=1024,lr=2e-4", "b4096:batch_size=4096,lr=3e-4",
                    "b4096-slow:batch_size=4096,lr=1e-4",
                    "scratch:scratch=1,batch_size=512,lr=5e-4", "wide:width=256,heads=16,ffn=512,batch_size=512,lr=5e-4",
                    f"lj13-mc:{MC},pidp_mc_samples=1024,batch_size=64",
                    f"dw4-mc:system=dw4,{MC},pidp_mc_samples=4096,batch_size=128,t_power=2"]
BASELINES = {"lj13": ["lj13"], "dw4": ["dw4", "dw4-energy-mc"]}  # shipped models scored beside the variants
NETWORK_KEYS = ("layers", "width", "heads", "ffn", "gaussians")
CALIBRATION_STEPS = 200


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,...' -> (name, settings): TrainConfig overrides (numbers, or objective
    dsm|pidp) and the system (lj13 unless given)."""
    from digfast.training import TrainConfig

    name, _, settings = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variant {text!r}: give name:key=value,... with a plain name")
    out = {"system": "lj13"}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq or (key not in TrainConfig.__dataclass_fields__ and key not in ("system", "scratch", *NETWORK_KEYS)):
            raise ValueError(f"variant {text!r}: {item!r} is not key=value of a TrainConfig field, system, "
                             f"scratch or a network size")
        choices = {"objective": ("dsm", "pidp"), "system": tuple(BASELINES)}.get(key)
        if choices is not None:
            if value not in choices:
                raise ValueError(f"variant {text!r}: {key} is one of {choices}")
            out[key] = value
        else:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    if out["system"] != "lj13" and out.get("objective") != "pidp":
        raise ValueError(f"variant {text!r}: DSM variants fine-tune LJ-13 on --data; other systems train by PIDP")
    return name, out


def train_one(args, name: str, settings: dict) -> None:
    """Train this variant until args.deadline (time.time())."""
    from digfast.training.recipes import build_pidp_trainer, build_trainer

    torch.set_num_threads(args.threads)
    folder = Path(args.out) / name
    system = settings["system"]
    network = {k: settings[k] for k in NETWORK_KEYS if k in settings}
    overrides = {k: v for k, v in settings.items() if k not in ("system", "scratch", *NETWORK_KEYS)}
    overrides.update(steps=10**9, checkpoint_every=10**9)  # the real step count comes from the calibration
    if settings.get("objective") == "pidp":  # from the energy alone, from scratch: no data, no init
        trainer, _ = build_pidp_trainer(system, run_dir=folder / "run", seed=args.seed, overrides=overrides,
                                        network=network or None)
    else:
        scratch = bool(network) or bool(settings.get("scratch"))
        trainer = build_trainer(system, args.data, run_dir=folder / "run", seed=args.seed,
                                init=None if scratch else args.init or system, overrides=overrides,
                                network=network or None)
    trainer.to(args.device)
    deadline = time.monotonic() + args.deadline - time.time() - 15  # leave time to save
    trainer.fit(progress=False, until=20, deadline=deadline)  # warm-up: allocator, cuBLAS handles
    start, first = time.perf_counter(), trainer.step
    trainer.fit(progress=False, until=20 + CALIBRATION_STEPS, deadline=deadline)
    rate = (trainer.step - first) / (time.perf_counter() - start)
    trainer.cfg.steps = trainer.step + max(1, int(0.92 * rate * (deadline - time.monotonic())))
    trainer.cfg.val_every = max(trainer.cfg.val_every, trainer.cfg.steps // 20)
    trainer.fit(progress=False, deadline=deadline)
    model = trainer.ema_model()
    model.info["gpu_train"] = {"variant": name, "settings": settings, "calibrated_steps_per_s": rate,
                               "planned_steps": trainer.cfg.steps, "steps": trainer.step, "device": args.device}
    model.save(folder)
    (folder / "history.json").write_text(json.dumps(trainer.history, indent=1))
    print(f"{name}: {trainer.step} steps ({rate:.1f}/s calibrated), val loss "
          f"{trainer.history[-1]['val_loss'] if trainer.history else float('nan'):.4f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="LJ-13 training structures (scripts/make_particle_data.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=6.0, help="training wall-clock budget")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--init", default=None, help="model the DSM variants fine-tune (default: the shipped lj13)")
    ap.add_argument("--variant", action="append", default=None,
                    help=f"name:key=value,... (repeatable; default {DEFAULT_VARIANTS})")
    ap.add_argument("-n", type=int, default=5000, help="samples per scored run (the floor needs 2n reference)")
    ap.add_argument("--runs", default="ancestral:500,dpm++2m-sde:50")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per variant's process")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: train this variant
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    variants = dict(parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS))
    if args.one is not None:
        return train_one(args, args.one, variants[args.one])
    if not Path(args.data).is_file():
        ap.error(f"no such file: {args.data} (make it with scripts/make_particle_data.py --system lj13)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60 * args.minutes
    passed = list(argv if argv is not None else sys.argv[1:])
    children = {name: subprocess.Popen([sys.executable, __file__, *passed, "--one", name, "--deadline", str(deadline)])
                for name in variants}
    codes = {name: child.wait() for name, child in children.items()}
    print("training exit codes:", codes, flush=True)

    runs = parse_runs(args.runs)
    models = {}  # label -> (system, model name or folder)
    for system in dict.fromkeys(s["system"] for s in variants.values()):
        baselines = [args.init] if system == "lj13" and args.init else BASELINES[system]
        models.update({f"shipped {b}": (system, b) for b in baselines})
        models.update({name: (system, str(out / name)) for name, s in variants.items()
                       if s["system"] == system and (out / name / "config.json").exists()})
    rows = []
    for label, (system, model) in models.items():
        for row in evaluate(system, model, args.n, runs, args.seed, progress=False, device=args.device):
            row["variant"] = label
            rows.append(row)
    trained = {name: json.loads((out / name / "config.json").read_text())["info"].get("gpu_train")
               for name in variants if (out / name / "config.json").exists()}
    (out / "accuracy.json").write_text(json.dumps({"environment": environment(), "minutes": args.minutes,
                                                   "variants": variants, "trained": trained, "rows": rows,
                                                   "exit_codes": codes}, indent=1))
    print(f"{'variant':22} {'system':6} {'sampler':12} {'steps':>5} {'n':>5} {'statistic':17} {'value':>9} "
          f"{'floor':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['variant']:22} {r['system']:6} {r['sampler']:12} {r['steps']:5d} {r['samples']:5d} "
              f"{r['statistic']:17} {r['value']:9.4g} {r['floor']:9.4g} {r['ratio']:6.3g}")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
