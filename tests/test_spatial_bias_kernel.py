"""The spatial-bias Triton kernel (kernels/spatial_bias.py) against the reference.

Oracle: spatial_bias_reference in float64. Tolerance per output (absolute, over the whole
tensor): 2 * (error of the same reference run in float32) + 8 * EPS * max|terms|, EPS =
2^-23 -- the kernel may be at most about twice as wrong as plain PyTorch in the kernel's
precision; the second term keeps a case where torch happens to be exact from demanding
more than float32 can give (the kernel sums K products and N neighbours in other orders).
|terms| is the output recomputed from the absolute values of what its last sum adds up
(term_scale): rounding scales with those, not with the sum, which can cancel to near 0.
The reference takes its distances as the kernel does, from the coordinate differences
(torch.cdist's matmul path, N > 25, would lose ~1e-4 to cancellation and make the tolerance a
thousand times looser than the kernel's real error).
Gradients come from the reference itself (recomputed in row chunks), so their baseline is
the plain float32 reference.
Outputs are NaN-filled before the kernel runs, so an entry it never writes fails.
"""
import math
import os

import pytest
import torch

from digfast.ops import _backend
from digfast.ops.spatial_bias import (gaussian_basis, pairwise_distances, spatial_bias,
                                      spatial_bias_reference, spatial_bias_rows_reference)

from interpreted import fresh_generator, run_interpreted

EPS = 2.0**-23
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(rng, B, N, D, K, H, T, *, masked, expand=False, dtype=torch.float32):
    """Molecule-like inputs: T atom types (pair types T*T), distances of a few units,
    Gaussians spread over them, MLP weights of unit gain."""
    x = 1.5 * torch.randn(B, N, D, generator=rng)
    atoms = torch.randint(0, T, (1 if expand else B, N), generator=rng)
    pair_type = atoms[:, :, None] * T + atoms[:, None, :]
    if expand:  # one molecule's types for the whole batch: a stride-0 view
        pair_type = pair_type.expand(B, N, N)
    params = dict(
        mul=1.0 + 0.2 * torch.randn(T * T, generator=rng),
        add=0.3 * torch.randn(T * T, generator=rng),
        means=torch.linspace(0.0, 6.0, K) + 0.1 * torch.randn(K, generator=rng),
        # random signs: the reference takes |stds| + 1e-2
        stds=(0.2 + torch.rand(K, generator=rng)) * torch.randn(K, generator=rng).sign(),
        w1=torch.randn(K, K, generator=rng) / math.sqrt(K),
        b1=0.1 * torch.randn(K, generator=rng),
        w2=torch.randn(H, K, generator=rng) / math.sqrt(K),
        b2=0.1 * torch.randn(H, generator=rng))
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=rng) < 0.7
        mask[:, 0] = True
        if B >= 2:  # a sample with every atom padded
            mask[1] = False
    params = {k: v.to(dtype) for k, v in params.items()}
    return dict(x=x.to(dtype), pair_type=pair_type, **params, mask=mask)


ARGS = ("x", "pair_type", "mul", "add", "means", "stds", "w1", "b1", "w2", "b2", "mask")


def args_of(case, dtype=None):
    """The reference's positional arguments, floating ones cast to dtype."""
    def cast(t):  # a copy, so that requires_grad_ on it leaves the case alone
        return t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t
    return [None if case[k] is None else cast(case[k]) for k in ARGS]


def float32_baseline(case):
    """The reference in float32."""
    return spatial_bias_reference(*args_of(case, torch.float32))


def term_scale(case, index, ref64):
    """max over the output of the sum of |terms| in its last reduction (float64): for the bias
    |w2| |gelu(w1 phi + b1)| + |b2| over K, for node_features the Gaussians themselves
    (non-negative, so the output ref64 is its own scale)."""
    if index == 1:
        return float(ref64.abs().max())
    x, pair_type, mul, add, means, stds, w1, b1, w2, b2, _ = args_of(case, torch.float64)
    y = mul[pair_type] * pairwise_distances(x, x) + add[pair_type]
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(gaussian_basis(y, means, stds), w1, b1))
    return float(torch.nn.functional.linear(hidden.abs(), w2.abs(), b2.abs()).max())


