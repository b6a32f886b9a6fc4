"""The pair-bias flash-attention kernels (kernels/pair_bias_attention.py) against the reference.

Oracle: pair_bias_attention_reference in float64. Tolerance per output or gradient
(absolute, over the whole tensor): 2 * (error of the same reference run in float32) +
8 * EPS * max|oracle|, EPS = 2^-23. The kernel computes the same sums in float32 as plain
PyTorch does, only in another order (online softmax: each key tile rescales the running sum
and output once more; the backward rebuilds p from the saved log-sum-exp instead of dividing
by the row sum), so it may be at most about twice as wrong as the float32 reference; the
second term keeps a case where torch happens to be (nearly) exact, e.g. N = 1, from demanding
more than float32 can give. The saved log-sum-exp is checked the same way.
Outputs and gradients are NaN-filled before the kernels run, so an entry never written fails.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from digfast.ops import _backend
from digfast.ops.pair_bias_attention import pair_bias_attention, pair_bias_attention_reference

from interpreted import fresh_generator, run_interpreted

EPS = 2.0**-23
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(rng, B, H, N, dh, bias, masked, layout="plain", dtype=torch.float32):
    """q, k, v of unit scale (logits O(1)), bias O(1).
    bias: "none", "float", "big" (8x larger: the row maximum jumps between key tiles, so the
    online softmax rescales for real, and most probabilities underflow) or "inf" (padding
    written as -inf into the bias, as Graphormer3D does, instead of a key mask). masked: a (B, N) key mask with one all-padded sample when B >= 2.
    layout "qkv": q, k, v are permuted views of one (B, N, 3, H, dh) tensor (Graphormer-3D's)
    and the bias is one (H, N, N) expanded over the batch (stride 0)."""
    if layout == "qkv":
        qkv = torch.randn(B, N, 3, H, dh, generator=rng).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = (torch.randn(B, H, N, dh, generator=rng) for _ in range(3))
    mask = None
    if masked or bias == "inf":
        mask = torch.rand(B, N, generator=rng) < 0.7
        mask[:, 0] = True
        if B >= 2:  # a sample with every key padded: its rows are zero
            mask[1] = False
    b = None
    if bias != "none":
        b = (torch.randn(1 if layout == "qkv" else B, H, N, N, generator=rng)
             .mul(8.0 if bias == "big" else 1.0).expand(B, H, N, N))
        if bias == "inf":
            b = b.masked_fill(~mask[:, None, None, :], float("-inf"))
            mask = None
        elif layout != "qkv":
            b = b.contiguous()
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (views stay views in fp32)
    return dict(q=cast(q), k=cast(k), v=cast(v), bias=cast(b), key_mask=mask)


ARGS = ("q", "k", "v", "bias", "key_mask")


def args_of(case, dtype=None):
    def cast(t):  # a copy, so that requires_grad_ on it leaves the case alone
        return t.to(dtype, copy=True) if dtype is not None and t.is_floating_point() else t
    return [None if case[k] is None else cast(case[k]) for k in ARGS]


def magnitude(t):
    """max |t| over its finite entries (0 for an empty tensor)."""
    t = t.detach()
    return float(t[torch.isfinite(t)].abs().max()) if t.numel() else 0.0


def assert_close_to_oracle(name, got, ref64, ref32, scale=None):
    """got vs the float64 oracle; scale (default max|oracle|) sets the 8 EPS floor."""
    got, ref64, ref32 = got.detach(), ref64.detach(), ref32.detach()
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries (unwritten or overflow)"
    err = float((got.double() - ref64).abs().max()) if got.numel() else 0.0
    torch_err = float((ref32.double() - ref64).abs().max()) if got.numel() else 0.0
    tol = 2 * torch_err + 8 * EPS * (magnitude(ref64) if scale is None else scale)
    print(f"{name}: max error {err:.2e}, float32 torch {torch_err:.2e}, tolerance {tol:.2e}")
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


def row_lse(case, dtype):
    """Natural log-sum-exp of each row's logits (-inf where a row has no key), dtype."""
    q, k, v, bias, mask = args_of(case, dtype)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.logsumexp(logits, dim=-1)


# ---- Triton, under the interpreter on the CPU ------------------------------------------
# One subprocess runs every case with TRITON_INTERPRET=1 (see tests/interpreted.py for why).

# (B, H, N, dh, bias, masked, layout): N = 1, 7, 33, 100 (tiles of 16 and 64, partial last
# tiles); dh 12, 24 (padded to 16, 32 in the kernel) and 32; padding masks with an all-padded
# sample; padding given as -inf in the bias; strided q, k, v with an expanded bias; a large
# bias over 3-4 key tiles.
FORWARD_CASES = [
    (1, 1, 1, 24, "float", False, "plain"),
    (3, 4, 1, 12, "none", True, "plain"),
    (1, 4, 7, 24, "float", True, "plain"),
    (3, 1, 7, 32, "none", False, "qkv"),
    (1, 1, 33, 24, "float", False, "plain"),
    (3, 4, 33, 32, "float", True, "qkv"),
    (1, 4, 100, 12, "inf", False, "plain"),
    (3, 1, 100, 24, "float", True, "plain"),
    (3, 2, 100, 24, "inf", False, "plain"),
    (2, 2, 200, 24, "big", True, "plain"),
]
# (B, H, N, dh, bias, masked, layout, inputs that need grad)
GRAD_CASES = [
    (3, 4, 7, 24, "float", True, "qkv", "all"),
    (1, 1, 33, 12, "float", False, "plain", "all"),
    (3, 2, 100, 32, "inf", False, "plain", "all"),
    (2, 4, 33, 24, "none", True, "plain", "all"),
    (3, 1, 1, 24, "float", True, "plain", "all"),
    (1, 2, 100, 24, "float", True, "plain", "q,bias"),
    (1, 2, 130, 24, "big", False, "plain", "all"),
]


def grad_names(case):
    names = ("q", "k", "v", "bias") if case["which"] == "all" else tuple(case["which"].split(","))
    return tuple(n for n in names if case[n] is not None)


_TRITON_WORKER = """
import sys, torch
import digfast.kernels.pair_bias_attention as pba
sys.path.insert(0, sys.argv[3])
from test_pair_bias_attention_kernel import ARGS, grad_names
forward, grads = torch.load(sys.argv[1])
nan = float("nan")
outs = []
for case in forward:
    B, H, N, dh = case["q"].shape
    out, stats = torch.full((B, H, N, dh), nan), torch.full((2, B, H, N), nan)
    pba.pair_bias_attention_forward_into(out, stats, *(case[k] for k in ARGS))
    outs.append((out, stats))
grad_outs = []
for case in grads:
    args = [case[k] for k in ARGS]
    B, H, N, dh = case["q"].shape
    out, stats = torch.full((B, H, N, dh), nan), torch.full((2, B, H, N), nan)
    pba.pair_bias_attention_forward_into(out, stats, *args)
    dq, dk, dv = (torch.full((B, H, N, dh), nan) for _ in range(3))
    dbias = torch.full((B, H, N, N), nan) if case["bias"] is not None else None
    pba.pair_bias_attention_backward_into(dq, dk, dv, dbias, *args, out, stats, case["g_out"])
    direct = dict(q=dq, k=dk, v=dv, bias=dbias)
    # the same through the autograd.Function, asking only for grad_names(case)
    names = grad_names(case)
    leaves = [case[k].clone().requires_grad_(k in names) if k in names else case[k] for k in ARGS]
    got = pba.pair_bias_attention_triton(*leaves)
    auto = torch.autograd.grad(got, [a for k, a in zip(ARGS, leaves) if k in names], case["g_out"])
    grad_outs.append((out, direct, got.detach(), dict(zip(names, auto))))
torch.save((outs, grad_outs), sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """Inputs and interpreted-Triton outputs of FORWARD_CASES and GRAD_CASES."""
    pytest.importorskip("triton")
    rng = fresh_generator()
    forward = [make_inputs(rng, *c) for c in FORWARD_CASES]
    grads = []
    for B, H, N, dh, bias, masked, layout, which in GRAD_CASES:
        case = make_inputs(rng, B, H, N, dh, bias, masked, layout)
        case.update(which=which, g_out=torch.randn(B, H, N, dh, generator=rng))
        grads.append(case)
    outs, grad_outs = run_interpreted(_TRITON_WORKER, (forward, grads),
                                      tmp_path_factory.mktemp("triton_pair_bias_attention"))
    return list(zip(forward, outs)), list(zip(grads, grad_outs))


def _case_id(c):
    B, H, N, dh, bias, masked, layout = c[:7]
    return (f"B{B}-H{H}-N{N}-dh{dh}-bias_{bias}" + ("-mask" if masked else "")
            + ("-qkv_view" if layout == "qkv" else "") + (f"-grad_{c[7]}" if len(c) > 7 else ""))


@pytest.mark.parametrize("case", range(len(FORWARD_CASES)), ids=[_case_id(c) for c in FORWARD_CASES])
def test_triton_forward_matches_reference_interpreted(triton_results, case):
    inputs, (out, stats) = triton_results[0][case]
    ref64 = pair_bias_attention_reference(*args_of(inputs, torch.float64))
    ref32 = pair_bias_attention_reference(*args_of(inputs, torch.float32))
    assert out.dtype == torch.float32
    assert_close_to_oracle("out", out, ref64, ref32)
    # stats (m, log2 l): m + log2 l is the row's log-sum-exp in base 2; m = +inf, log2 l = 0
    # on rows without keys (the reference's -inf), and m is finite elsewhere
    lse64, lse32 = row_lse(inputs, torch.float64), row_lse(inputs, torch.float32)
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isposinf(stats[0]), empty), "m: +inf exactly on rows without keys"
    assert torch.isfinite(stats[1]).all() and (stats[1][empty] == 0).all()
    assert (stats[1] >= 0).all(), "log2 l: l >= 1 (the maximum's own term is 1)"
    lse = stats[0] + stats[1]
    assert (out[empty] == 0).all(), "rows without keys must be exactly zero"
    assert_close_to_oracle("lse", lse[~empty] * math.log(2), lse64[~empty], lse32[~empty])


@pytest.mark.parametrize("case", range(len(GRAD_CASES)), ids=[_case_id(c) for c in GRAD_CASES])
def test_triton_backward_matches_reference_autograd(triton_results, case):
    """dq, dk, dv, dbias of a random linear functional <g_out, out> vs autograd through the
    reference; the autograd.Function returns the same (bitwise: deterministic kernels)."""
    inputs, (out, direct, auto_out, auto) = triton_results[1][case]
    names = ("q", "k", "v") + (("bias",) if inputs["bias"] is not None else ())

    def reference_grads(dtype):
        args = [a.requires_grad_(True) if k in names else a
                for k, a in zip(ARGS, args_of(inputs, dtype))]
        o = pair_bias_attention_reference(*args)
        got = torch.autograd.grad(o, [a for k, a in zip(ARGS, args) if k in names],
                                  inputs["g_out"].to(dtype))
        return o, dict(zip(names, got))

    (o64, ref64), (o32, ref32) = reference_grads(torch.float64), reference_grads(torch.float32)
    assert_close_to_oracle("out", out, o64, o32)
    # A gradient can be exactly zero in exact arithmetic while its terms are not (N = 1: dq =
    # p (dp - delta) k with dp = delta = do . v, rounded differently): its floor is 8 EPS
    # times the case's largest gradient, not its own (zero) magnitude.
    scale = max(magnitude(g) for g in ref64.values())
    for name in names:
        assert_close_to_oracle(f"grad {name}", direct[name], ref64[name], ref32[name], scale)
    if inputs["bias"] is None:
        assert direct["bias"] is None
    assert torch.equal(auto_out, out)
    assert set(auto) == set(grad_names(inputs))
    for name, g in auto.items():
        assert torch.equal(g, direct[name]), f"autograd.Function's grad {name} differs"


# ---- pieces that need no kernel ----------------------------------------------------------

@pytest.mark.parametrize("dh", [12, 24])
def test_reference_matches_sdpa_float64(rng, dh):
    """The reference is F.scaled_dot_product_attention with a float bias; a key mask is the
    same as -inf in the bias; a sample with every key padded gives zeros (SDPA: NaN or 0)."""
    case = make_inputs(rng, 3, 4, 19, dh, "float", True, dtype=torch.float64)
    q, k, v, bias, mask = args_of(case)
    got = pair_bias_attention_reference(q, k, v, bias, mask)
    as_bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    real = mask.any(dim=1)
    expected = F.scaled_dot_product_attention(q[real], k[real], v[real], attn_mask=as_bias[real])
    torch.testing.assert_close(got[real], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pair_bias_attention_reference(q, k, v, as_bias), got,
                               rtol=1e-12, atol=1e-12)
    assert (got[~real] == 0).all()
    no_bias = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(pair_bias_attention_reference(q, k, v), no_bias, rtol=1e-12,
                               atol=1e-12)
    # gradients are finite everywhere, zero on the padded sample
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    grads = torch.autograd.grad(pair_bias_attention_reference(*leaves, mask).sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all((g[~real] == 0).all() for g in grads)


def test_dispatch_cpu_default_and_forced_reference(rng, monkeypatch):
    case = make_inputs(rng, 2, 2, 5, 24, "float", True)
    expected = pair_bias_attention_reference(*args_of(case))
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    assert _backend.choose("pair_bias_attention", torch.device("cpu")) == "reference"
    for got in (pair_bias_attention(*args_of(case)),
                pair_bias_attention(*args_of(case), backend="reference")):
        assert torch.equal(got, expected)
    monkeypatch.setenv("DIGFAST_BACKEND", "reference")
    assert _backend.choose("pair_bias_attention", torch.device("cpu")) == "reference"
    assert _backend.choose("pair_bias_attention", torch.device("cuda")) == "reference"
    assert torch.equal(pair_bias_attention(*args_of(case)), expected)


def test_dispatch_refuses_backends_it_cannot_use(monkeypatch):
    monkeypatch.setenv("DIGFAST_BACKEND", "cpp")  # no compiled op: the global switch falls back
    assert _backend.choose("pair_bias_attention", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="pair_bias_attention has no backend 'cpp'"):
        _backend.choose("pair_bias_attention", torch.device("cpu"), "cpp")  # asked for by name
    monkeypatch.setenv("DIGFAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="not available on cpu"):
        _backend.choose("pair_bias_attention", torch.device("cpu"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted here")
def test_triton_checks_its_inputs(rng):
    pytest.importorskip("triton")
    from digfast.kernels.pair_bias_attention import pair_bias_attention_triton
    good = make_inputs(rng, 2, 3, 5, 24, "float", True)
    bad = [
        ("q", lambda c: c["q"][0], ValueError, r"q must be \(batch, heads, tokens>=1"),
        ("q", lambda c: c["q"][:, :, :0], ValueError, r"q must be \(batch, heads, tokens>=1"),
        ("q", lambda c: torch.zeros(2, 3, 5, 257), ValueError, "head_dim in 1..256"),
        ("k", lambda c: c["k"][..., :8], ValueError, r"k must have shape \(2, 3, 5, 24\)"),
        ("v", lambda c: c["v"].double(), TypeError, "v must have q's dtype"),
        ("q", lambda c: c["q"].double(), TypeError, "q must be float32, float16 or bfloat16"),
        ("bias", lambda c: c["bias"][:, :, :4], ValueError, r"bias must have shape \(2, 3, 5, 5\)"),
        ("bias", lambda c: c["bias"].double(), TypeError, "bias must be float32"),
        ("key_mask", lambda c: c["key_mask"].int(), TypeError, "key_mask must be bool"),
        ("key_mask", lambda c: c["key_mask"][:1], ValueError, r"key_mask must have shape \(2, 5\)"),
    ]
    for name, change, error, message in bad:
        case = dict(good, **{name: change(good)})
        with pytest.raises(error, match=message):
            pair_bias_attention_triton(*args_of(case))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pair_bias_attention_triton(*args_of(good))


def test_triton_launch_config_is_sane():
    pytest.importorskip("triton")
    from digfast.kernels.pair_bias_attention import launch_config, padded
    assert [padded(n) for n in (1, 12, 16, 24, 32, 100, 128)] == [16, 16, 16, 32, 32, 128, 128]
    for n in (1, 2, 7, 33, 100, 1024, 10**5):
        for d_pad in (16, 32, 64, 128, 256):
            bm, bn, warps = launch_config(n, d_pad)
            assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0
            assert warps in (4, 8) and bm * bn <= 4096


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted here")
@pytest.mark.parametrize("dtype,dh", [("fp32", 24), ("bf16", 24), ("fp16", 12)])
def test_triton_kernels_compile_for_gpus(dtype, dh):
    """Compile (not run) all three kernels for sm_80 and sm_90: catches type and lowering
    errors without a GPU."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from digfast.kernels import pair_bias_attention as pba
    fp = f"*{dtype}"

    def strides(t):  # the kernels' stride arguments of tensor t: stride_qb, stride_qh, ...
        return {f"stride_{t}{a}": "i64" for a in ("bhij" if t == "b" else "bhnd")}

    common = {"n_tokens": "i32", "n_heads": "i32", "n_rows": "i32", "scale2": "fp32"}
    sig_strides = {**strides("q"), **strides("k"), **strides("v"), **strides("b")}
    block_m, block_n, warps = pba.launch_config(1024, pba.padded(dh))
    meta = {"DH": dh, "D_PAD": pba.padded(dh), "BLOCK_M": block_m, "BLOCK_N": block_n,
            "HAS_BIAS": True, "HAS_MASK": True, "DOT_PRECISION": "ieee"}
    kernels = [
        (pba._pair_bias_attn_fwd_kernel,
         {"q_ptr": fp, "k_ptr": fp, "v_ptr": fp, "bias_ptr": fp, "mask_ptr": "*i1", "o_ptr": fp,
          "stats_ptr": "*fp32", **common, **sig_strides}, meta),
        (pba._pair_bias_attn_bwd_dkdv_kernel,
         {"q_ptr": fp, "k_ptr": fp, "v_ptr": fp, "bias_ptr": fp, "mask_ptr": "*i1", "do_ptr": fp,
          "stats_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": fp, "dv_ptr": fp, "dbias_ptr": fp,
          **common, "scale": "fp32", **sig_strides, **strides("o")}, {**meta, "NEED_DBIAS": True}),
        (pba._pair_bias_attn_bwd_dq_kernel,
         {"q_ptr": fp, "k_ptr": fp, "v_ptr": fp, "bias_ptr": fp, "mask_ptr": "*i1", "do_ptr": fp,
          "stats_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": fp, **common, "scale": "fp32",
          **sig_strides, **strides("o")}, meta),
    ]
    for kernel, signature, constexprs in kernels:
        try:
            src = ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")},
                            constexprs=constexprs)
        except TypeError as err:  # the ASTSource API changes between releases
            pytest.skip(f"ASTSource API differs in triton {triton.__version__}: {err}")
        for arch in (80, 90):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps, "enable_fp_fusion": True})
            ptx = compiled.asm["ptx"]
            if dtype != "fp32":  # the dots run on the tensor cores
                assert "mma" in ptx
            else:  # full-precision float32 dots: no TF32 tensor-core instructions
                assert ".tf32" not in ptx


