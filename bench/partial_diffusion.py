"""Where a particle model's error enters: noise held-out reference structures to step i0 of the
ancestral sampler, run the model from there to the end, and compare energies with the rest of
the reference set.

    python bench/partial_diffusion.py --system lj13 [--model lj13] [-n 500] [--starts 2,10,50,500]

A perfect score model returns the reference distribution from every start; an energy W1 that
grows with i0 says the model is wrong at the noise levels between the last good start and the
first bad one (sigma in the model's normalised units). i0 = steps is plain sampling from noise.
Floor (start 0): the same W1 between the n structures that were noised and n other reference
structures.
"""
from __future__ import annotations

import argparse

import torch

import digfast
from digfast.accuracy import wasserstein1
from digfast.ops.sampler_step import remove_com

from common import environment, write_json  # noqa: E402  (bench/ is on sys.path)


def run(model, ref: torch.Tensor, n: int, starts: list[int], steps: int, seed: int) -> list[dict]:
    energy = model.system.energy
    perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))
    if 2 * n > len(ref):
        raise SystemExit(f"need 2n <= {len(ref)} reference structures; use -n {len(ref) // 2}")
    x0, rest = ref[perm[:n]].float(), ref[perm[n:2 * n]]
    e_rest = energy(rest.double())
    disc = model.schedule.discrete(steps)
    scale = model.position_scale
    g = torch.Generator().manual_seed(seed + 1)
    e0 = energy(x0.double())
    rows = [dict(start=0, sigma=0.0, energy_w1=wasserstein1(e0, e_rest), mean_shift=float(e0.mean() - e_rest.mean()))]
    for i0 in starts:
        x = float(disc.alpha[i0]) * remove_com(x0) / scale + float(disc.sigma[i0]) * remove_com(
            torch.randn(x0.shape, generator=g))
        with torch.no_grad():
            for i in range(i0, 0, -1):
                s = model.score(x, torch.full((n,), float(disc.t[i])))
                a, b, c = disc.ancestral(i)
                x = a * x + b * s
                if i > 1:
                    x = x + c * remove_com(torch.randn(x.shape, generator=g))
        e = energy((x * scale).double())
        rows.append(dict(start=i0, t=float(disc.t[i0]), sigma=float(disc.sigma[i0]),
                         energy_w1=wasserstein1(e, e_rest), mean_shift=float(e.mean() - e_rest.mean())))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", required=True, choices=["dw4", "lj13"])
    ap.add_argument("--model", default=None, help="model name or folder (default: the system's)")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--starts", default="2,5,10,25,50,100,200,500")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = digfast.load(args.model or args.system)
    ref = model.system.reference_data()
    starts = [int(s) for s in args.starts.split(",") if s]
    if any(not 1 <= s <= args.steps for s in starts):
        raise SystemExit(f"--starts must lie in 1..{args.steps}")
    rows = run(model, ref, args.n, starts, args.steps, args.seed)
    print(f"{args.model or args.system}: {args.n} structures, ancestral x{args.steps}")
    print(f"{'start':>6} {'t':>6} {'sigma':>6} {'energy W1':>10} {'mean shift':>11}")
    for r in rows:
        print(f"{r['start']:6d} {r.get('t', 0.0):6.3f} {r['sigma']:6.3f} {r['energy_w1']:10.3f} "
              f"{r['mean_shift']:+11.3f}")
    for r in rows:
        r.update(system=args.system, model=args.model or args.system, n=args.n, steps=args.steps)
    write_json(args.json, environment(), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
