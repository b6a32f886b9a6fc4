"""Reaction paths through the model's latent space.

Both end structures are carried to t_max by the probability-flow ODE (an invertible map of
the data onto the Gaussian prior), the latents are interpolated and every point is carried
back to t_min. Spherical interpolation keeps the latent norm between the ends' norms, where
the prior's mass lies (|z| ~ sqrt(D)); straight lines cut through the low-norm middle,
which decodes to atypical, blurred structures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from digfast import io
from digfast.arguments import check_device


@dataclass
class ReactionPath:
    positions: torch.Tensor   # (n_points, N, d) system units, start to end
    energies: torch.Tensor | None  # (n_points,) the system's energy, kT
    latents: torch.Tensor     # (n_points, N, d) the interpolated x_T (model coordinates)
    fractions: torch.Tensor   # (n_points,) 0 .. 1 along the path
    system: object
    metadata: dict = field(default_factory=dict)

    @property
    def highest(self) -> float:
        return float(self.energies.max())

    def to_mdtraj(self):
        return io.to_mdtraj(self.positions, self.system)

    def save(self, path, top=None):
        return io.save(path, self.positions, self.system, top=top, metadata=self.metadata)

    def arc_length(self) -> torch.Tensor:
        """(n_points,) distance travelled in configuration space, normalised to 0 .. 1."""
        steps = (self.positions[1:] - self.positions[:-1]).flatten(1).norm(dim=1).double()
        s = torch.cat([steps.new_zeros(1), steps.cumsum(0)])
        return s / s[-1].clamp_min(1e-300)

    def plot(self, path, reference=None):
        """PNG of the energy against arc length along the path; reference: (arc fractions,
        energies, label) to overlay, e.g. a minimum-energy path's."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(self.arc_length(), self.energies, "o-", ms=3, label="model latent path")
        if reference is not None:
            f, e, label = reference
            ax.plot(f, e, "-", color="k", lw=1, label=label)
        ax.set_xlabel("arc length along path (fraction)")
        ax.set_ylabel("energy / kT")
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def interpolate(z0: torch.Tensor, z1: torch.Tensor, fractions: torch.Tensor, kind: str = "spherical"):
    """(n, N, d) points between latents z0 and z1 (N, d)."""
    f = fractions.to(z0.dtype)[:, None, None]
    if kind == "linear":
        return (1 - f) * z0 + f * z1
    if kind != "spherical":
        raise ValueError(f"interpolation must be linear or spherical, got {kind!r}")
    # slerp of the directions, norm interpolated linearly
    n0, n1 = z0.norm(), z1.norm()
    u0, u1 = z0 / n0, z1 / n1
    omega = torch.arccos((u0 * u1).sum().clamp(-1.0, 1.0))
    if float(omega) < 1e-6:
        return (1 - f) * z0 + f * z1
    so = math.sin(float(omega))
    u = (torch.sin((1 - f) * omega) * u0 + torch.sin(f * omega) * u1) / so
    return u * ((1 - f) * n0 + f * n1)


def reaction_path(model, system=None, start=None, end=None, n_points: int = 32, *,
                  interpolation: str = "spherical", method: str = "rk4", steps: int = 200,
                  t_min: float | None = None, device=None, dtype=torch.float32, max_gap: float | None = None,
                  max_rounds: int = 6) -> ReactionPath:
    """Path from start to end (N, d) structures in system units through the model's latents.

    max_gap (system units): bisect the latent segments whose decoded neighbours lie further
    apart than this, up to max_rounds times, so a fast transition is resolved; the decoded
    path is continuous, so a resolved path must cross the barrier."""
    from digfast import api
    from digfast.likelihood import ode_map
    from digfast.samplers import default_t_min

    system = api._resolve_system(model, system)
    if start is None or end is None:
        raise ValueError("start and end structures are required")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    ends = torch.stack([torch.as_tensor(start), torch.as_tensor(end)]).to(dtype)
    if ends.shape[1:] != (system.n_atoms, system.spatial_dim):
        raise ValueError(f"start and end must be ({system.n_atoms}, {system.spatial_dim}), got {tuple(ends.shape[1:])}")
    device = check_device(device)
    scale = api._scale(model)
    t0 = default_t_min(model.schedule) if t_min is None else t_min
    t1 = model.schedule.t_max
    score_fn = api._score_fn(model)
    latents = ode_map(score_fn, model.schedule, ends.to(device) / scale, t0, t1, method=method, steps=steps)
    def decode(f):
        z = interpolate(latents[0], latents[1], f, interpolation)
        return z, ode_map(score_fn, model.schedule, z, t1, t0, method=method, steps=steps).cpu() * scale

    fractions = torch.linspace(0, 1, n_points, dtype=torch.float64)
    z, x = decode(fractions)
    for _ in range(max_rounds if max_gap is not None else 0):
        gaps = (x[1:] - x[:-1]).flatten(1).norm(dim=1)
        wide = (gaps > max_gap).nonzero().flatten()
        if len(wide) == 0:
            break
        f_new = 0.5 * (fractions[wide] + fractions[wide + 1])
        z_new, x_new = decode(f_new)
        order = torch.argsort(torch.cat([fractions, f_new]))
        fractions = torch.cat([fractions, f_new])[order]
        z, x = torch.cat([z.cpu(), z_new.cpu()])[order], torch.cat([x, x_new])[order]
    energies = system.energy(x.double()) if hasattr(system, "energy") else None
    meta = {"interpolation": interpolation, "method": method, "steps": steps, "t_min": t0,
            "round_trip_error": [float((x[0] - ends[0]).norm()), float((x[-1] - ends[1]).norm())]}
    return ReactionPath(x, energies, z.cpu(), fractions, system, meta)
