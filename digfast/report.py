"""Short text reports and plots of a sampled ensemble against the system's reference."""
from __future__ import annotations

from pathlib import Path

import torch


def energy_stats(energies: torch.Tensor) -> dict:
    e = energies.double()
    e = e[torch.isfinite(e)]
    return {"mean": float(e.mean()), "std": float(e.std()), "min": float(e.min()), "max": float(e.max())}


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two 1-D empirical distributions of equal size (sorted difference)."""
    a, b = torch.sort(a.double().flatten())[0], torch.sort(b.double().flatten())[0]
    if len(a) != len(b):
        raise ValueError("wasserstein1 here needs equal sample sizes")
    return float((a - b).abs().mean())


def ensemble_report(result, reference: torch.Tensor | None = None) -> dict:
    system = result.system
    rep = {"system": getattr(system, "name", type(system).__name__), "n": len(result),
           "sampler": result.metadata.get("sampler"), "steps": result.metadata.get("steps"),
           "samples_per_second": result.samples_per_second, "backend": result.metadata.get("backend"),
           "energy": energy_stats(result.energies())}
    if reference is not None:
        e_ref = system.energy(reference)
        rep["reference_energy"] = energy_stats(e_ref)
        rep["energy_w1"] = wasserstein1(result.energies(), e_ref)
    if hasattr(system, "summary"):
        rep.update(system.summary(result.positions))
    return rep


def format_report(rep: dict) -> str:
    lines = [f"digfast: {rep['n']} samples of {rep['system']} ({rep['sampler']}, {rep['steps']} steps, "
             f"step op: {rep['backend']})",
             f"  speed              {rep['samples_per_second']:.1f} samples/s"]
    e = rep["energy"]
    lines.append(f"  energy (kT)        mean {e['mean']:.3f}  std {e['std']:.3f}")
    if "reference_energy" in rep:
        r = rep["reference_energy"]
        lines.append(f"  reference energy   mean {r['mean']:.3f}  std {r['std']:.3f}  (W1 {rep['energy_w1']:.3f})")
    if "mode_weights" in rep:
        fmt = lambda ws: " ".join(f"{w:.3f}" for w in ws)  # noqa: E731
        lines.append(f"  mode weights       {fmt(rep['mode_weights'])}  (true {fmt(rep['true_weights'])})")
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
