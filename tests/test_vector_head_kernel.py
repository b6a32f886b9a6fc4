"""The fused equivariant vector head (kernels/vector_head.py) against the reference.

Oracle: fused_vector_head_reference in float64, itself checked against the unfused
vector_head_reference (attention probabilities and per-feature values) in float64.
Tolerance per output or gradient (absolute, over the whole tensor): 2 * (error of the same
reference run in float32) + 8 * EPS * S, EPS = 2^-23, S = max_i sum_h sum_j p_hij |vw_hj|
for outputs (|u_ij| <= 1, so S is the largest row sum of the terms' magnitudes, which is what
float32 rounding scales with; the output itself may be much smaller by cancellation) and the
largest gradient magnitude for gradients. The kernel sums the same terms in float32 in another order (online
softmax, in-tile unit vectors), so it may be at most about twice as wrong as torch.
Outputs are NaN-filled before the kernel runs, so an entry never written fails.
"""

import pytest
import torch

from digfast.ops import _backend
from digfast.ops.vector_head import (fused_vector_head, fused_vector_head_reference,
                                     fused_vector_head_rows_reference, vector_head_reference)

from interpreted import fresh_generator, run_interpreted

EPS = 2.0**-23
ARGS = ("q", "k", "bias", "x", "vw", "key_mask")


def make_inputs(rng, B, H, N, dh, d, bias, masked, dtype=torch.float32):
    """q, k of unit scale (logits O(1)), bias O(1) or None, coordinates of unit scale, vw O(1).
    masked: a (B, N) key mask (key 0 kept) with one all-padded sample when B >= 2 (its rows
    must come out 0); bias "inf" (with masked): that padding as -inf in the bias instead."""
    q, k = (torch.randn(B, H, N, dh, generator=rng, dtype=dtype) for _ in range(2))
    b = torch.randn(B, H, N, N, generator=rng, dtype=dtype) if bias else None
    x = torch.randn(B, N, d, generator=rng, dtype=dtype)
    vw = torch.randn(B, H, N, generator=rng, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=rng) < 0.7
        mask[:, 0] = True
        if B >= 2:
            mask[1] = False
    if bias == "inf":  # the padding written as -inf into the bias, as Graphormer3D does
        b = b.masked_fill(~mask[:, None, None, :], float("-inf"))
        mask = None
    return dict(q=q, k=k, bias=b, x=x, vw=vw, key_mask=mask)


def args_of(case, dtype=None):
    def cast(t):
        return t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t
    return [None if case[k] is None else cast(case[k]) for k in ARGS]


def magnitude(t):
    t = t.detach()
    return float(t.abs().max()) if t.numel() else 0.0


def assert_close_to_oracle(name, got, ref64, ref32, scale):
    got, ref64, ref32 = got.detach(), ref64.detach(), ref32.detach()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries (unwritten or overflow)"
    err = float((got.double() - ref64).abs().max()) if got.numel() else 0.0
    torch_err = float((ref32.double() - ref64).abs().max()) if got.numel() else 0.0
    tol = 2 * torch_err + 8 * EPS * scale
    print(f"{name}: max error {err:.2e}, float32 torch {torch_err:.2e}, tolerance {tol:.2e}")
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


def output_scale(case):
    """S = max_i sum_h sum_j p_hij |vw_hj| (float64): the largest row sum of the magnitudes of
    the terms (|u_ij| <= 1), which is what float32 rounding of the output scales with."""
    q, k, bias, _, vw, mask = args_of(case, torch.float64)
    logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows without keys: no terms
    return float((p * vw.abs()[:, :, None, :]).sum(dim=(1, 3)).max())


def random_rotation(rng, d):
    """A proper rotation (det +1) from the QR of a Gaussian matrix."""
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=rng, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    if torch.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