# ---- GPU (run on a machine with a CUDA device) -------------------------------------------

GPU_CASES = [(1, 1, 1, 24, "float", False), (3, 4, 33, 24, "float", True),
             (2, 32, 257, 24, "inf", False), (1, 8, 1024, 32, "float", True),
             (2, 4, 100, 12, "none", True)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_triton_matches_reference(rng, shape, dtype):
    """Forward and all four gradients on the GPU; fp32 as in the interpreter, bf16 no worse
    than twice the bf16 reference's own error plus a bf16 ulp of the scale."""
    if not _backend.available("triton", torch.device("cuda")):
        pytest.skip("triton not available")
    case = make_inputs(rng, *shape)
    g_out = torch.randn(case["q"].shape, generator=rng)
    names = ("q", "k", "v") + (("bias",) if case["bias"] is not None else ())

    def run(backend, device, dt):
        args = [None if a is None else a.to(device) for a in args_of(case, dt)]
        args = [a.requires_grad_(True) if k in names else a for k, a in zip(ARGS, args)]
        out = pair_bias_attention(*args, backend=backend)
        grads = torch.autograd.grad(out, [a for k, a in zip(ARGS, args) if k in names],
                                    g_out.to(device, dt))
        return [out.detach().double().cpu()] + [g.double().cpu() for g in grads]

    got = run("triton", "cuda", dtype)
    ref64 = run("reference", "cpu", torch.float64)
    low = run("reference", "cuda", dtype) if dtype != torch.float32 else run("reference", "cpu", dtype)
    for name, g, r64, rlow in zip(("out",) + names, got, ref64, low):
        assert torch.isfinite(g).all(), name
        err = float((g - r64).abs().max())
        floor = (8 * EPS) if dtype == torch.float32 else 2.0**-8
        # scale at least 1 (the inputs are O(1)): with one key dq and dk are exactly 0, but the
        # kernel forms them as differences of O(1) terms (seen on an H200: 2e-7 in fp32)
        scale = max(1.0, float(r64[torch.isfinite(r64)].abs().max()))
        tol = 2 * float((rlow - r64).abs().max()) + floor * scale
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e} ({dtype})"


@pytest.mark.gpu
@needs_gpu
def test_gpu_dispatch_picks_triton(monkeypatch):
    if not _backend.available("triton", torch.device("cuda")):
        pytest.skip("triton not available")
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    assert _backend.choose("pair_bias_attention", torch.device("cuda")) == "triton"
