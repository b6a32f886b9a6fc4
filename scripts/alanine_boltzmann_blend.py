"""Does the exact Boltzmann score near t = 0 fix alanine dipeptide's stiff coordinates? (issue 7)

At sampling time only (no training), blend the model's noise prediction with one built from
the torch Amber energy, eps = (1 - lam) eps_net + lam eps_E, lam = exp(-sigma^2 / (2 alpha^2 W^2)):
  --kind plain:   s_E = (1/alpha) s_0(x / alpha), the Boltzmann score seen at x;
  --kind hessian: s_E = (I + (sigma/alpha)^2 H)^-1 (1/alpha) s_0(x / alpha), H the energy's
                  Hessian: the exact noised score of a harmonic well (stiff bonds and angles).
Samples with rk4 x100 to t_min 1e-5 and prints bond / angle / total energy percentiles (kT)
beside the thermalised-bond training data's (scripts/alanine_flexible_data.py).

    OMP_NUM_THREADS=1 python scripts/alanine_boltzmann_blend.py --model runs/ala_flex --widths 0 0.01 0.02
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import digfast
from digfast.models.boltzmann_prior import boltzmann_score, capped
from digfast.systems import alanine as ala
from digfast.systems.amber import AmberEnergy


def energy_terms(energy, x) -> dict:
    terms = {k: (v / ala.KT_KJ_MOL).numpy() for k, v in energy.terms(x.double()).items()}
    return {"bond": terms["bond"], "angle": terms["angle"], "total": sum(terms.values())}


def blended(model, width: float, kind: str, energy):
    network = model.noise_of
    scale, n_coords = model.position_scale, 3 * ala.N_ATOMS

    def one_structure(y):  # kT, normalised coordinates
        return energy(scale * y) / ala.KT_KJ_MOL
    grad, hessian = torch.func.grad(one_structure), torch.func.hessian(one_structure)

    def harmonic(y, k):
        eye = torch.eye(n_coords, dtype=y.dtype)
        return torch.linalg.solve(eye + k * hessian(y).reshape(n_coords, n_coords), -grad(y).reshape(-1)).reshape(y.shape)

    def noise_of(net, x, t, mask=None):
        eps = network(net, x, t, mask)
        tt = t.double()
        alpha, sigma = model.schedule.alpha(tt), model.schedule.sigma(tt)
        lam = torch.exp(-sigma**2 / (2 * alpha**2 * width**2))
        if width <= 0 or not bool((lam > 1e-6).any()):
            return eps
        a, s, w = (v.to(x.dtype)[:, None, None] for v in (alpha, sigma, lam))
        if kind == "plain":
            score = capped(boltzmann_score(model.system, scale, x, a), 1e4)
        else:
            score = torch.vmap(harmonic)(x / a, (sigma**2 / alpha**2).to(x.dtype)) / a
        return (1 - w) * eps + w * (-s * (score - score.mean(1, keepdim=True)))
    return noise_of


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alanine-dipeptide")
    ap.add_argument("--kind", default="hessian", choices=["plain", "hessian"])
    ap.add_argument("--widths", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.04])
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--data", default="data/alanine_flexible.npz")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, energy = digfast.load(args.model), AmberEnergy(ala.PRMTOP_PATH)
    pct = lambda v: "%.2f [%.2f, %.2f]" % tuple(np.percentile(v, [50, 10, 90]))  # noqa: E731
    if Path(args.data).exists():
        t = energy_terms(energy, torch.from_numpy(np.load(args.data)["positions"][:2000]))
        print(f"data (2000): bond {pct(t['bond'])}  angle {pct(t['angle'])}  total {pct(t['total'])}")
    for width in args.widths:
        model.noise_of = blended(model, width, args.kind, energy)
        t0 = time.time()
        out = digfast.sample_batch(model, n=args.n, steps=100, sampler="rk4", seed=0, t_min=1e-5, progress=False)
        t = energy_terms(energy, out.positions)
        pops = ala.basin_populations(*ala.phi_psi(out.positions.double().numpy()))
        print(f"{args.kind} W {width}: bond {pct(t['bond'])}  angle {pct(t['angle'])}  total {pct(t['total'])}  "
              f"C5 {pops['C5']:.3f} C7eq {pops['C7eq']:.3f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
