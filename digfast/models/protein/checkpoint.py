"""Load the public DiG protein checkpoint (torch.load(path)["state_dict"], keys optionally
prefixed "module.") onto ProteinScoreModel, strictly: every missing, unexpected or mis-shaped
key is named in one error."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from digfast.models.protein.config import ProteinConfig
from digfast.models.protein.model import ProteinScoreModel


class CheckpointError(ValueError):
    """A checkpoint that does not fit the public protein layout; the message lists why."""


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint file (or of an already loaded object): the "state_dict"
    entry if there is one, "module." prefixes removed."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such checkpoint file: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for foreign or corrupt files
            raise CheckpointError(f"{path.name}: not a readable torch checkpoint "
                                  f"({type(err).__name__}: {err})") from err
    else:
        obj = source
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state_dict (a dict of tensor names -> tensors, "
                              "or {'state_dict': {...}})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def infer_config(state: dict[str, torch.Tensor]) -> ProteinConfig:
    """Model sizes from the tensors' shapes (defaults where a key is absent: the strict load
    then names it)."""
    defaults = ProteinConfig()

    def dim(key, axis, default):
        return int(state[key].shape[axis]) if key in state and state[key].dim() > axis else default

    layers = {int(m.group(1)) for k in state if (m := re.match(r"st_module\.encoder\.layers\.(\d+)\.", k))}
    return ProteinConfig(
        d_model=dim("x1d_proj.1.weight", 0, defaults.d_model),
        d_pair=dim("x2d_proj.1.weight", 0, defaults.d_pair),
        n_layers=max(layers) + 1 if layers else defaults.n_layers,
        n_heads=dim("st_module.encoder.layers.0.attn.trained_point_weight", 0, defaults.n_heads),
    )


def check_layout(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
    if problems:
        raise CheckpointError("checkpoint does not match the DiG protein layout "
                              f"({len(expected)} keys):\n  " + "\n  ".join(problems))


def load_official_protein(path, config: ProteinConfig | None = None, *, dtype=torch.float32,
                          device="cpu") -> ProteinScoreModel:
    """ProteinScoreModel with the weights of a public-layout checkpoint, in eval mode. Sizes
    come from the tensors' shapes unless config is given."""
    state = read_state_dict(path)
    cfg = config or infer_config(state)
    model = ProteinScoreModel(cfg)
    check_layout(model, state)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
