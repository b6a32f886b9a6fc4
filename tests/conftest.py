import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A fresh generator per test: new inputs every run, reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def mixture():
    from digfast.systems import GaussianMixture

    return GaussianMixture.default()
