#!/usr/bin/env python
"""Reference equilibrium data: alanine dipeptide in vacuum, 300 K, Amber ff96 (OpenMM).

    python scripts/alanine_reference.py --ns 1000 --seed 0 --out DIR      # run (resumable)
    python scripts/alanine_reference.py --analyze DIR                      # redo the analysis
    python scripts/alanine_reference.py --pack DIR --frames 15000 \\
        --to digfast/systems/data/alanine_reference.npz                    # compact package copy

System: the prmtop/crd of openmmtools/data/alanine-dipeptide-gbsa/ (copies in
digfast/systems/data/, sha256 in the JSON), ``createSystem(nonbondedMethod=NoCutoff,
constraints=HBonds)`` with no implicit solvent (vacuum: the prmtop's GB radii are unused),
LangevinMiddleIntegrator at 300 K, friction 1/ps, 2 fs steps, Reference platform (fastest
for 22 atoms on one core, ~600 ns/hour here).

Why enhanced sampling: phi > 0 (C7ax/alphaL) holds ~1% at 300 K but plain MD crosses the
phi barriers rarely: a 15 ns pilot at 300 K visited phi in (0, 120) never (its only phi > 0
frames were C5 frames crossing phi = +-180), and static phi biases up to 8 kcal/mol gave no
crossing in 4 ns either. Plain MD of ~1 us would give a handful of visits, not a converged 1%.

Method ("frozen metadynamics bias + exact reweighting"):
 1. minimise, 100 ps unbiased equilibration at 300 K;
 2. well-tempered metadynamics on phi only (openmm.app.Metadynamics; Gaussians of 1.2 kJ/mol,
    width 0.35 rad, every 1 ps, bias factor 6, 360-point periodic grid) for --metad-ns (20 ns)
    to build a bias V(phi) ~ -(1 - 1/6) F(phi);
 3. freeze V (shifted to max V = 0) as a periodic Continuous1DFunction in a CustomTorsionForce
    in its own force group and run --ns of Langevin MD under U + V. The bias is static, so the
    300 K Boltzmann weight of each recorded configuration is exactly w = exp(+V(phi)/kT); V is
    evaluated per record by OpenMM itself (the very spline the dynamics feels). The first
    --discard-ns of production are dropped as equilibration under the frozen bias.
 With ``--method plain`` steps 2-3 are replaced by unbiased MD (all weights 1).

Records every --record-ps (1 ps): phi/psi (mdtraj.compute_phi/psi), potential energy U
(kJ/mol, without bias), bias V (kJ/mol), log weight V/kT. Positions (Angstrom, float32) every
--frame-ps (5 ps). Production runs in --chunk-ns chunks; after each chunk its arrays and an
OpenMM checkpoint (positions, velocities, RNG state) are written, so an interrupted run resumes
where it stopped with the same command (bit-identical on the same machine and platform).

Outputs in DIR: topology.pdb (minimised structure), bias.npz (V on its grid),
chunks/*.npz, records.npz (all records), frames.npz (positions + per-frame phi, psi,
potential, log_weight), reference.json (settings, platform, timings, convergence check).

Convergence check (weighted throughout): the production is split into two halves by time;
for each half the basin populations (digfast.systems.alanine.basin_populations) and the
36x36 phi/psi histogram. JS(half 1, half 2) is compared with a noise floor: the same
statistic between two sets of the same size made by a block bootstrap (1 ns and 5 ns blocks
drawn with replacement from the whole run; blocks longer than the correlation time make the
sets independent) and between the even and odd 1 ns blocks. Populations get block standard
errors (20 blocks).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform as pyplatform
import socket
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from digfast.systems import alanine as ala  # noqa: E402

TEMPERATURE = ala.TEMPERATURE_K
KT = ala.KT_KJ_MOL
BASINS = list(ala.BASINS) + ["phi_pos", "phi_pos_0_120"]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def derived_seed(seed: int, stage: int) -> int:
    """A positive 31-bit seed per stage (OpenMM treats seed 0 as 'pick one at random')."""
    v = int(np.random.SeedSequence([seed, stage]).generate_state(1)[0]) & 0x7FFFFFFF
    return v or 1


# ----------------------------------------------------------------------------- simulation
def build(args):
    import openmm as mm
    import openmm.app as app
    import openmm.unit as u

    prmtop = app.AmberPrmtopFile(str(args.prmtop))
    crd = app.AmberInpcrdFile(str(args.crd))
    system = prmtop.createSystem(nonbondedMethod=app.NoCutoff, constraints=app.HBonds,
                                 implicitSolvent=None)
    names = sorted(f.__class__.__name__ for f in system.getForces())
    if any("GB" in n for n in names):
        raise RuntimeError(f"implicit solvent force found: {names}")
    for f in system.getForces():
        f.setForceGroup(0)
    return mm, app, u, prmtop, crd, system, names


def make_integrator(mm, u, args, seed):
    integ = mm.LangevinMiddleIntegrator(TEMPERATURE * u.kelvin, args.friction / u.picosecond,
                                        args.dt_fs * 1e-3 * u.picoseconds)
    integ.setRandomNumberSeed(seed)
    return integ


def get_platform(mm, args):
    plat = mm.Platform.getPlatformByName(args.platform)
    props = {"Threads": "1"} if args.platform == "CPU" else {}
    return plat, props


def phi_torsion(mm, expression):
    f = mm.CustomTorsionForce(expression)
    f.addTorsion(*ala.PHI_ATOMS, [])
    return f


def prepare(args, out: Path, log):
    """Minimise, equilibrate, (metadynamics); returns the bias grid and the start state."""
    mm, app, u, prmtop, crd, system, names = build(args)
    plat, props = get_platform(mm, args)
    timings = {}
    t0 = time.time()
    integ = make_integrator(mm, u, args, derived_seed(args.seed, 1))
    sim = app.Simulation(prmtop.topology, system, integ, plat, props)
    sim.context.setPositions(crd.positions)
    e0 = sim.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    sim.minimizeEnergy(tolerance=1.0, maxIterations=0)
    st = sim.context.getState(getEnergy=True, getPositions=True)
    e_min = st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
    with open(out / "topology.pdb", "w") as fh:
        app.PDBFile.writeFile(prmtop.topology, st.getPositions(), fh)
    log(f"energy: initial {e0:.3f} kJ/mol, minimised {e_min:.3f} kJ/mol; forces {names}")
    sim.context.setVelocitiesToTemperature(TEMPERATURE * u.kelvin, derived_seed(args.seed, 2))
    sim.step(int(round(args.equil_ps / (args.dt_fs * 1e-3))))
    timings["minimise_equilibrate_s"] = time.time() - t0

    grid = np.linspace(-np.pi, np.pi, args.grid)
    bias = np.zeros(args.grid)
    if args.method == "metad":
        t0 = time.time()
        from openmm.app.metadynamics import BiasVariable, Metadynamics

        state = sim.context.getState(getPositions=True, getVelocities=True)
        msys = mm.XmlSerializer.deserialize(mm.XmlSerializer.serialize(system))
        cv = phi_torsion(mm, "theta")
        var = BiasVariable(cv, -np.pi, np.pi, args.metad_width, periodic=True, gridWidth=args.grid)
        meta = Metadynamics(msys, [var], TEMPERATURE * u.kelvin, args.bias_factor,
                            args.metad_height * u.kilojoule_per_mole, args.metad_pace)
        minteg = make_integrator(mm, u, args, derived_seed(args.seed, 3))
        msim = app.Simulation(prmtop.topology, msys, minteg, plat, props)
        msim.context.setPositions(state.getPositions())
        msim.context.setVelocities(state.getVelocities())
        nsteps = int(round(args.metad_ns * 1e3 / (args.dt_fs * 1e-3)))
        block = args.metad_pace * 1000
        phis = []
        done = 0
        while done < nsteps:
            n = min(block, nsteps - done)
            meta.step(msim, n)
            done += n
            phis.append(float(meta.getCollectiveVariables(msim)[0]))
            if (done // block) % 5 == 0 or done == nsteps:
                log(f"metad {done * args.dt_fs * 1e-6:.1f} ns, bias range "
                    f"{np.ptp(meta._totalBias):.2f} kJ/mol")
        free = np.asarray(meta.getFreeEnergy().value_in_unit(u.kilojoule_per_mole)).reshape(-1)
        bias = -free * (args.bias_factor - 1.0) / args.bias_factor
        assert np.allclose(bias, np.asarray(meta._totalBias).reshape(-1), atol=1e-6)
        bias = bias - bias.max()
        state = msim.context.getState(getPositions=True, getVelocities=True)
        timings["metad_s"] = time.time() - t0
        log(f"metadynamics done in {timings['metad_s']:.0f} s; bias min {bias.min():.2f} kJ/mol")
    else:
        state = sim.context.getState(getPositions=True, getVelocities=True)
    pos = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
    vel = state.getVelocities(asNumpy=True).value_in_unit(u.nanometer / u.picosecond)
    np.savez(out / "bias.npz", grid_rad=grid, bias_kJmol=bias, start_positions_nm=pos,
             start_velocities=vel)
    return timings


def production_context(args, out: Path):
    mm, app, u, prmtop, crd, system, names = build(args)
    b = np.load(out / "bias.npz")
    if args.method == "metad":
        table = mm.Continuous1DFunction(b["bias_kJmol"], -np.pi, np.pi, True)
        f = mm.CustomCVForce("vbias(phi)")
        f.addCollectiveVariable("phi", phi_torsion(mm, "theta"))
        f.addTabulatedFunction("vbias", table)
        f.setForceGroup(1)
        system.addForce(f)
    plat, props = get_platform(mm, args)
    integ = make_integrator(mm, u, args, derived_seed(args.seed, 4))
    ctx = mm.Context(system, integ, plat, props)
    ctx.setPositions(b["start_positions_nm"])
    ctx.setVelocities(b["start_velocities"])
    return mm, u, prmtop, ctx, integ


def run_production(args, out: Path, log):
    import mdtraj as md

    mm, u, prmtop, ctx, integ = production_context(args, out)
    top = md.Topology.from_openmm(prmtop.topology)
    chunks = out / "chunks"
    chunks.mkdir(exist_ok=True)
    steps_per_rec = int(round(args.record_ps / (args.dt_fs * 1e-3)))
    recs_per_chunk = int(round(args.chunk_ns * 1e3 / args.record_ps))
    frame_every = int(round(args.frame_ps / args.record_ps))
    n_discard_steps = int(round(args.discard_ns * 1e6 / args.dt_fs))
    n_chunks = int(np.ceil(args.ns / args.chunk_ns - 1e-9))
    progress = out / "progress.json"
    done = 0
    if progress.exists() and (out / "checkpoint.chk").exists():
        done = json.loads(progress.read_text())["chunks_done"]
        ctx.loadCheckpoint((out / "checkpoint.chk").read_bytes())
        log(f"resuming after {done} chunks")
    else:
        t0 = time.time()
        integ.step(n_discard_steps)
        log(f"discarded {args.discard_ns} ns (equilibration at the production settings) in "
            f"{time.time() - t0:.0f} s")
    for c in range(done, n_chunks):
        t0 = time.time()
        n_rec = min(recs_per_chunk, int(round(args.ns * 1e3 / args.record_ps)) - c * recs_per_chunk)
        xyz = np.empty((n_rec, ala.N_ATOMS, 3), np.float32)
        pot = np.empty(n_rec)
        vb = np.empty(n_rec)
        for r in range(n_rec):
            integ.step(steps_per_rec)
            st = ctx.getState(getPositions=True, getEnergy=True, groups={0})
            xyz[r] = st.getPositions(asNumpy=True).value_in_unit(u.nanometer)
            pot[r] = st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
            if args.method == "metad":
                vb[r] = ctx.getState(getEnergy=True, groups={1}).getPotentialEnergy().value_in_unit(
                    u.kilojoule_per_mole)
            else:
                vb[r] = 0.0
        traj = md.Trajectory(xyz, top)
        phi = np.degrees(md.compute_phi(traj)[1][:, 0])
        psi = np.degrees(md.compute_psi(traj)[1][:, 0])
        t_ps = args.discard_ns * 1e3 + (c * recs_per_chunk + np.arange(1, n_rec + 1)) * args.record_ps
        sel = np.arange(frame_every - 1, n_rec, frame_every)
        tmp = chunks / f".chunk_{c:05d}.npz"
        np.savez(tmp, t_ps=t_ps, phi_deg=phi, psi_deg=psi, potential_kJmol=pot, bias_kJmol=vb,
                 frame_index=sel, positions_A=(xyz[sel] * 10.0).astype(np.float32))
        os.replace(tmp, chunks / f"chunk_{c:05d}.npz")
        (out / ".checkpoint.chk").write_bytes(ctx.createCheckpoint())
        os.replace(out / ".checkpoint.chk", out / "checkpoint.chk")
        progress.write_text(json.dumps({"chunks_done": c + 1, "n_chunks": n_chunks}))
        dt = time.time() - t0
        pos_frac = float(np.mean((phi >= 0) & (phi < 120)))
        log(f"chunk {c + 1}/{n_chunks}: {n_rec * args.record_ps / 1e3:.1f} ns in {dt:.0f} s "
            f"({n_rec * args.record_ps / 1e3 / dt * 3600:.0f} ns/h); biased phi in [0,120) "
            f"fraction {pos_frac:.3f}")


# ------------------------------------------------------------------------------- analysis
def load_chunks(out: Path):
    files = sorted((out / "chunks").glob("chunk_*.npz"))
    if not files:
        raise FileNotFoundError(f"no chunks in {out / 'chunks'}")
    keys = ["t_ps", "phi_deg", "psi_deg", "potential_kJmol", "bias_kJmol"]
    rec = {k: [] for k in keys}
    frames = {"positions_A": [], "record_index": []}
    offset = 0
    for f in files:
        with np.load(f) as z:
            for k in keys:
                rec[k].append(z[k])
            frames["positions_A"].append(z["positions_A"])
            frames["record_index"].append(z["frame_index"] + offset)
            offset += len(z["t_ps"])
    rec = {k: np.concatenate(v) for k, v in rec.items()}
    frames = {k: np.concatenate(v) for k, v in frames.items()}
    rec["log_weight"] = rec["bias_kJmol"] / KT
    return rec, frames


def weights_of(logw):
    return np.exp(logw - logw.max())


def block_se(phi, psi, w, n_blocks=20):
    """Block standard errors of the weighted basin populations."""
    idx = np.array_split(np.arange(len(phi)), n_blocks)
    per = [ala.basin_populations(phi[i], psi[i], w[i]) for i in idx]
    return {k: float(np.std([p[k] for p in per], ddof=1) / np.sqrt(n_blocks)) for k in BASINS}


def block_bootstrap_js(phi, psi, w, block, n_half, repeats, rng, bins):
    """JS between two sets of n_half records, each made of whole blocks drawn with replacement."""
    n_blocks = len(phi) // block
    starts = np.arange(n_blocks) * block
    per_set = max(1, int(round(n_half / block)))
    vals = []
    for _ in range(repeats):
        hs = []
        for _ in range(2):
            b = rng.choice(starts, size=per_set, replace=True)
            i = (b[:, None] + np.arange(block)[None]).ravel()
            hs.append(ala.ramachandran_histogram(phi[i], psi[i], w[i], bins=bins))
        vals.append(ala.js_divergence(*hs))
    return float(np.mean(vals)), float(np.std(vals))


def kish_ess(w):
    return float(w.sum() ** 2 / (w ** 2).sum())


def cross_check(other: Path, pops, se):
    """Populations of an independent (e.g. plain MD) run vs this one, both conditioned on phi < 0
    (plain MD at 300 K rarely reaches phi > 0, but equilibrates the phi < 0 basins)."""
    rec, _ = load_chunks(other)
    phi, psi, w = rec["phi_deg"], rec["psi_deg"], weights_of(rec["log_weight"])
    o_pops, o_se = ala.basin_populations(phi, psi, w), block_se(phi, psi, w)
    res = {"run": str(other), "production_ns": len(phi) * float(np.median(np.diff(rec["t_ps"]))) / 1e3,
           "populations_given_phi_neg": {}}
    for k in ("C5", "PII", "C7eq", "alphaR"):
        a, b = pops[k] / (1 - pops["phi_pos"]), o_pops[k] / (1 - o_pops["phi_pos"])
        sd = float(np.hypot(se[k], o_se[k]))
        res["populations_given_phi_neg"][k] = {"this": a, "other": b, "other_se": o_se[k],
                                               "z": (a - b) / sd if sd > 0 else 0.0}
    res["other_phi_pos"] = o_pops["phi_pos"]
    res["other_phi_pos_0_120"] = o_pops["phi_pos_0_120"]
    return res


def analyze(out: Path, settings: dict, log, bins=36, repeats=20, compare=None):
    rec, frames = load_chunks(out)
    n = len(rec["t_ps"])
    rec_ps = float(np.median(np.diff(rec["t_ps"]))) if n > 1 else 1.0
    phi, psi, logw = rec["phi_deg"], rec["psi_deg"], rec["log_weight"]
    w = weights_of(logw)
    half = n // 2
    h1, h2 = slice(0, half), slice(half, 2 * half)
    hist = lambda s: ala.ramachandran_histogram(phi[s], psi[s], w[s], bins=bins)  # noqa: E731
    js_halves = ala.js_divergence(hist(h1), hist(h2))
    rng = np.random.default_rng(12345)
    floors = {}
    for block_ns in (1.0, 5.0):
        block = max(1, int(round(block_ns * 1e3 / rec_ps)))
        if n // block >= 4:
            m, s = block_bootstrap_js(phi, psi, w, block, half, repeats, rng, bins)
            floors[f"block_bootstrap_{block_ns:g}ns"] = {"mean": m, "std": s}
    block = max(1, int(round(1e3 / rec_ps)))
    bid = np.arange(n) // block
    even, odd = bid % 2 == 0, bid % 2 == 1
    if odd.any():
        floors["even_vs_odd_1ns_blocks"] = ala.js_divergence(
            ala.ramachandran_histogram(phi[even], psi[even], w[even], bins=bins),
            ala.ramachandran_histogram(phi[odd], psi[odd], w[odd], bins=bins))
    # frames (positions stride): Kish ESS, JS floor of a 15k independent sample vs another
    fi = frames["record_index"]
    ess_frames = kish_ess(w[fi])
    floor_15k = ala.js_noise_floor(phi[fi], psi[fi], 15000, weights=w[fi], bins=bins, repeats=10)

    pops = {"all": ala.basin_populations(phi, psi, w),
            "half1": ala.basin_populations(phi[h1], psi[h1], w[h1]),
            "half2": ala.basin_populations(phi[h2], psi[h2], w[h2])}
    se = {"all": block_se(phi, psi, w), "half1": block_se(phi[h1], psi[h1], w[h1]),
          "half2": block_se(phi[h2], psi[h2], w[h2])}
    table = {}
    for k in BASINS:
        d = pops["half1"][k] - pops["half2"][k]
        sd = float(np.hypot(se["half1"][k], se["half2"][k]))
        table[k] = {"all": pops["all"][k], "se": se["all"][k], "half1": pops["half1"][k],
                    "half2": pops["half2"][k], "diff": d, "diff_se": sd,
                    "z": d / sd if sd > 0 else 0.0}
    # biased-run statistics: how often the rare region is entered
    region = ((phi >= 0) & (phi < 120)).astype(np.int8)
    entries = int(np.sum(np.diff(region) == 1))
    floor_ref = floors.get("block_bootstrap_1ns", {"mean": floors.get("even_vs_odd_1ns_blocks", np.nan)})
    conv = {
        "records": n, "record_ps": rec_ps, "production_ns": n * rec_ps / 1e3,
        "bins": bins,
        "js_halves": js_halves,
        "js_floor": floors,
        "js_halves_over_floor": js_halves / floor_ref["mean"],
        "kish_ess_records": kish_ess(w), "kish_ess_frames": ess_frames,
        "n_frames": int(len(fi)),
        "js_floor_two_independent_15k_sets": {"mean": floor_15k[0], "std": floor_15k[1]},
        "run_fraction_phi_0_120": float(region.mean()),
        "run_entries_phi_0_120": entries,
        "populations": table,
        "basins_doc": "see digfast.systems.alanine.basin_labels; phi_pos = phi >= 0",
        "converged_rule": "js_halves <= block_bootstrap_1ns mean + 2 std, |z| < 3 for all "
                          "populations, and >= 100 entries into phi in [0, 120) (the check "
                          "cannot see a region the run never visits)",
    }
    fb = floor_ref
    conv["converged"] = bool(js_halves <= fb["mean"] + 2 * fb.get("std", 0.0)
                             and all(abs(v["z"]) < 3 for v in table.values()) and entries >= 100)
    if compare is not None:
        conv["cross_check"] = cross_check(compare, pops["all"], se["all"])
    np.savez(out / "records.npz", **rec)
    np.savez(out / "frames.npz", positions_A=frames["positions_A"], record_index=fi,
             t_ps=rec["t_ps"][fi], phi_deg=phi[fi], psi_deg=psi[fi],
             potential_kJmol=rec["potential_kJmol"][fi], log_weight=logw[fi])
    info = dict(settings)
    info["convergence"] = conv
    (out / "reference.json").write_text(json.dumps(info, indent=1))
    log(format_table(conv))
    return info


def format_table(conv):
    lines = [f"production {conv['production_ns']:.1f} ns, {conv['records']} records, "
             f"Kish ESS {conv['kish_ess_records']:.0f} records / {conv['kish_ess_frames']:.0f} of "
             f"{conv['n_frames']} frames",
             f"JS(halves) = {conv['js_halves']:.5f}; floor: " + ", ".join(
                 f"{k} {v['mean']:.5f} +- {v['std']:.5f}" if isinstance(v, dict) else f"{k} {v:.5f}"
                 for k, v in conv["js_floor"].items()),
             f"{'basin':>14} {'all':>8} {'se':>7} {'half1':>8} {'half2':>8} {'z':>6}"]
    for k, v in conv["populations"].items():
        lines.append(f"{k:>14} {v['all']:8.4f} {v['se']:7.4f} {v['half1']:8.4f} {v['half2']:8.4f} "
                     f"{v['z']:6.2f}")
    lines.append(f"converged: {conv['converged']} ({conv['run_entries_phi_0_120']} entries into "
                 f"phi in [0, 120))")
    if "cross_check" in conv:
        cc = conv["cross_check"]
        lines.append(f"cross-check vs {cc['run']} ({cc['production_ns']:.0f} ns), given phi < 0:")
        for k, v in cc["populations_given_phi_neg"].items():
            lines.append(f"{k:>14} {v['this']:8.4f} vs {v['other']:8.4f} +- {v['other_se']:.4f} "
                         f"(z {v['z']:.2f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- pack
def pack(src: Path, dst: Path, n_frames: int, seed: int):
    """Compact copy: n_frames equally weighted positions (systematic resampling) + all angles."""
    info = json.loads((src / "reference.json").read_text())
    with np.load(src / "frames.npz") as z:
        fr = {k: z[k] for k in z.files}
    w = weights_of(fr["log_weight"])
    # systematic resampling along frames ordered by (basin, time): unbiased for any order, and
    # this one stratifies, so each basin's share of the packed set is its weighted population
    # to within 1/n_frames (plain time order leaves ~10% noise on the 1% phi > 0 share)
    order = np.lexsort((fr["t_ps"], ala.basin_labels(fr["phi_deg"], fr["psi_deg"])))
    p = w[order] / w.sum()
    rng = np.random.default_rng(seed)
    u0 = rng.random()
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    idx = np.sort(order[np.searchsorted(cdf, (np.arange(n_frames) + u0) / n_frames, side="right")])
    n_unique = len(np.unique(idx))
    info["pack"] = {"n_frames": n_frames, "unique_frames": int(n_unique), "resample_seed": seed,
                    "method": "systematic resampling of the production frames, ordered by (basin, "
                              "time), with probability proportional to exp(log_weight): an "
                              "equally weighted 300 K set, stratified by basin; time order kept",
                    "source_frames": int(len(w))}
    pops = ala.basin_populations(fr["phi_deg"][idx], fr["psi_deg"][idx])
    info["pack"]["populations_of_packed_positions"] = pops
    pos = fr["positions_A"][idx].astype(np.float64)
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        dst,
        positions=(pos - pos.mean(axis=1, keepdims=True)).astype(np.float32),
        phi=fr["phi_deg"][idx].astype(np.float32), psi=fr["psi_deg"][idx].astype(np.float32),
        energy_kT=(fr["potential_kJmol"][idx] / KT).astype(np.float32),
        t_ps=fr["t_ps"][idx].astype(np.float32),
        all_phi=fr["phi_deg"].astype(np.float32), all_psi=fr["psi_deg"].astype(np.float32),
        all_log_weight=fr["log_weight"].astype(np.float32),
        all_energy_kT=(fr["potential_kJmol"] / KT).astype(np.float32),
        info=np.array(json.dumps(info)))
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB): {n_frames} frames "
          f"({n_unique} unique) from {len(w)}; populations of the packed set {pops}")


# ----------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=float, default=1000.0, help="production length (ns)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--method", choices=["metad", "plain"], default="metad")
    ap.add_argument("--prmtop", type=Path, default=ala.PRMTOP_PATH)
    ap.add_argument("--crd", type=Path, default=ala.CRD_PATH)
    ap.add_argument("--platform", default="Reference", choices=["Reference", "CPU"])
    ap.add_argument("--friction", type=float, default=1.0, help="1/ps")
    ap.add_argument("--dt-fs", type=float, default=2.0)
    ap.add_argument("--equil-ps", type=float, default=100.0)
    ap.add_argument("--metad-ns", type=float, default=20.0)
    ap.add_argument("--metad-height", type=float, default=1.2, help="kJ/mol")
    ap.add_argument("--metad-width", type=float, default=0.35, help="rad")
    ap.add_argument("--metad-pace", type=int, default=500, help="steps between Gaussians")
    ap.add_argument("--bias-factor", type=float, default=6.0)
    ap.add_argument("--grid", type=int, default=360)
    ap.add_argument("--discard-ns", type=float, default=1.0)
    ap.add_argument("--record-ps", type=float, default=1.0)
    ap.add_argument("--frame-ps", type=float, default=5.0)
    ap.add_argument("--chunk-ns", type=float, default=10.0)
    ap.add_argument("--analyze", type=Path, help="only redo the analysis of this output folder")
    ap.add_argument("--compare", type=Path, help="with --analyze: an independent run (e.g. "
                    "--method plain) whose phi < 0 populations are compared in the JSON")
    ap.add_argument("--pack", type=Path, help="output folder to pack into --to")
    ap.add_argument("--to", type=Path, default=ala.REFERENCE_PATH)
    ap.add_argument("--frames", type=int, default=15000)
    args = ap.parse_args(argv)

    if args.pack:
        pack(args.pack, args.to, args.frames, args.seed)
        return
    out = args.analyze or args.out
    if out is None:
        ap.error("--out (or --analyze/--pack) is required")
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    settings_path = out / "settings.json"
    if args.analyze:
        settings = json.loads(settings_path.read_text())
        analyze(out, settings, log, compare=args.compare)
        return

    import openmm

    keys = ["ns", "seed", "method", "platform", "friction", "dt_fs", "equil_ps", "metad_ns",
            "metad_height", "metad_width", "metad_pace", "bias_factor", "grid", "discard_ns",
            "record_ps", "frame_ps", "chunk_ns"]
    settings = {k: getattr(args, k) for k in keys}
    settings.update({
        "system": "alanine dipeptide (Ace-Ala-Nme), vacuum, Amber ff96 (openmmtools "
                  "alanine-dipeptide-gbsa prmtop, no implicit solvent)",
        "create_system": "createSystem(nonbondedMethod=NoCutoff, constraints=HBonds, implicitSolvent=None)",
        "integrator": "LangevinMiddleIntegrator", "temperature_K": TEMPERATURE, "kT_kJmol": KT,
        "prmtop_sha256": sha256(args.prmtop), "crd_sha256": sha256(args.crd),
        "openmm_version": openmm.__version__,
        "method_doc": ("frozen well-tempered-metadynamics bias on phi, exact reweighting "
                       "w = exp(V(phi)/kT)") if args.method == "metad" else "plain MD, equal weights",
        "units": {"positions": "Angstrom", "angles": "degrees", "energies": "kJ/mol unless _kT"},
    })
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        diff = {k: (old.get(k), settings[k]) for k in keys if old.get(k) != settings[k]}
        if diff:
            raise SystemExit(f"{out} holds a run with other settings: {diff}")
        timings = old.get("timings", {})
        settings = old
    else:
        timings = {}
    settings.update({"host": socket.gethostname(), "python": pyplatform.python_version(),
                     "cpu": pyplatform.processor() or pyplatform.machine()})
    settings_path.write_text(json.dumps(settings, indent=1))

    if not (out / "bias.npz").exists():
        log(f"preparing ({args.method}), seed {args.seed}")
        timings.update(prepare(args, out, log))
        settings["timings"] = timings
        settings_path.write_text(json.dumps(settings, indent=1))
    t0 = time.time()
    run_production(args, out, log)
    timings["production_s_this_session"] = time.time() - t0
    timings["production_s_total"] = timings.get("production_s_total", 0.0) + time.time() - t0
    settings["timings"] = timings
    settings_path.write_text(json.dumps(settings, indent=1))
    t0 = time.time()
    info = analyze(out, settings, log)
    info["timings"]["analysis_s"] = time.time() - t0
    (out / "reference.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
