"""Command-line parts of issue 7: `sample --guide`, `train-property` and `path`."""
from __future__ import annotations

from pathlib import Path

import torch


def add_guide_args(p):
    p.add_argument("--guide", default=None, metavar="PROPERTY",
                   help="steer towards a property value: rg, distance:i,j or module:function of (positions, t)")
    p.add_argument("--guide-target", type=float, default=None, help="the property value c to steer to")
    p.add_argument("--guide-weight", default="1.0", help="guidance weight w, or 'signal' (fades out at high noise)")
    p.add_argument("--guide-std", type=float, default=0.1, help="width tau of q(c | x) = N(c; f(x), tau^2)")
    p.add_argument("--guide-model", default=None,
                   help="folder of a noisy predictor from `digfast train-property` (default: the exact "
                        "property of the Tweedie-denoised structure)")


def guidance_from_args(args):
    """A Guidance from the --guide options, or None."""
    from digfast.guidance import Guidance, parse_property
    from digfast.property_model import NoisyPropertyModel

    if args.guide is None and args.guide_model is None:
        return None
    if args.guide_target is None:
        raise ValueError("--guide needs --guide-target")
    weight = args.guide_weight if args.guide_weight == "signal" else float(args.guide_weight)
    if args.guide_model:
        return Guidance(NoisyPropertyModel.load(args.guide_model), target=args.guide_target, weight=weight,
                        std=args.guide_std)
    return Guidance(parse_property(args.guide), target=args.guide_target, weight=weight, std=args.guide_std,
                    denoise=True)


def add_parsers(sub):
    tp = sub.add_parser("train-property", help="train a time-conditioned property predictor on noised structures "
                        "(for --guide-model)")
    tp.add_argument("--model", required=True, help="the score model to be guided (its schedule and scale are used)")
    tp.add_argument("--property", required=True, help="rg, distance:i,j or module:function")
    tp.add_argument("--data", default=None, help="structures (.npy/.npz/trajectory; default: the system's reference)")
    tp.add_argument("--top", default=None)
    tp.add_argument("--out", required=True, help="folder for property.json + property.safetensors")
    tp.add_argument("--steps", type=int, default=3000)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--threads", type=int, default=None)

    pa = sub.add_parser("path", help="reaction path between two structures through the latent space")
    pa.add_argument("--model", required=True)
    pa.add_argument("start", help="start structure (.npy/.npz/trajectory; first frame)")
    pa.add_argument("end", help="end structure")
    pa.add_argument("--top", default=None)
    pa.add_argument("-n", "--points", type=int, default=32)
    pa.add_argument("--interpolation", default="spherical", choices=["spherical", "linear"])
    pa.add_argument("--max-gap", type=float, default=None, help="refine where neighbours are further apart")
    pa.add_argument("--steps", type=int, default=100, help="RK4 steps of each ODE map")
    pa.add_argument("-o", "--output", default=None, help="path trajectory (.pdb/.xtc/.dcd/.npz)")
    pa.add_argument("--plot", default=None, help="PNG of the energy along the path")
    pa.add_argument("--threads", type=int, default=None)


def _cmd_train_property(args) -> int:
    import digfast
    from digfast.io import load_positions
    from digfast.property_model import train_property_model

    model = digfast.load(args.model)
    data = (torch.as_tensor(load_positions(args.data, top=args.top)) if args.data
            else model.system.reference_data())
    pm = train_property_model(model, args.property, data, steps=args.steps, seed=args.seed)
    folder = pm.save(args.out)
    print(f"digfast: property {args.property} predictor in {folder} (use: digfast sample --guide-model {folder})")
    return 0


def _cmd_path(args) -> int:
    import digfast
    from digfast.io import load_positions

    model = digfast.load(args.model)
    ends = [load_positions(p, top=args.top)[0] for p in (args.start, args.end)]
    path = digfast.reaction_path(model, start=ends[0], end=ends[1], n_points=args.points,
                                 interpolation=args.interpolation, steps=args.steps, max_gap=args.max_gap)
    if path.energies is not None:
        e = path.energies
        print(f"digfast: path of {len(e)} points; energy start {float(e[0]):.2f}, end {float(e[-1]):.2f}, "
              f"highest {float(e.max()):.2f} kT at {float(path.fractions[int(e.argmax())]):.3f}")
    if args.output:
        for p in path.save(args.output):
            print(f"  wrote {p}")
    if args.plot:
        print(f"  wrote {path.plot(Path(args.plot))}")
    return 0


COMMANDS = {"train-property": _cmd_train_property, "path": _cmd_path}
