"""Guidance and reaction paths on the shipped DW-4 / LJ-13 models (numbers for bench/RESULTS.md).

Guidance: unguided vs guided mean of a property (DW-4 pair distance 0-1, LJ-13 radius of
gyration) with the noisy-trained predictor and with the Tweedie-denoised exact property,
and the energies of the guided samples beside the reference's.
Reaction path: DW-4 between its two states, highest energy on the latent path (linear and
spherical) vs the string-method saddle; writes the path trajectory and an energy plot.

    OMP_NUM_THREADS=1 python scripts/issue7_particles.py --out bench/issue7
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import digfast
from digfast.guidance import Guidance, parse_property
from digfast.neb import align, string_method
from digfast.paths import reaction_path
from digfast.property_model import train_property_model


def energy_stats(e):
    e = e.double()
    return {"median": float(e.median()), "q05": float(e.quantile(0.05)), "q95": float(e.quantile(0.95))}


def guidance_rows(name, prop, targets, n, steps, train_steps):
    model = digfast.load(name)
    f = parse_property(prop)
    ref = model.system.reference_samples(n, seed=1)
    base = digfast.sample_batch(model, n=n, steps=steps, sampler="dpm++2m", progress=False)
    t0 = time.time()
    noisy = train_property_model(model, prop, model.system.reference_data(), steps=train_steps, progress=None)
    rows = [{"system": name, "property": prop, "run": "reference", "mean": float(f(ref.double()).mean()),
             "energy": energy_stats(model.system.energy(ref))},
            {"system": name, "property": prop, "run": "unguided", "mean": float(f(base.positions.double()).mean()),
             "energy": energy_stats(base.energies())}]
    for target in targets:
        for label, g in (("noisy predictor", Guidance(noisy, target=target, std=0.1)),
                         ("tweedie exact property", Guidance(f, target=target, std=0.1, denoise=True, weight="signal"))):
            out = digfast.sample_batch(model, n=n, steps=steps, sampler="dpm++2m", progress=False, guidance=g)
            v = f(out.positions.double())
            rows.append({"system": name, "property": prop, "run": f"{label}, target {target}", "mean": float(v.mean()),
                         "std": float(v.std()), "energy": energy_stats(out.energies()),
                         "n_nonfinite": out.metadata.get("n_nonfinite")})
    rows.append({"system": name, "predictor_training_s": time.time() - t0})
    return rows


def dw4_path(out_dir: Path):
    model = digfast.load("dw4")
    s = model.system
    mins = []
    for x0 in s.reference_samples(40, seed=0):
        x = x0.double().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-10)

        def closure():
            opt.zero_grad()
            e = s.energy(x[None]).sum()
            e.backward()
            return e
        opt.step(closure)
        mins.append(x.detach())
    e = s.energy(torch.stack(mins))
    a = mins[int(torch.argmin(e))]
    b = [m for m in mins if int((torch.cdist(m[None], m[None])[0] < 3.5).sum() - 4) // 2 == 4][0]
    b = align(b, a)
    mep = string_method(s.energy, a, b)
    rows = [{"path": "string method", "saddle_energy": mep.saddle_energy, "start": float(mep.energies[0]),
             "end": float(mep.energies[-1])}]
    for interp in ("linear", "spherical"):
        p = reaction_path(model, start=a, end=b, n_points=32, interpolation=interp, steps=100, max_gap=0.1)
        rows.append({"path": f"latent {interp}", "highest": p.highest, "above_saddle_kT": p.highest - mep.saddle_energy,
                     "points": len(p.fractions), "round_trip_error": p.metadata["round_trip_error"]})
        if interp == "spherical":
            p.save(out_dir / "dw4_path.pdb")
            frac = torch.linspace(0, 1, len(mep.energies))  # the string's images are equally spaced
            p.plot(out_dir / "dw4_path.png", reference=(frac, mep.energies, "string method (MEP)"))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/issue7")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "guidance": guidance_rows("dw4", "distance:0,1", [3.0, 5.0], args.n, args.steps, args.train_steps)
           + guidance_rows("lj13", "rg", [1.05], args.n // 2, args.steps, args.train_steps),
           "path": dw4_path(out)}
    (out / "issue7_particles.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
