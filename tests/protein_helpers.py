"""Shared pieces of the protein tests: small configs, random weights in the public layout,
random frames and inputs."""
from pathlib import Path

import torch

from digfast.models.protein import ProteinConfig, ProteinScoreModel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURE = SHARED / "fixtures" / "dig_protein_tiny.npz"
LAYOUT = SHARED / "official-dig-protein-state-dict.txt"

SMALL = ProteinConfig(d_model=48, d_pair=16, n_layers=2, n_heads=4)


def random_state(cfg: ProteinConfig, gen: torch.Generator, dtype=torch.float32) -> dict:
    """Random weights of unit-ish scale for every tensor of the layout (LayerNorms near 1)."""
    state = {}
    for name, t in ProteinScoreModel(cfg).state_dict().items():
        w = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        if t.dim() == 2:
            w = w / (3 * t.shape[-1]) ** 0.5  # the std of torch.nn.Linear default init
        elif name.endswith("weight") and "point_weight" not in name:  # LayerNorm gains
            w = 1.0 + 0.1 * w
        elif "point_weight" not in name:  # biases
            w = 0.1 * w
        state[name] = w.to(dtype)
    return state


def random_model(cfg: ProteinConfig, gen: torch.Generator, dtype=torch.float32) -> ProteinScoreModel:
    model = ProteinScoreModel(cfg)
    model.load_state_dict(random_state(cfg, gen), strict=True)
    return model.to(dtype).eval()


def random_rotations(n: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    q = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                     2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                     2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)
    return R.view(n, 3, 3).to(dtype)


def random_inputs(B: int, L: int, gen: torch.Generator, cfg: ProteinConfig = SMALL, dtype=torch.float32):
    """Frames (T spread over ~10 A, random rotations), a step per structure, single and pair."""
    return dict(
        T=(10 * torch.randn(B, L, 3, generator=gen, dtype=torch.float64)).to(dtype),
        IR=random_rotations(B * L, gen, dtype).view(B, L, 3, 3),
        step=torch.randint(0, 500, (B,), generator=gen),
        single=torch.randn(L, cfg.d_single_in, generator=gen, dtype=torch.float64).to(dtype),
        pair=torch.randn(L, L, cfg.d_pair_in, generator=gen, dtype=torch.float64).to(dtype),
    )
