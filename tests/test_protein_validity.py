"""Physical validity of sampled protein backbones: the checks, and redraw / drop / keep in the sampler."""
import pytest
import torch
from protein_helpers import SMALL, random_inputs, random_model

from digfast.protein.engine import sample_protein
from digfast.protein.validity import CA_CA, BackboneGeometry
from digfast.validity import redraw_seed


def test_backbone_geometry_finds_breaks_and_clashes(rng):
    n, L = 6, 9
    steps = torch.randn(n, L - 1, 3, generator=rng, dtype=torch.float64)
    chain = torch.cat([torch.zeros(n, 1, 3, dtype=torch.float64),
                       (CA_CA * steps / steps.norm(dim=-1, keepdim=True)).cumsum(1)], 1)
    # a straight-ish chain: no clashes
    straight = torch.arange(L, dtype=torch.float64)[None, :, None] * torch.tensor([CA_CA, 0, 0]) + 0.05 * chain
    rot = torch.eye(3).expand(n, L, 3, 3)
    check = BackboneGeometry(tolerance=0.5, min_distance=3.0)
    assert check(straight, rot).all()
    broken = straight.clone()
    broken[1, 5:] += torch.tensor([2.0, 0, 0], dtype=torch.float64)  # a chain break
    clash = straight.clone()
    clash[3, 6] = clash[3, 3] + torch.tensor([0.5, 1.0, 0], dtype=torch.float64)
    clash[3, 7:] = clash[3, 6] + (straight[3, 7:] - straight[3, 6])
    got = check(torch.stack([straight[0], broken[1], straight[2], clash[3]]), rot[:4])
    assert got.tolist() == [True, False, True, False]


def _run(model, inputs, **kw):
    return sample_protein(model, inputs["single"], inputs["pair"], **{"n": 6, "steps": 3, "sampler": "sde",
                                                                        "batch_size": 4, **kw})


def test_invalid_samples_are_redrawn_dropped_or_kept(rng):
    model = random_model(SMALL, rng)
    inputs = random_inputs(1, 5, rng)
    plain = _run(model, inputs, validity=None)
    # midway between the 3rd and 4th values: the median itself is a sample's value, which fp32
    # rounding of another batch size can move to either side of the threshold
    ordered = plain.tr[:, 0, 0].sort().values
    threshold = 0.5 * (ordered[2] + ordered[3])

    def check(tr, rot):  # a property about half the draws fail
        return tr[:, 0, 0] <= threshold

    failing = (~check(plain.tr, plain.rot)).nonzero().flatten().tolist()
    assert 0 < len(failing) < 6
    kept = _run(model, inputs, validity=check, on_invalid="keep")
    assert torch.equal(kept.tr, plain.tr) and kept.metadata["n_invalid_draws"] == len(failing)
    dropped = _run(model, inputs, validity=check, on_invalid="drop")
    assert dropped.metadata["dropped_ids"] == failing and len(dropped.tr) == 6 - len(failing)
    redrawn = _run(model, inputs, validity=check, on_invalid="redraw", max_attempts=50)
    assert check(redrawn.tr, redrawn.rot).all() and redrawn.metadata["n_redrawn"] >= len(failing)
    survivors = [k for k in range(6) if k not in redrawn.metadata["dropped_ids"]]
    assert len(survivors) == len(redrawn.tr)
    # a structure that passed first time is unchanged; a redrawn one is sample k of a derived seed
    for row, k in enumerate(survivors):
        if k not in failing:
            torch.testing.assert_close(redrawn.tr[row], plain.tr[k], rtol=0, atol=0)
    k = failing[0]
    if k in survivors:
        row = survivors.index(k)
        attempts = [redraw_seed(0, a) for a in range(1, 50)]
        alone = [sample_protein(model, inputs["single"], inputs["pair"], n=1, steps=3, sampler="sde", seed=s,
                                first_sample_id=k).tr[0] for s in attempts[:10]]
        assert min(float((redrawn.tr[row] - a).abs().max()) for a in alone) < 1e-4
    # reproducible, and the same whatever the batch size
    again = _run(model, inputs, validity=check, on_invalid="redraw", max_attempts=50, batch_size=6)
    torch.testing.assert_close(again.tr, redrawn.tr, rtol=1e-5, atol=1e-4)  # fp32 at ~30 A


def test_bad_validity_arguments(rng):
    model = random_model(SMALL, rng)
    inputs = random_inputs(1, 4, rng)
    with pytest.raises(ValueError, match="unknown on_invalid"):
        _run(model, inputs, on_invalid="fix")
    with pytest.raises(ValueError, match="max_attempts must be"):
        _run(model, inputs, max_attempts=0)
    with pytest.raises(ValueError, match="returned"):
        _run(model, inputs, validity=lambda tr, rot: torch.ones(2, dtype=torch.bool))
