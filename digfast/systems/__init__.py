"""Systems: what is sampled (atoms, dimension, energy) and, where known, exact answers."""
from digfast.systems.mixture import GaussianMixture
from digfast.systems.alanine import AlanineDipeptide
from digfast.systems.particles import DoubleWell4, LennardJones13

SYSTEMS = {"mixture": GaussianMixture.default, "dw4": DoubleWell4, "lj13": LennardJones13,
           "alanine-dipeptide": AlanineDipeptide}


def get_system(name: str):
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")
    return SYSTEMS[name]()


__all__ = ["GaussianMixture", "DoubleWell4", "LennardJones13", "AlanineDipeptide", "SYSTEMS", "get_system"]
