"""Forward mode through the fused vector head and spatial-bias Triton Functions (interpreted).

Both tangents are fused kernels (checked in detail by tests/test_vector_head_jvp.py and
tests/test_spatial_bias_jvp.py). The check here is that the tangents reach the right
inputs: torch.func.jvp (one tangent set) and vmap over three sets against torch.func.jvp of
the float64 reference, within the float32 reference's own error (2x) plus 8 EPS of the
largest tangent.
"""
import pytest
import torch

from digfast.ops.spatial_bias import spatial_bias_reference
from digfast.ops.vector_head import fused_vector_head_reference

from interpreted import fresh_generator, run_interpreted
import test_spatial_bias_kernel as sbt
import test_vector_head_kernel as vht

EPS = 2.0**-23
# (B, H, N, dh, d, bias, masked): N = 7 and 33 (a partial tile), an all-padded sample (the
# head of a single atom is 0 identically: N = 1 runs in the spatial bias only)
HEAD_CASES = [(1, 1, 7, 32, 3, "float", False), (3, 2, 33, 24, 3, "float", True)]
# (B, N, D, K, H, T, masked)
BIAS_CASES = [(1, 1, 3, 8, 4, 2, False), (3, 33, 3, 8, 4, 2, True)]
HEAD_MOVING = ("q", "k", "bias", "x", "vw")
BIAS_MOVING = ("x", "w1", "means")

_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from digfast.kernels.spatial_bias import spatial_bias_triton
from digfast.kernels.vector_head import fused_vector_head_triton
from test_fused_jvp import jvp_of
heads, biases = torch.load(sys.argv[1])
out = ([jvp_of(fused_vector_head_triton, "head", c) for c in heads],
       [jvp_of(spatial_bias_triton, "bias", c) for c in biases])
torch.save(out, sys.argv[2])
"""


def jvp_of(fn, kind, case, dtype=None):
    """(one tangent set by torch.func.jvp, three by vmap) of fn along case's tangents."""
    module, moving = (vht, HEAD_MOVING) if kind == "head" else (sbt, BIAS_MOVING)
    args = dict(zip(module.ARGS, module.args_of(case, dtype)))
    moving = tuple(n for n in moving if args[n] is not None)

    def f(*xs):
        return fn(*{**args, **dict(zip(moving, xs))}.values())
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)  # noqa: E731
    primals = tuple(args[n] for n in moving)
    one = torch.func.jvp(f, primals, tuple(cast(case["t"][n][0]) for n in moving))[1]
    many = torch.func.vmap(lambda *ts: torch.func.jvp(f, primals, ts)[1])(
        *(cast(case["t"][n]) for n in moving))
    return one, many


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    heads = [vht.make_inputs(rng, *c) for c in HEAD_CASES]
    biases = [sbt.make_inputs(rng, *c[:6], masked=c[6]) for c in BIAS_CASES]
    for case, moving in [(c, HEAD_MOVING) for c in heads] + [(c, BIAS_MOVING) for c in biases]:
        case["t"] = {n: torch.randn(3, *case[n].shape, generator=rng)
                     for n in moving if case[n] is not None}
    return heads, biases, run_interpreted(_WORKER, (heads, biases),
                                          tmp_path_factory.mktemp("triton_fused_jvp"))


def _assert_close(name, got, ref64, ref32, scale):
    assert torch.isfinite(got).all(), f"{name}: non-finite"
    err = float((got.double() - ref64).abs().max())
    tol = 2 * float((ref32.double() - ref64).abs().max()) + 8 * EPS * scale
    print(f"{name}: error {err:.2e}, tolerance {tol:.2e}")
    assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("kind,index", [("head", i) for i in range(len(HEAD_CASES))]
                         + [("bias", i) for i in range(len(BIAS_CASES))])
def test_fused_jvp_matches_reference_interpreted(interpreted, kind, index):
    heads, biases, (head_out, bias_out) = interpreted
    case = (heads if kind == "head" else biases)[index]
    got_one, got_many = (head_out if kind == "head" else bias_out)[index]
    reference = fused_vector_head_reference if kind == "head" else spatial_bias_reference
    (one64, many64), (one32, many32) = (jvp_of(reference, kind, case, dt)
                                        for dt in (torch.float64, torch.float32))
    if kind == "head":  # the head has one output, the spatial bias two (bias, node features)
        got_one, got_many, one64, many64, one32, many32 = (
            (t,) for t in (got_one, got_many, one64, many64, one32, many32))
    for n, (g1, gm, r1, rm, s1, sm) in enumerate(zip(got_one, got_many, one64, many64, one32,
                                                      many32)):
        scale = float(rm.abs().max())
        assert scale > 0, "a zero tangent tests nothing"
        _assert_close(f"{kind} output {n} jvp", g1, r1, s1, scale)
        _assert_close(f"{kind} output {n} vmap", gm, rm, sm, scale)
