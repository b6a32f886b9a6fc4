"""Systems: what is sampled (atoms, dimension, energy) and, where known, exact answers."""
from digfast.systems.mixture import GaussianMixture

SYSTEMS = {"mixture": GaussianMixture.default}


def get_system(name: str):
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")
    return SYSTEMS[name]()


__all__ = ["GaussianMixture", "SYSTEMS", "get_system"]
