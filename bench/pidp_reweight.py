"""Energy-only DW-4 models as Boltzmann generators: their samples reweighted to exp(-E/kT).

A model trained without samples (PIDP) draws a biased ensemble, but with its exact log
density each sample gets the importance weight w = exp(-E/kT) / p_model, and weighted
statistics estimate the equilibrium ones with no sample from it. Samples come from the
fourth-order probability-flow ODE (rk4) and log p along the same decoding path, exact
divergence (digfast.sample_with_likelihood). A stochastic sampler's samples follow another
density; and integrating log p back from the samples in a second pass lets a few stiff paths
stray, tens of nats off: that way (rk4 x400 both ways, n 2000) one sample took all the weight
even for the DSM dw4 model (ESS 1.0; 1693 this way at x200).

The accuracy statistics of bench/accuracy.py are reported twice: unweighted (the model's own
ensemble) and weighted, beside two floors: n reference structures (as in accuracy.py) and
round(ESS) of them, the noise a weighted estimate of that effective size carries.

    OMP_NUM_THREADS=1 python scripts/dw4_parallel_tempering.py --save runs/dw4_pt.npz   # 7 min
    OMP_NUM_THREADS=1 python bench/pidp_reweight.py -n 2000 --equilibrium runs/dw4_pt.npz \
        --json bench/issue6/dw4_reweight.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import digfast
from digfast import reweight
from digfast.accuracy import particle_statistics, reference_sets

# where sampling stops and the likelihood starts: the models' training t_min. Below it the
# network extrapolates and the stiff ODE there (score ~ eps / sigma) spoils log p: the DSM dw4
# model reweighted to its own Boltzmann density (two passes, rk4 x400) has ESS 179 of 200 from
# 1e-3, 1 of 200 from 1e-5
T_MIN = 1e-3


def compare(system, positions, weights, ess: float, ref_a, ref_b, seed: int, floor_sets: int = 20) -> dict:
    unweighted = particle_statistics(system, positions, ref_a, ref_b)
    weighted = particle_statistics(system, positions, ref_a, ref_b, weights=weights)
    # floor at the effective size: reference subsets of round(ESS) structures against set A
    m = max(2, round(ess))
    g = torch.Generator().manual_seed(seed)
    floors = [particle_statistics(system, ref_b[torch.randperm(len(ref_b), generator=g)[:m]], ref_a, ref_b)
              for _ in range(floor_sets)]
    for k, row in enumerate(weighted):
        row["floor_at_ess"] = sum(f[k]["value"] for f in floors) / floor_sets
    return {"unweighted": unweighted, "weighted": weighted}


def evaluate(model_name: str, n: int, steps: int, seed: int, references: dict) -> dict:
    model = digfast.load(model_name)
    system = model.system
    t0 = time.perf_counter()
    out = digfast.sample_with_likelihood(model, n=n, method="rk4", steps=steps, divergence="exact", seed=seed,
                                         t_min=T_MIN)
    seconds = time.perf_counter() - t0
    energy = system.energy(out.positions.double())
    log_w = reweight.log_weights(energy, out.log_prob)
    ess = reweight.effective_sample_size(log_w)
    weights = torch.from_numpy(log_w).exp()
    return {"model": model_name, "n": n, "sampler": f"rk4 x{steps}", "ess": ess, "seconds": seconds,
            "max_weight": float(weights.max() / weights.sum()),
            "against": {label: compare(system, out.positions, weights, ess, a, b, seed)
                        for label, (a, b) in references.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dw4", "dw4-energy-mc", "dw4-pidp"], help="model names or folders")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=200,
                    help="rk4 steps (the DSM dw4 model, n=200: ESS 178.8 at x200 and at x400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--equilibrium", default=None,
                    help="npz of structures at equilibrium under the energy (scripts/dw4_parallel_tempering.py "
                         "--save): compare with it too (the public reference's mode populations are not)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    system = digfast.load(args.models[0]).system
    references = {"reference": reference_sets(system.reference_data(), args.n, args.seed)}
    if args.equilibrium:
        references["equilibrium"] = reference_sets(digfast.io.load_positions(args.equilibrium), args.n, args.seed)
    results = []
    print(f"{'model':16} {'against':11} {'ESS':>7} {'statistic':17} {'unweighted':>10} {'weighted':>10} "
          f"{'floor':>8} {'floor@ESS':>9}")
    for name in args.models:
        r = evaluate(name, args.n, args.steps, args.seed, references)
        results.append(r)
        print(f"{name}: {r['seconds']:.0f} s, largest weight {r['max_weight']:.3f}")
        for label, c in r["against"].items():
            for u, w in zip(c["unweighted"], c["weighted"]):
                print(f"{name:16} {label:11} {r['ess']:7.1f} {u['statistic']:17} {u['value']:10.4f} "
                      f"{w['value']:10.4f} {u['floor']:8.4f} {w['floor_at_ess']:9.4f}", flush=True)
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d", time.gmtime()), "settings": vars(args)}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
