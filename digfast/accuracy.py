"""Accuracy statistics of sampled ensembles against held-out reference data, each beside its
noise floor (the same statistic for an independent reference set of the same size).

DW-4 / LJ-13: Wasserstein-1 distance of the energy and of the interatomic-distance
distributions. DW-4 also: its mode populations, the fractions of structures with k = 0..6 pair
distances in the inner well (below the barrier at d0 = 4), as the largest difference from the
reference's. Alanine dipeptide: Jensen-Shannon divergence of the 36 x 36 phi/psi histogram
against the held-out part of the reference run (every reweighted frame after the last
training structure); floor: n frames drawn by weight from the run's training period against
the same held-out histogram. Basin populations beside the held-out reference's.
bench/accuracy.py runs the shipped models through these.
"""
from __future__ import annotations

import numpy as np
import torch

from digfast.report import wasserstein1
from digfast.systems import alanine as ala
from digfast.systems.particles import DoubleWell4, pair_distances


def reference_sets(positions: torch.Tensor, n: int, seed: int = 0):
    """Two disjoint random sets of n structures: A (compared with) and B (the noise floor)."""
    if 2 * n > len(positions):
        raise ValueError(f"need 2n <= {len(positions)} reference structures for a floor; use -n {len(positions) // 2}")
    perm = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))
    return positions[perm[:n]], positions[perm[n:2 * n]]


def particle_statistics(system, samples, ref_a, ref_b, weights=None) -> list[dict]:
    """Energy and interatomic-distance W1 of samples against reference set A; floor: set B.
    weights (optional, one per sample): importance weights of the samples (reweighting)."""
    e = system.energy
    w = None if weights is None else torch.as_tensor(weights).double()
    rows = []
    for name, f in (("energy W1", lambda x: e(x.double())), ("distance W1", lambda x: pair_distances(x.double()))):
        values = f(samples)
        value_weights = None if w is None else w.reshape(-1, *[1] * (values.ndim - 1)).expand(values.shape)
        rows.append({"statistic": name, "value": wasserstein1(values, f(ref_a), value_weights),
                     "floor": wasserstein1(f(ref_b), f(ref_a))})
    if system.name == "dw4":
        pops, ref_pops = dw4_mode_populations(samples, w), dw4_mode_populations(ref_a)
        rows.append({"statistic": "mode populations", "value": float(np.abs(pops - ref_pops).max()),
                     "floor": float(np.abs(dw4_mode_populations(ref_b) - ref_pops).max()),
                     "populations": pops.tolist(), "reference": ref_pops.tolist()})
    return rows


def dw4_mode_populations(x, weights=None) -> np.ndarray:
    """(7,) fractions of DW-4 structures with k = 0..6 of their pair distances below the
    barrier of the pair potential (d0 = 4): the modes are k = 2 and 4 (the reference holds
    about 45% and 47%), with k = 3 and 5 between them. weights: per structure (default equal)."""
    k = (pair_distances(x.double()) < DoubleWell4.d0).sum(-1)
    w = None if weights is None else torch.as_tensor(weights).double().numpy()
    counts = np.bincount(k.numpy(), weights=w, minlength=7)[:7]
    return counts / counts.sum()


def alanine_statistics(samples, n: int, seed: int = 0, repeats: int = 20) -> list[dict]:
    """phi/psi JS divergence against the held-out reference with its floor, and the C5, C7eq,
    phi >= 0 populations beside the held-out reference's."""
    held = ala.heldout_reference()
    ref = ala.load_reference()
    target = ala.ramachandran_histogram(held["phi"], held["psi"], held["weights"])
    phi, psi = ala.phi_psi(samples.double().numpy())
    # floor: n frames of the training period, drawn by weight, against the held-out histogram
    early = slice(0, held["first_frame"])
    logw = ref["all_log_weight"][early].astype(np.float64)
    w = np.exp(logw - logw.max())
    w /= w.sum()
    rng = np.random.default_rng(seed)
    floors = []
    for _ in range(repeats):
        idx = rng.choice(len(w), size=n, p=w)
        floors.append(ala.js_divergence(ala.ramachandran_histogram(ref["all_phi"][early][idx],
                                                                   ref["all_psi"][early][idx]), target))
    js = ala.js_divergence(ala.ramachandran_histogram(phi, psi), target)
    rows = [{"statistic": "phi/psi JS", "value": js, "floor": float(np.mean(floors)),
             "ratio": js / float(np.mean(floors))}]
    model_pops = ala.basin_populations(phi, psi)
    ref_pops = ala.basin_populations(held["phi"], held["psi"], held["weights"])
    for name in ("C5", "C7eq"):
        rows.append({"statistic": f"{name} population", "value": model_pops[name], "reference": ref_pops[name],
                     "diff": model_pops[name] - ref_pops[name]})
    rows.append({"statistic": "phi>=0 population", "value": model_pops["phi_pos"], "reference": ref_pops["phi_pos"],
                 "ratio": model_pops["phi_pos"] / ref_pops["phi_pos"]})
    return rows