def assert_close_to_float64(name, out, case, index):
    """out (float32 kernel output) vs the float64 reference, tolerance from the float32 one."""
    ref64 = spatial_bias_reference(*args_of(case, torch.float64))[index]
    ref32 = float32_baseline(case)[index]
    assert out.shape == ref64.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"{name}: non-finite entries (unwritten or overflow)"
    err = float((out.double() - ref64).abs().max())
    torch_err = float((ref32.double() - ref64).abs().max())
    tol = 2 * torch_err + 8 * EPS * term_scale(case, index, ref64)
    print(f"{name}: max error {err:.2e}, float32 torch {torch_err:.2e}, tolerance {tol:.2e}")
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


# ---- Triton, under the interpreter on the CPU ------------------------------------------
# One subprocess runs every case with TRITON_INTERPRET=1 (see tests/interpreted.py for why).

# (B, N, D, K, H, T, masked, expand): N = 1, 7, 33, 100; K and H not powers of two; K = 32,
# 128 of the public model; padding masks, one all-padded sample, a stride-0 pair_type.
FORWARD_CASES = [
    (1, 1, 3, 8, 1, 1, False, False),
    (3, 1, 2, 24, 4, 2, True, False),
    (1, 7, 3, 8, 4, 3, False, False),
    (3, 7, 2, 24, 32, 4, True, False),
    (1, 33, 3, 24, 1, 3, True, False),
    (3, 33, 3, 8, 32, 5, False, True),
    (1, 33, 2, 8, 32, 2, True, False),
    (1, 100, 3, 8, 4, 4, True, False),
    (3, 100, 2, 24, 4, 3, False, True),
    (2, 100, 3, 24, 32, 6, True, False),
    (2, 17, 3, 32, 4, 3, True, False),
    (1, 9, 3, 128, 32, 4, True, False),
]
# (B, N, D, K, H, T, masked, which inputs need grad, which outputs the loss uses, chunk rows)
GRAD_CASES = [
    (2, 9, 3, 8, 4, 3, True, "all", "both", 2),
    (1, 30, 2, 24, 1, 2, False, "all", "both", 7),
    (3, 6, 3, 8, 4, 2, True, "x", "bias", 4),
    (2, 5, 2, 8, 4, 2, False, "params", "node", 1),
]
PARAMS = ("mul", "add", "means", "stds", "w1", "b1", "w2", "b2")


def grad_names(which):
    return {"all": ("x",) + PARAMS, "x": ("x",), "params": PARAMS}[which]


def loss_of(bias, node, g_bias, g_node, outputs):
    """A random linear functional of the outputs: its gradient is the vector-Jacobian product."""
    loss = 0.0
    if outputs in ("both", "bias"):
        loss = loss + (bias * g_bias).sum()
    if outputs in ("both", "node"):
        loss = loss + (node * g_node).sum()
    return loss


