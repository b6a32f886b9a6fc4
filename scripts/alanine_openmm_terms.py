"""Write tests/fixtures/alanine_openmm_terms.npz: OpenMM's energy terms of perturbed alanine
dipeptide structures, so that tests without OpenMM still check digfast's torch Amber energy
on every term (the shipped MD energies leave the X-H bonds at r0, where they give nothing).

    python scripts/alanine_openmm_terms.py          # needs OpenMM; seeded, reruns bit-identically
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm

from digfast.systems import alanine as ala

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "alanine_openmm_terms.npz"
FORCES = ("HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "NonbondedForce")


def main(n: int = 8, seed: int = 0, scale: float = 0.05):
    rng = np.random.default_rng(seed)
    x = ala.load_reference()["positions"][rng.choice(ala.TRAIN_FRAMES, n, replace=False)].astype(np.float64)
    x += scale * rng.standard_normal(x.shape)  # every bond and angle off its minimum
    saved = ala.AlanineDipeptide().openmm_terms(x)
    terms = np.stack([saved[name] for name in FORCES], axis=1)
    OUT.parent.mkdir(exist_ok=True)
    np.savez(OUT, positions=x, terms_kj_mol=terms, forces=np.array(FORCES), openmm_version=openmm.__version__)
    print(f"wrote {OUT}: {n} structures, terms {FORCES}")


if __name__ == "__main__":
    main()
