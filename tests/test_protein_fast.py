"""The fast protein path (per-protein precompute, pair-value rewrite, batched samples sharing
the pair data) against the reference model in the public layout."""
import pytest
import torch

from digfast.models.protein.fast import FastProteinModel
from digfast.ops.ipa_attention import ipa_attention, ipa_attention_reference

from protein_helpers import SMALL, random_inputs, random_model


def reference_outputs(model, x, padding=None):
    B = x["T"].shape[0]
    L = x["single"].shape[0]
    with torch.no_grad():
        return model(x["T"], x["IR"], x["step"], x["single"].expand(B, L, -1), x["pair"].expand(B, L, L, -1), padding)


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("L", [1, 7, 65, 130])
def test_fast_path_matches_reference_fp32(rng, L):
    """One call for a batch of 3 structures (all at one step) vs the reference one structure
    at a time: 1e-5 relative (max error over max magnitude) in fp32."""
    model = random_model(SMALL, rng)
    x = random_inputs(3, L, rng)
    x["step"] = x["step"][:1].expand(3)
    fast = FastProteinModel(model)
    ctx = fast.context(x["single"], x["pair"])
    got = fast(ctx, x["T"], x["IR"], int(x["step"][0]))
    for b in range(3):
        one = {k: (v[b:b + 1] if k in ("T", "IR", "step") else v) for k, v in x.items()}
        want = reference_outputs(model, one)
        for g, w in zip(got, want):
            assert rel_err(g[b:b + 1], w) < 1e-5, (L, b, rel_err(g[b:b + 1], w))


def test_fast_path_padding_matches_reference(rng):
    model = random_model(SMALL, rng)
    x = random_inputs(3, 9, rng)
    x["step"] = x["step"][:1].expand(3)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 6:] = True
    padding[2] = True  # all padded: treated as unpadded, as the public code does
    fast = FastProteinModel(model)
    got = fast(fast.context(x["single"], x["pair"]), x["T"], x["IR"], int(x["step"][0]), padding)
    want = reference_outputs(model, x, padding)
    real = ~padding | padding.all(1, keepdim=True)
    for g, w in zip(got, want):
        assert rel_err(g[real], w[real]) < 1e-5
    # padded keys really are ignored: moving a padded residue changes no real output
    x["T"][0, 7] += 50.0
    moved = fast(fast.context(x["single"], x["pair"]), x["T"], x["IR"], int(x["step"][0]), padding)
    assert torch.allclose(moved[0][0, :6], got[0][0, :6], rtol=0, atol=1e-6)


def test_pair_data_shared_not_copied(rng):
    """The context holds z and the per-layer biases once; the batch does not replicate them."""
    model = random_model(SMALL, rng)
    x = random_inputs(4, 11, rng)
    fast = FastProteinModel(model)
    ctx = fast.context(x["single"], x["pair"])
    assert ctx.z.shape == (11, 11, SMALL.d_pair)
    assert ctx.pair_bias.shape == (SMALL.n_layers, SMALL.n_heads, 11, 11)
    # the per-layer bias is the reference's (1/sqrt 3) W_b z for every layer
    z = model.pair_features(x["pair"][None])[0]
    for li, layer in enumerate(model.st_module.encoder.layers):
        want = layer.attn.pair_bias(z).permute(2, 0, 1) / 3**0.5
        torch.testing.assert_close(ctx.pair_bias[li], want.detach())


def test_pair_value_rewrite_is_exact_in_fp64(rng):
    """sum_j a_hij (W z_ij)_h == W_h (sum_j a_hij z_ij) in float64 (to rounding), with the
    probabilities of the reference attention core."""
    B, H, L, c, dp = 2, 3, 13, 5, 7
    g = lambda *s: torch.randn(*s, generator=rng, dtype=torch.float64)  # noqa: E731
    q, k, v = g(B, H, L, c), g(B, H, L, c), g(B, H, L, c)
    qp, kp, vp = g(B, H, L, 4, 3), g(B, H, L, 4, 3), g(B, H, L, 8, 3)
    w, bias, z = -g(H).abs(), g(H, L, L), g(L, L, dp)
    W = g(H * c, dp)
    o_s, o_p, o_z = ipa_attention(q, k, v, qp, kp, vp, w, bias, z)
    s = q @ k.transpose(-1, -2) + w.view(1, H, 1, 1) * (qp[:, :, :, None] - kp[:, :, None]).norm(dim=-1).sum(-1) + bias
    a = torch.softmax(s, -1)
    full = torch.einsum("bhij,ijhc->bhic", a, (z @ W.T).view(L, L, H, c))
    rewritten = torch.einsum("bhid,hcd->bhic", o_z, W.view(H, c, dp))
    torch.testing.assert_close(rewritten, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o_s, a @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o_p, torch.einsum("bhij,bhjpx->bhipx", a, vp), rtol=1e-12, atol=1e-12)


def test_rows_without_keys_are_zero(rng):
    B, H, L = 1, 2, 4
    g = lambda *s: torch.randn(*s, generator=rng)  # noqa: E731
    out = ipa_attention_reference(g(B, H, L, 3), g(B, H, L, 3), g(B, H, L, 3), g(B, H, L, 4, 3), g(B, H, L, 4, 3),
                                  g(B, H, L, 8, 3), -g(H).abs(), g(H, L, L), g(L, L, 5),
                                  torch.zeros(B, L, dtype=torch.bool))
    assert all(torch.isfinite(o).all() and (o == 0).all() for o in out)


def test_bf16_fast_path_close_to_fp32(rng):
    """bf16 linears and pair data: within a few bf16 ulps of the fp32 outputs."""
    model = random_model(SMALL, rng)
    x = random_inputs(2, 20, rng)
    step = int(x["step"][0])
    f32, f16 = FastProteinModel(model), FastProteinModel(model, dtype=torch.bfloat16)
    a = f32(f32.context(x["single"], x["pair"]), x["T"], x["IR"], step)
    b = f16(f16.context(x["single"], x["pair"]), x["T"], x["IR"], step)
    for g, w in zip(b, a):
        assert g.dtype == torch.float32
        assert 1e-5 < rel_err(g, w) < 0.05


def test_fast_path_refuses_float64(rng):
    model = random_model(SMALL, rng)
    with pytest.raises(ValueError, match="float64: use the reference"):
        FastProteinModel(model, dtype=torch.float64)