_TRITON_WORKER = """
import sys, torch
import digfast.kernels.spatial_bias as sb
sys.path.insert(0, sys.argv[3])
from test_spatial_bias_kernel import ARGS, grad_names, loss_of
forward, grads = torch.load(sys.argv[1])
outs = []
for case in forward:
    B, N, _ = case["x"].shape
    bias = torch.full((B, case["b2"].shape[0], N, N), float("nan"))
    node = torch.full((B, N, case["means"].shape[0]), float("nan"))
    sb.spatial_bias_forward_into(bias, node, *(case[k] for k in ARGS))
    outs.append((bias, node))
grad_outs = []
for case in grads:
    sb.BACKWARD_CHUNK_ELEMENTS = case["chunk_elements"]
    names = grad_names(case["which"])
    args = [case[k].clone().requires_grad_(k in names) if k in names else case[k] for k in ARGS]
    bias, node = sb.spatial_bias_triton(*args)
    loss = loss_of(bias, node, case["g_bias"], case["g_node"], case["outputs"])
    leaves = [a for k, a in zip(ARGS, args) if k in names]
    got = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    grad_outs.append(dict(zip([k for k in ARGS if k in names], got)))
torch.save((outs, grad_outs), sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """Inputs and interpreted-Triton outputs of FORWARD_CASES and GRAD_CASES."""
    pytest.importorskip("triton")
    rng = fresh_generator()
    forward = [make_inputs(rng, *c[:6], masked=c[6], expand=c[7]) for c in FORWARD_CASES]
    grads = []
    for B, N, D, K, H, T, masked, which, outputs, rows in GRAD_CASES:
        case = make_inputs(rng, B, N, D, K, H, T, masked=masked)
        case.update(which=which, outputs=outputs, chunk_elements=rows * B * N * max(K, H),
                    g_bias=torch.randn(B, H, N, N, generator=rng),
                    g_node=torch.randn(B, N, K, generator=rng))
        grads.append(case)
    outs, grad_outs = run_interpreted(_TRITON_WORKER, (forward, grads),
                                      tmp_path_factory.mktemp("triton_spatial_bias"))
    return list(zip(forward, outs)), list(zip(grads, grad_outs))


def _forward_id(c):
    B, N, D, K, H, T, masked, expand = c
    return f"B{B}-N{N}-d{D}-K{K}-H{H}-T{T}" + ("-mask" if masked else "") + ("-expand" if expand else "")


@pytest.mark.parametrize("case", range(len(FORWARD_CASES)), ids=[_forward_id(c) for c in FORWARD_CASES])
def test_triton_forward_matches_reference_interpreted(triton_results, case):
    inputs, (bias, node) = triton_results[0][case]
    assert_close_to_float64("bias", bias, inputs, 0)
    assert_close_to_float64("node_features", node, inputs, 1)
    if inputs["mask"] is not None:  # padded atoms have no neighbours: exactly zero
        assert (node[~inputs["mask"]] == 0).all()


@pytest.mark.parametrize("case", range(len(GRAD_CASES)),
                         ids=[f"B{c[0]}-N{c[1]}-d{c[2]}-K{c[3]}-H{c[4]}-{c[7]}-{c[8]}-rows{c[9]}"
                              for c in GRAD_CASES])
def test_triton_backward_matches_reference_autograd(triton_results, case):
    """The autograd.Function's vector-Jacobian product vs autograd through the reference."""
    inputs, grads = triton_results[1][case]
    names = grad_names(inputs["which"])
    assert set(grads) == set(names)

    def reference_grads(dtype):
        args = args_of(inputs, dtype)
        args = [a.requires_grad_(k in names) if k in names else a for k, a in zip(ARGS, args)]
        bias, node = spatial_bias_reference(*args)
        g_bias, g_node = inputs["g_bias"].to(dtype), inputs["g_node"].to(dtype)
        loss = loss_of(bias, node, g_bias, g_node, inputs["outputs"])
        leaves = [a for k, a in zip(ARGS, args) if k in names]
        got = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        return dict(zip([k for k in ARGS if k in names], got))

    ref64, ref32 = reference_grads(torch.float64), reference_grads(torch.float32)
    for name in names:
        got = grads[name]
        assert got.shape == ref64[name].shape and torch.isfinite(got).all(), name
        err = float((got.double() - ref64[name]).abs().max())
        torch_err = float((ref32[name].double() - ref64[name]).abs().max())
        tol = 2 * torch_err + 8 * EPS * float(ref64[name].abs().max())
        print(f"grad {name}: max error {err:.2e}, float32 torch {torch_err:.2e}")
        assert err <= tol, f"grad {name}: max error {err:.3e} > tolerance {tol:.3e}"


# ---- pieces that need no kernel ----------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_row_chunks_reassemble_the_reference(rng, masked):
    """The backward's recompute (spatial_bias_rows_reference) is the reference, row by row."""
    case = make_inputs(rng, 2, 11, 3, 8, 4, 3, masked=masked, dtype=torch.float64)
    args = args_of(case)
    bias, node = spatial_bias_reference(*args)
    chunks = [spatial_bias_rows_reference(args[0], slice(r, r + 4), *args[1:-1], mask=args[-1])
              for r in range(0, 11, 4)]
    torch.testing.assert_close(torch.cat([c[0] for c in chunks], dim=2), bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([c[1] for c in chunks], dim=1), node, rtol=1e-12, atol=1e-12)


