"""Short text reports and plots of a sampled ensemble against the system's reference."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("digfast")


def energy_stats(energies: torch.Tensor) -> dict:
    e = energies.double()
    e = e[torch.isfinite(e)]
    return {"mean": float(e.mean()), "median": float(e.median()), "std": float(e.std()), "min": float(e.min()),
            "max": float(e.max())}


def wasserstein1(a, b, a_weights=None) -> float:
    """W1 between two 1-D empirical distributions: the area between their CDFs. a_weights
    (optional, >= 0, any scale) weight a's points, e.g. importance weights; b's count equally."""
    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    if a_weights is None and len(a) == len(b):  # equal sizes: the mean gap of the sorted values
        return float((torch.sort(a)[0] - torch.sort(b)[0]).abs().mean())
    wa = torch.ones_like(a) if a_weights is None else torch.as_tensor(a_weights).double().flatten()
    if wa.shape != a.shape or not torch.isfinite(wa).all() or (wa < 0).any() or wa.sum() <= 0:
        raise ValueError("a_weights must be finite, >= 0, not all 0 and one per value of a")
    a, order = torch.sort(a)
    cdf_a = torch.cat([wa.new_zeros(1), torch.cumsum(wa[order], 0) / wa.sum()])
    b = torch.sort(b)[0]
    cdf_b = torch.arange(len(b) + 1, dtype=torch.float64) / len(b)
    grid = torch.sort(torch.cat([a, b]))[0]
    left = grid[:-1]
    gap = cdf_a[torch.searchsorted(a, left, right=True)] - cdf_b[torch.searchsorted(b, left, right=True)]
    return float((gap.abs() * torch.diff(grid)).sum())


def energies_or_none(system, positions) -> torch.Tensor | None:
    """The system's energies, or None where its energy needs a package that is missing."""
    try:
        return system.energy(positions)
    except ImportError as err:
        log.warning("digfast: no energies in the report: %s", err)
        return None


def ensemble_report(result, reference: torch.Tensor | None = None) -> dict:
    system = result.system
    rep = {"system": getattr(system, "name", type(system).__name__), "n": len(result),
           "sampler": result.metadata.get("sampler"), "steps": result.metadata.get("steps"),
           "samples_per_second": result.samples_per_second, "backend": result.metadata.get("backend")}
    energies = energies_or_none(system, result.positions)
    if energies is not None:
        rep["energy"] = energy_stats(energies)
        if reference is not None:
            e_ref = system.energy(reference)
            rep["reference_energy"] = energy_stats(e_ref)
            rep["energy_w1"] = wasserstein1(energies, e_ref)
    if result.metadata.get("n_inverted"):
        rep["n_inverted"] = result.metadata["n_inverted"]
    if hasattr(system, "summary"):
        rep.update(system.summary(result.positions))
    return rep


def format_report(rep: dict) -> str:
    lines = [f"digfast: {rep['n']} samples of {rep['system']} ({rep['sampler']}, {rep['steps']} steps, "
             f"step op: {rep['backend']})",
             f"  speed              {rep['samples_per_second']:.1f} samples/s"]
    if "energy" in rep:
        e = rep["energy"]
        lines.append(f"  energy (kT)        mean {e['mean']:.3f}  median {e['median']:.3f}  std {e['std']:.3f}")
    else:
        lines.append("  energy             not computed (the system's energy needs a package that is missing)")
    if "reference_energy" in rep:
        r = rep["reference_energy"]
        lines.append(f"  reference energy   mean {r['mean']:.3f}  median {r['median']:.3f}  std {r['std']:.3f}  "
                     f"(W1 {rep['energy_w1']:.3f})")
    if "mode_weights" in rep:
        fmt = lambda ws: " ".join(f"{w:.3f}" for w in ws)  # noqa: E731
        lines.append(f"  mode weights       {fmt(rep['mode_weights'])}  (true {fmt(rep['true_weights'])})")
    if "basins" in rep:
        b, r = rep["basins"], rep["reference_basins"]
        for name in ("C5", "C7eq", "PII", "alphaR", "phi_pos"):
            label = "phi >= 0" if name == "phi_pos" else name
            lines.append(f"  {label:<18} {b[name]:.4f}  (reference {r[name]:.4f})")
    if "n_inverted" in rep:
        lines.append(f"  mirror images      {rep['n_inverted']} D structures inverted to L")
    return "\n".join(lines)


def plot_energy_histogram(result, reference: torch.Tensor | None, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = result.energies().double().numpy()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    bins = 60
    if reference is not None:
        _, bins, _ = ax.hist(result.system.energy(reference).double().numpy(), bins=bins, density=True,
                             alpha=0.5, label="reference", color="grey")
    ax.hist(e, bins=bins, density=True, histtype="step", lw=1.8, label=f"digfast ({result.metadata['sampler']})")
    ax.set_xlabel("energy (kT)")
    ax.set_ylabel("density")
    ax.set_title(f"{getattr(result.system, 'name', '')}: {len(result)} samples")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ramachandran(phi, psi, ref_phi, ref_psi, ref_weights, path, title: str = "", bins: int = 60) -> Path:
    """Free-energy surfaces -ln p(phi, psi) in kT of samples beside a (weighted) reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(-180.0, 180.0, bins + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120, sharey=True)
    for ax, (p, s, w, name) in zip(axes, ((phi, psi, None, f"digfast ({len(phi)} samples)"),
                                          (ref_phi, ref_psi, ref_weights, "reference (MD, reweighted)"))):
        hist, _, _ = np.histogram2d(np.asarray(p), np.asarray(s), bins=[edges, edges], weights=w, density=True)
        with np.errstate(divide="ignore"):
            fes = -np.log(hist)
        fes -= fes[np.isfinite(fes)].min()
        mesh = ax.pcolormesh(edges, edges, np.ma.masked_invalid(fes).T, cmap="viridis", vmin=0, vmax=10,
                             shading="flat")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("phi (degrees)")
        ax.set_xticks(range(-180, 181, 90))
        ax.set_yticks(range(-180, 181, 90))
        ax.set_aspect("equal")
    axes[0].set_ylabel("psi (degrees)")
    fig.colorbar(mesh, ax=axes, label="free energy (kT)", shrink=0.85)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_ensemble(result, reference: torch.Tensor | None, path) -> Path:
    """The system's natural picture: the Ramachandran surface for alanine dipeptide, else the
    energy histogram against the reference."""
    from digfast.systems.alanine import AlanineDipeptide, heldout_reference, phi_psi

    if isinstance(result.system, AlanineDipeptide):
        phi, psi = phi_psi(result.positions.double().numpy())
        ref = heldout_reference()
        return plot_ramachandran(phi, psi, ref["phi"], ref["psi"], ref["weights"], path,
                                 title=f"alanine dipeptide, 300 K ({result.metadata.get('sampler')}, "
                                       f"{result.metadata.get('steps')} steps)")
    return plot_energy_histogram(result, reference, path)