# ---- references ----------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 3])
def test_fused_reference_is_vector_head_reference_float64(rng, d):
    """vw = sum_f W[h,f] v_hjf folded in before the attention sum changes nothing."""
    B, H, N, dh = 2, 4, 11, 12
    case = make_inputs(rng, B, H, N, dh, d, True, True, dtype=torch.float64)
    case["key_mask"][1] = torch.rand(N, generator=rng) < 0.7  # keep a key in every sample
    case["key_mask"][:, 0] = True
    q, k, bias, x, _, mask = args_of(case)
    v = torch.randn(B, H, N, dh, generator=rng, dtype=torch.float64)
    W = torch.randn(H * dh, generator=rng, dtype=torch.float64)
    logits = (q @ k.transpose(-1, -2)) / dh**0.5 + bias
    attn = torch.softmax(logits.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    expected = vector_head_reference(attn, x, v, W)
    vw = torch.einsum("bhjf,hf->bhj", v, W.reshape(H, dh))
    got = fused_vector_head_reference(q, k, bias, x, vw, mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # the padding written as -inf into the bias (as Graphormer3D does) is the same
    as_bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(fused_vector_head_reference(q, k, as_bias, x, vw), expected,
                               rtol=1e-12, atol=1e-12)


def test_rows_reference_in_chunks_and_empty_rows(rng):
    """Row blocks of the reference stitch into the whole; a sample without keys gives 0."""
    case = make_inputs(rng, 2, 3, 9, 12, 3, True, True, dtype=torch.float64)
    q, k, bias, x, vw, mask = args_of(case)
    whole = fused_vector_head_reference(q, k, bias, x, vw, mask)
    parts = [fused_vector_head_rows_reference(q[:, :, r], k, bias[:, :, r], x[:, r], x, vw, mask)
             for r in (slice(0, 4), slice(4, 9))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-13, atol=1e-13)
    assert torch.isfinite(whole).all() and (whole[1] == 0).all()


# ---- Triton, under the interpreter on the CPU ----------------------------------------------
# One subprocess runs every case with TRITON_INTERPRET=1 (see tests/interpreted.py for why).

# (B, H, N, dh, d, bias, masked): N = 1, 7, 33, 100 (tiles of 16 and 64, partial last tiles);
# dh 12, 24 (padded to 16, 32 in the kernel) and 32; d 2 and 3; key masks with an all-padded
# sample.
FORWARD_CASES = [
    (1, 1, 1, 24, 3, True, False),
    (3, 4, 1, 12, 2, False, True),
    (1, 4, 7, 24, 3, True, True),
    (3, 1, 7, 32, 2, False, False),
    (1, 1, 33, 24, 2, True, False),
    (3, 4, 33, 32, 3, True, True),
    (1, 4, 100, 12, 3, False, False),
    (3, 2, 100, 24, 2, True, True),
    (3, 4, 33, 24, 3, "inf", True),
]
GRAD_CASE = (3, 2, 33, 24, 3, True, True)
EQUIVARIANCE_CASE = (2, 4, 40, 24, 3, True, True)

_TRITON_WORKER = """
import sys, torch
import digfast.kernels.vector_head as vh
forward, grad_case, equi = torch.load(sys.argv[1])
ARGS = ("q", "k", "bias", "x", "vw", "key_mask")
nan = float("nan")

def run(case):
    out = torch.full(case["x"].shape, nan)
    return vh.fused_vector_head_forward_into(out, *(case[k] for k in ARGS))

outs = [run(case) for case in forward]
vh.BACKWARD_CHUNK_ELEMENTS = 4096   # several row chunks in the recomputed backward
names = ("q", "k", "bias", "x", "vw")
leaves = [grad_case[k].clone().requires_grad_(k in names) if k in names else grad_case[k]
          for k in ARGS]
got = vh.fused_vector_head_triton(*leaves)
grads = torch.autograd.grad(got, leaves[:5], grad_case["g_out"])
equi_outs = (run(equi), run(dict(equi, x=equi["x_rot"])))
torch.save((outs, (got.detach(), dict(zip(names, grads))), equi_outs), sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    forward = [make_inputs(rng, *c) for c in FORWARD_CASES]
    grad_case = make_inputs(rng, *GRAD_CASE)
    grad_case["g_out"] = torch.randn(grad_case["x"].shape, generator=rng)
    equi = make_inputs(rng, *EQUIVARIANCE_CASE)
    R = random_rotation(rng, equi["x"].shape[-1])
    equi.update(R=R, x_rot=(equi["x"].double() @ R.T).float())
    outs, grads, equi_outs = run_interpreted(_TRITON_WORKER, (forward, grad_case, equi),
                                             tmp_path_factory.mktemp("triton_vector_head"))
    return list(zip(forward, outs)), (grad_case, grads), (equi, equi_outs)


def _case_id(c):
    B, H, N, dh, d, bias, masked = c
    return (f"B{B}-H{H}-N{N}-dh{dh}-d{d}" + ({True: "-bias", "inf": "-inf_bias"}.get(bias, ""))
            + ("-mask" if masked and bias != "inf" else ""))


@pytest.mark.parametrize("case", range(len(FORWARD_CASES)), ids=[_case_id(c) for c in FORWARD_CASES])
def test_triton_forward_matches_reference_interpreted(triton_results, case):
    inputs, out = triton_results[0][case]
    ref64 = fused_vector_head_reference(*args_of(inputs, torch.float64))
    ref32 = fused_vector_head_reference(*args_of(inputs, torch.float32))
    assert out.dtype == torch.float32
    assert_close_to_oracle("out", out, ref64, ref32, output_scale(inputs))
    # (B, N): query rows without any key (a padded sample, by mask or by -inf bias)
    empty = torch.zeros(out.shape[:2], dtype=torch.bool)
    if inputs["key_mask"] is not None:
        empty |= ~inputs["key_mask"].any(dim=1, keepdim=True)
    if inputs["bias"] is not None:
        empty |= torch.isneginf(inputs["bias"]).all(dim=-1).all(dim=1)
    assert (out[empty] == 0).all(), "rows without keys must be exactly zero"


def test_triton_backward_matches_reference_autograd(triton_results):
    """Gradients of <g_out, out> in q, k, bias, x, vw (the recomputed, chunked backward) vs
    autograd through the reference."""
    inputs, (out, grads) = triton_results[1]
    names = ("q", "k", "bias", "x", "vw")

    def reference_grads(dtype):
        args = [a.requires_grad_(True) if k in names else a
                for k, a in zip(ARGS, args_of(inputs, dtype))]
        o = fused_vector_head_reference(*args)
        got = torch.autograd.grad(o, args[:5], inputs["g_out"].to(dtype))
        return o, dict(zip(names, got))

    (o64, ref64), (o32, ref32) = reference_grads(torch.float64), reference_grads(torch.float32)
    assert_close_to_oracle("out", out, o64, o32, output_scale(inputs))
    scale = max(magnitude(g) for g in ref64.values())
    for name in names:
        assert_close_to_oracle(f"grad {name}", grads[name], ref64[name], ref32[name], scale)


def test_triton_output_rotates_with_coordinates(triton_results):
    """kernel(x R^T) = kernel(x) R^T, to the accuracy float32 torch reaches on the same check."""
    inputs, (out, out_rot) = triton_results[2]
    R = inputs["R"]
    err = float((out_rot.double() - out.double() @ R.T).abs().max())
    args32 = args_of(inputs, torch.float32)
    ref32 = fused_vector_head_reference(*args32)
    args32[3] = inputs["x_rot"]
    ref32_rot = fused_vector_head_reference(*args32)
    torch_err = float((ref32_rot.double() - ref32.double() @ R.T).abs().max())
    tol = 2 * torch_err + 16 * EPS * output_scale(inputs)
    print(f"rotation: max error {err:.2e}, float32 torch {torch_err:.2e}, tolerance {tol:.2e}")
    assert err <= tol
    assert magnitude(out) > 0.1  # a non-trivial output rotated


# ---- dispatch --------------------------------------------------------------------------------

def test_dispatch_cpu_uses_reference(rng, monkeypatch):
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    case = make_inputs(rng, 2, 2, 5, 12, 3, True, True)
    args = args_of(case)
    assert _backend.choose("fused_vector_head", torch.device("cpu")) == "reference"
    expected = fused_vector_head_reference(*args)
    assert torch.equal(fused_vector_head(*args), expected)
    assert torch.equal(fused_vector_head(*args, backend="reference"), expected)
    assert _backend._REGISTRY["fused_vector_head"] == {
        "triton": "digfast.kernels.vector_head:fused_vector_head_triton"}
    monkeypatch.setenv("DIGFAST_BACKEND", "triton")
    with pytest.raises(RuntimeError):
        _backend.choose("fused_vector_head", torch.device("cpu"))
