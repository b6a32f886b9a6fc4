"""DiG protein model in the public layout: checkpoint loading (strict, clear errors), the
full-size layout, and the reference against the public code's own outputs (fixture)."""
import numpy as np
import pytest
import torch

from digfast.models.protein import CheckpointError, ProteinConfig, ProteinScoreModel, load_official_protein
from digfast.models.protein.features import relative_position_buckets, step_embedding

from protein_helpers import FIXTURE, LAYOUT, SMALL, random_inputs, random_state


def fake_checkpoint(path, state):
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "step": 520000}, path)


def test_full_size_layout_matches_public_checkpoint():
    """81,916,294 parameters in 248 tensors (the reference list has 248 tensor lines and a
    TOTAL line: the "249" quoted for it counts that line), and (when the shared reference is
    present) exactly its names and shapes."""
    with torch.device("meta"):
        state = ProteinScoreModel(ProteinConfig()).state_dict()
    assert len(state) == 248
    assert sum(t.numel() for t in state.values()) == 81_916_294
    if LAYOUT.exists():
        listed = {}
        for line in LAYOUT.read_text().splitlines():
            if line and not line.startswith("TOTAL"):
                name, shape = line.split(" ", 1)
                listed[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        assert {k: tuple(v.shape) for k, v in state.items()} == listed


def test_loader_infers_full_size_config():
    """Sizes inferred from a full-size state_dict's shapes (meta tensors: nothing allocated)."""
    from digfast.models.protein.checkpoint import infer_config
    with torch.device("meta"):
        state = ProteinScoreModel(ProteinConfig()).state_dict()
    assert infer_config(state) == ProteinConfig()


def test_loader_round_trip_and_outputs(tmp_path, rng):
    state = random_state(SMALL, rng)
    fake_checkpoint(tmp_path / "ckpt.pth", state)
    model = load_official_protein(tmp_path / "ckpt.pth")
    assert model.cfg == SMALL and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    direct = ProteinScoreModel(SMALL)
    direct.load_state_dict(state)
    x = random_inputs(2, 5, rng)
    args = (x["T"], x["IR"], x["step"], x["single"].expand(2, -1, -1), x["pair"].expand(2, -1, -1, -1))
    with torch.no_grad():
        for a, b in zip(model(*args), direct.eval()(*args)):
            assert torch.equal(a, b)


def test_loader_names_every_bad_key(tmp_path, rng):
    state = random_state(SMALL, rng)
    del state["st_module.encoder.layers.1.attn.pair_value.weight"]
    del state["rp_proj.relative_attention_bias.weight"]
    state["st_module.encoder.layers.0.attn.extra.weight"] = torch.zeros(3)
    state["st_module.diff_head.fc_t.3.weight"] = torch.zeros(4, SMALL.d_model)
    fake_checkpoint(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointError) as err:
        load_official_protein(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "2 missing keys" in msg and "layers.1.attn.pair_value.weight" in msg
    assert "rp_proj.relative_attention_bias.weight" in msg
    assert "1 unexpected keys" in msg and "layers.0.attn.extra.weight" in msg
    assert "1 mis-shaped keys" in msg and "fc_t.3.weight: checkpoint (4, 48), model (3, 48)" in msg


def test_loader_rejects_non_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_official_protein(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_official_protein(tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        load_official_protein(tmp_path / "none.pth")


def test_relative_position_buckets_t5_rule():
    b = relative_position_buckets(300, 64, 128)
    d = torch.arange(300)[:, None] - torch.arange(300)[None, :]
    assert torch.equal(b[d == 0], torch.zeros_like(b[d == 0]))
    assert b[5, 0] == 5 and b[0, 5] == 32 + 5 and b[15, 0] == 15 and b[16, 0] == 16
    # log spacing: |d| = 16 * 8^(m/16) starts bucket 16 + m; beyond 128 the last bucket
    assert b[32, 0] == 16 + 5 and b[127, 0] == 31 and b[299, 0] == 31 and b[0, 299] == 63
    assert (b[d > 0] < 32).all() and (b[d < 0] >= 32).all()


def test_step_embedding_formula():
    e = step_embedding(torch.tensor([0, 7]), 8, 1e4)
    w = 1e4 ** (-torch.arange(4) / 3.0)
    torch.testing.assert_close(e[1], torch.cat([torch.sin(7 * w), torch.cos(7 * w)]))
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))


@pytest.mark.skipif(not FIXTURE.exists(), reason="public-code fixture not present")
def test_reference_matches_public_code_outputs():
    """The public code's own forward outputs (tiny config, random weights, one padded
    structure): 1e-5 relative on the unpadded residues."""
    d = np.load(FIXTURE)
    cfg = ProteinConfig(d_model=int(d["config:d_model"]), d_pair=int(d["config:d_pair"]),
                        n_layers=int(d["config:n_layer"]), n_heads=int(d["config:n_heads"]))
    state = {k[len("param:"):]: torch.from_numpy(d[k]) for k in d.files if k.startswith("param:")}
    model = load_official_protein({"state_dict": state}, cfg)
    f = {k[4:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("fwd:")}
    with torch.no_grad():
        T_eps, IR_eps = model(f["T"], f["IR"], f["step"], f["single"], f["pair"], f["mask"])
    real = ~f["mask"]
    for got, want in ((T_eps, f["T_eps"]), (IR_eps, f["IR_eps"])):
        err = (got - want)[real].abs().max() / want[real].abs().max()
        assert err < 1e-5, float(err)