def test_dispatch_cpu_default_and_forced_reference(rng, monkeypatch):
    case = make_inputs(rng, 2, 5, 3, 8, 4, 2, masked=True)
    expected = spatial_bias_reference(*args_of(case))
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    assert _backend.choose("spatial_bias", torch.device("cpu")) == "reference"
    for got in (spatial_bias(*args_of(case)), spatial_bias(*args_of(case), backend="reference")):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    monkeypatch.setenv("DIGFAST_BACKEND", "reference")
    assert _backend.choose("spatial_bias", torch.device("cpu")) == "reference"
    assert _backend.choose("spatial_bias", torch.device("cuda")) == "reference"
    got = spatial_bias(*args_of(case))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_dispatch_refuses_backends_it_cannot_use(monkeypatch):
    monkeypatch.setenv("DIGFAST_BACKEND", "cpp")  # no compiled op: the global switch falls back
    assert _backend.choose("spatial_bias", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="spatial_bias has no backend 'cpp'"):
        _backend.choose("spatial_bias", torch.device("cpu"), "cpp")  # asked for by name
    monkeypatch.setenv("DIGFAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="not available on cpu"):
        _backend.choose("spatial_bias", torch.device("cpu"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted here")
def test_triton_checks_its_inputs(rng):
    pytest.importorskip("triton")
    from digfast.kernels.spatial_bias import spatial_bias_triton
    good = make_inputs(rng, 2, 5, 3, 8, 4, 2, masked=True)
    bad = [
        ("x", lambda c: c["x"][:, :, :1], ValueError, r"x must be \(batch, atoms>=1, 2 or 3\)"),
        ("x", lambda c: c["x"][:, :0], ValueError, r"x must be \(batch, atoms>=1, 2 or 3\)"),
        ("x", lambda c: c["x"].double(), TypeError, "x must be float32, float16 or bfloat16"),
        ("pair_type", lambda c: c["pair_type"][:, :4], ValueError, r"pair_type must have shape \(2, 5, 5\)"),
        ("pair_type", lambda c: c["pair_type"].float(), TypeError, "pair_type must be an integer"),
        ("w1", lambda c: c["w1"].t()[:, :7], ValueError, r"w1 must have shape \(8, 8\)"),
        ("w2", lambda c: c["w2"][:, :7], ValueError, r"w2 must have shape \(4, 8\)"),
        ("add", lambda c: c["add"][:3], ValueError, r"add must have shape \(4,\)"),
        ("b1", lambda c: c["b1"].half(), TypeError, "b1 must have x's dtype"),
        ("mask", lambda c: c["mask"].int(), TypeError, "mask must be bool"),
        ("mask", lambda c: c["mask"][:1], ValueError, r"mask must have shape \(2, 5\)"),
    ]
    for name, change, error, message in bad:
        case = dict(good, **{name: change(good)})
        with pytest.raises(error, match=message):
            spatial_bias_triton(*args_of(case))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        spatial_bias_triton(*args_of(good))


def test_triton_launch_config_is_sane():
    pytest.importorskip("triton")
    from digfast.kernels.spatial_bias import launch_config, padded
    assert [padded(n) for n in (1, 8, 16, 24, 32, 100, 128)] == [16, 16, 16, 32, 32, 128, 128]
    for n in (1, 2, 7, 33, 100, 1024, 10**5):
        for k_pad in (16, 32, 128):
            bi, bj, warps = launch_config(n, k_pad)
            assert bi * bj >= 16 and bi & (bi - 1) == 0 and bj & (bj - 1) == 0 and warps in (4, 8)
            assert bi * bj * k_pad <= 8192  # phi tile in registers


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted here")
@pytest.mark.parametrize("dtype,K,H", [("fp32", 24, 4), ("bf16", 128, 32)])
def test_triton_kernel_compiles_for_gpus(dtype, K, H):
    """Compile (not run) for sm_80 and sm_90: catches type and lowering errors without a GPU."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from digfast.kernels.spatial_bias import _spatial_bias_fwd_kernel, launch_config, padded
    fp = f"*{dtype}"
    signature = {"x_ptr": fp, "type_ptr": "*i64", "mul_ptr": fp, "add_ptr": fp, "means_ptr": fp,
                 "stds_ptr": fp, "w1_ptr": fp, "b1_ptr": fp, "w2_ptr": fp, "b2_ptr": fp,
                 "mask_ptr": "*i1", "bias_ptr": fp, "node_ptr": fp, "n_atoms": "i32",
                 "stride_tb": "i64", "stride_ti": "i64", "stride_tj": "i64"}
    block_i, block_j, warps = launch_config(256, padded(K))
    constexprs = {"D": 3, "K": K, "H": H, "K_PAD": padded(K), "H_PAD": padded(H),
                  "BLOCK_I": block_i, "BLOCK_J": block_j, "HAS_MASK": True,
                  "DOT_PRECISION": "ieee", "PRECISE_MATH": True}
    try:
        src = ASTSource(_spatial_bias_fwd_kernel,
                        {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    except TypeError as err:  # the ASTSource API changes between releases
        pytest.skip(f"ASTSource API differs in triton {triton.__version__}: {err}")
    for arch in (80, 90):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps,
                                                                         "enable_fp_fusion": True})
        ptx = compiled.asm["ptx"]
        if dtype == "bf16":  # the MLP runs on the tensor cores
            assert "mma" in ptx


# ---- GPU (run on a machine with a CUDA device) -------------------------------------------

GPU_CASES = [(1, 1, 3, 8, 1, 1, False), (3, 33, 3, 24, 4, 3, True), (4, 100, 3, 128, 32, 5, True),
             (2, 257, 3, 128, 32, 4, True), (1, 1024, 3, 128, 32, 8, False)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_triton_matches_reference(rng, shape, dtype):
    if not _backend.available("triton", torch.device("cuda")):
        pytest.skip("triton not available")
    case = make_inputs(rng, *shape[:6], masked=shape[6])
    gpu = {k: None if v is None else v.cuda() for k, v in case.items()}
    args = args_of(gpu, dtype)
    with torch.no_grad():
        bias, node = spatial_bias(*args, backend="triton")
    assert bias.dtype == dtype and node.dtype == dtype
    if dtype == torch.float32:
        assert_close_to_float64("bias", bias.cpu(), case, 0)
        assert_close_to_float64("node_features", node.cpu(), case, 1)
        return
    # bf16: no worse than twice the bf16 reference's own error (plus a bf16 ulp of the scale)
    for index, out in ((0, bias), (1, node)):
        ref64 = spatial_bias_reference(*args_of(case, torch.float64))[index]
        ref16 = spatial_bias_reference(*args)[index].double().cpu()
        err = float((out.double().cpu() - ref64).abs().max())
        tol = 2 * float((ref16 - ref64).abs().max()) + 2.0**-8 * float(ref64.abs().max())
        assert err <= tol, f"output {index}: bf16 error {err:.3e} > {tol:.3e}"


@pytest.mark.gpu
@needs_gpu
def test_gpu_triton_backward_and_dispatch(rng, monkeypatch):
    if not _backend.available("triton", torch.device("cuda")):
        pytest.skip("triton not available")
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    assert _backend.choose("spatial_bias", torch.device("cuda")) == "triton"
    case = make_inputs(rng, 2, 40, 3, 24, 4, 3, masked=True)
    g_bias, g_node = torch.randn(2, 4, 40, 40, generator=rng), torch.randn(2, 40, 24, generator=rng)
    names = ("x",) + PARAMS

    def grads(backend, device, dtype):
        args = [None if a is None else a.to(device) for a in args_of(case, dtype)]
        args = [a.requires_grad_(k in names) if k in names else a for k, a in zip(ARGS, args)]
        bias, node = spatial_bias(*args, backend=backend)
        loss = loss_of(bias, node, g_bias.to(device, dtype), g_node.to(device, dtype), "both")
        return torch.autograd.grad(loss, [a for k, a in zip(ARGS, args) if k in names],
                                   allow_unused=True, materialize_grads=True)

    got = grads("triton", "cuda", torch.float32)
    ref64 = grads("reference", "cpu", torch.float64)
    ref32 = grads("reference", "cpu", torch.float32)
    for name, g, r64, r32 in zip(names, got, ref64, ref32):
        err = float((g.double().cpu() - r64).abs().max())
        tol = 2 * float((r32.double() - r64).abs().max()) + 8 * EPS * float(r64.abs().max())
        assert err <= tol, f"grad {name}: {err:.3e} > {tol:.3e}"
