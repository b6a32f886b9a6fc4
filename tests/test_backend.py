"""One backend choice for all ops: the global DIGFAST_BACKEND switch and per-call backends."""
import pytest
import torch

from digfast.ops import _backend
from digfast.ops.pair_bias_attention import pair_bias_attention, pair_bias_attention_reference
from digfast.ops.vector_head import fused_vector_head


def _attention_inputs(rng):
    q, k, v = (torch.randn(2, 3, 5, 8, generator=rng) for _ in range(3))
    return q, k, v, torch.randn(2, 3, 5, 5, generator=rng)


def test_global_switch_runs_the_reference_of_ops_without_that_backend(rng, monkeypatch):
    """DIGFAST_BACKEND=cpp forces the compiled sampler step; the Triton-only ops, which have no
    cpp backend, run their reference instead of raising."""
    args = _attention_inputs(rng)
    expected = pair_bias_attention_reference(*args)
    monkeypatch.setenv("DIGFAST_BACKEND", "cpp")
    for op in ("spatial_bias", "pair_bias_attention", "fused_vector_head"):
        assert _backend.choose(op, torch.device("cpu")) == "reference"
        assert _backend.choose(op, torch.device("cuda")) == "reference"
    assert torch.equal(pair_bias_attention(*args), expected)
    q, k, _, bias = args
    x, vw = torch.randn(2, 5, 3, generator=rng), torch.randn(2, 3, 5, generator=rng)
    assert fused_vector_head(q, k, bias, x, vw).shape == (2, 5, 3)


def test_global_switch_still_refuses_what_an_op_has_but_cannot_use(monkeypatch):
    monkeypatch.setenv("DIGFAST_BACKEND", "triton")  # registered, but not on the CPU
    with pytest.raises(RuntimeError, match="not available on cpu"):
        _backend.choose("pair_bias_attention", torch.device("cpu"))
    monkeypatch.setenv("DIGFAST_BACKEND", "tpu")  # no backend at all
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        _backend.choose("pair_bias_attention", torch.device("cpu"))


def test_explicit_backend_raises_clearly(rng, monkeypatch):
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    args = _attention_inputs(rng)
    with pytest.raises(ValueError, match=r"pair_bias_attention has no backend 'cpp'.*'triton'"):
        pair_bias_attention(*args, backend="cpp")
    monkeypatch.setenv("DIGFAST_BACKEND", "cpp")  # the switch does not soften a named choice
    with pytest.raises(ValueError, match="fused_vector_head has no backend 'cuda'"):
        _backend.choose("fused_vector_head", torch.device("cpu"), "cuda")
    if not _backend.available("triton", torch.device("cuda")):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="'triton' of pair_bias_attention is not available"):
            pair_bias_attention(*args, backend="triton")
