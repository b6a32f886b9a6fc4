"""Forward mode (JVP) of the pair-bias attention: the Triton tangent kernel and the reference.

Oracle: torch.func.jvp of pair_bias_attention_reference in float64; tolerance as for the
forward and backward kernels (tests/test_pair_bias_attention_kernel.py): 2 * (error of the
reference's own float32 JVP) + 8 * EPS * max|oracle|. The kernel's tangent outputs are
NaN-filled before it runs, so an entry never written fails.
"""
import pytest
import torch

from digfast.ops.pair_bias_attention import pair_bias_attention_reference

from interpreted import fresh_generator, jvp_along, run_interpreted
from test_pair_bias_attention_kernel import (ARGS, args_of, assert_close_to_oracle, magnitude,
                                             make_inputs)

TANGENT_OF = {"q": "tq", "k": "tk", "v": "tv", "bias": "tbias"}

# (B, H, N, dh, bias, masked, layout, inputs with a tangent): N = 1, 7, 33, 100 (partial
# tiles), dh 24 (padded to 32) and 32, padding masks with an all-padded sample (B = 3), -inf
# padding in the bias, strided q, k, v, a large bias.
JVP_CASES = [
    (1, 1, 1, 24, "float", False, "plain", "q,k,v,bias"),
    (3, 2, 7, 32, "float", True, "qkv", "q,k,v,bias"),
    (1, 2, 33, 24, "float", True, "plain", "q,bias"),
    (3, 1, 100, 24, "inf", False, "plain", "q,k,v,bias"),
    (1, 2, 100, 32, "big", True, "plain", "k,v"),
]


def tangent_names(case):
    return tuple(n for n in case["which"].split(",") if case[n] is not None)


def reference_jvp(case, tangents, dtype):
    """out and d out of the reference along tangents {name: tensor} (others held fixed)."""
    return jvp_along(pair_bias_attention_reference, dict(zip(ARGS, args_of(case, dtype))), tangent_names(case),
                     tangents, dtype)


_WORKER = """
import sys, torch
import digfast.kernels.pair_bias_attention as pba
sys.path.insert(0, sys.argv[3])
from test_pair_bias_attention_jvp import ARGS, TANGENT_OF, tangent_names
cases = torch.load(sys.argv[1])
nan = float("nan")
results = []
for case in cases:
    args = [case[k] for k in ARGS]
    names = tangent_names(case)
    B, H, N, dh = case["q"].shape
    out, stats = torch.full((B, H, N, dh), nan), torch.full((2, B, H, N), nan)
    pba.pair_bias_attention_forward_into(out, stats, *args)
    # two tangent sets in one launch; the first set's q tangent shared by both (stride 0)
    stacked = {TANGENT_OF[n]: torch.stack([case["t1"][n], case["t2"][n]]) for n in names}
    if "q" in names:
        stacked["tq"] = case["t1"]["q"].expand(2, *case["q"].shape)
    tout = torch.full((2, B, H, N, dh), nan)
    pba.pair_bias_attention_jvp_into(tout, *args, out, stats, *(stacked.get(TANGENT_OF[n])
                                     for n in ("q", "k", "v", "bias")))
    # torch.func.jvp through the autograd.Function, and vmap over both sets
    def f(*xs):
        return pba.pair_bias_attention_triton(**{**dict(zip(ARGS, args)), **dict(zip(names, xs))})
    primals = tuple(case[n] for n in names)
    o, t = torch.func.jvp(f, primals, tuple(case["t1"][n] for n in names))
    both = {n: torch.stack([case["t1"][n], case["t2"][n]]) for n in names}
    vm = torch.func.vmap(lambda *ts: torch.func.jvp(f, primals, ts)[1])(*(both[n] for n in names))
    results.append((tout, o, t, vm))

# a small Graphormer-3D's forward-mode divergence with the attention on the kernel
from digfast.likelihood import _Drift, rademacher_probes
from digfast.models import graphormer3d as g
from digfast.ops.pair_bias_attention import pair_bias_attention_reference
from digfast.schedules import LinearVP
torch.manual_seed(int(cases[0]["q"].sum().abs() * 1000) % 2**31)
net = g.Graphormer3D(g.Graphormer3DConfig(layers=2, width=48, heads=2, ffn=32, gaussians=8))
x = 2 * torch.randn(2, 7, 3)
mask = torch.ones(2, 7, dtype=torch.bool)
mask[1, 5:] = False
eps = rademacher_probes(3, 1, torch.arange(2), (7, 3), mask)
def div(attention):
    g.pair_bias_attention = lambda q, k, v, bias=None, key_mask=None, backend=None: attention(q, k, v, bias,
                                                                                             key_mask)
    drift = _Drift(lambda y, t, m: net(y, t, torch.zeros(7, dtype=torch.long), m), LinearVP(),
                   mask, "hutchinson-forward", eps)
    return drift.divergence_at(x, 0.3)[1]
model = (div(pba.pair_bias_attention_triton), div(pair_bias_attention_reference))
torch.save((results, model), sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    cases = []
    for B, H, N, dh, bias, masked, layout, which in JVP_CASES:
        case = make_inputs(rng, B, H, N, dh, bias, masked, layout)
        case["which"] = which
        if case["bias"] is not None and "bias" in which:  # make_dual refuses stride-0 primals
            case["bias"] = case["bias"].contiguous()
        for key in ("t1", "t2"):  # fresh tangents of unit scale, full shapes (no expansion)
            case[key] = {n: torch.randn(case[n].shape, generator=rng) for n in tangent_names(case)}
        cases.append(case)
    return cases, run_interpreted(_WORKER, cases, tmp_path_factory.mktemp("triton_pba_jvp"))


def _case_id(c):
    B, H, N, dh, bias, masked, layout, which = c
    return (f"B{B}-H{H}-N{N}-dh{dh}-bias_{bias}" + ("-mask" if masked else "")
            + ("-qkv_view" if layout == "qkv" else "") + f"-d_{which.replace(',', '')}")


@pytest.mark.parametrize("index", range(len(JVP_CASES)), ids=[_case_id(c) for c in JVP_CASES])
def test_triton_jvp_matches_reference_interpreted(interpreted, index):
    cases, (results, _) = interpreted
    case = cases[index]
    tout, o, t, vm = results[index]
    tangent_sets = [case["t1"], dict(case["t2"])]
    if "q" in tangent_names(case):
        tangent_sets[1]["q"] = case["t1"]["q"]  # the launch shared the first q tangent
    for slot, tangents in enumerate(tangent_sets):
        o64, t64 = reference_jvp(case, tangents, torch.float64)
        o32, t32 = reference_jvp(case, tangents, torch.float32)
        assert_close_to_oracle(f"tangent {slot}", tout[slot], t64, t32)
    assert_close_to_oracle("out (func.jvp)", o, o64, o32)
    assert torch.equal(t, tout[0]), "torch.func.jvp gives the launch's first tangent"
    for slot, tangents in enumerate((case["t1"], case["t2"])):  # vmap: both sets batched
        t64 = reference_jvp(case, tangents, torch.float64)[1]
        t32 = reference_jvp(case, tangents, torch.float32)[1]
        assert_close_to_oracle(f"vmap tangent {slot}", vm[slot], t64, t32)
    if case["key_mask"] is not None and case["q"].shape[0] >= 2:
        assert (tout[:, 1] == 0).all(), "the all-padded sample has no keys: zero tangent"


def test_model_divergence_through_the_kernel_interpreted(interpreted):
    """Hutchinson (forward mode, 3 probes) of a small Graphormer-3D whose attention runs on
    the Triton kernel equals the same with the reference attention (float32 network)."""
    triton_div, reference_div = interpreted[1][1]
    assert torch.isfinite(triton_div).all() and magnitude(reference_div) > 0
    torch.testing.assert_close(triton_div, reference_div, rtol=1e-4, atol=1e-4 * magnitude(reference_div))


# ---- the reference itself ------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["float", "inf"])
def test_reference_has_a_forward_mode(rng, bias):
    """torch.func.jvp and forward_ad through the reference agree with reverse mode (the
    identity <g, J t> = <J^T g, t>) in float64, padded and all-padded samples included."""
    case = make_inputs(rng, 3, 2, 9, 24, bias, True, dtype=torch.float64)
    names = ("q", "k", "v", "bias")
    primals = tuple(case[n] for n in names)
    tangents = tuple(torch.randn(p.shape, generator=rng, dtype=torch.float64) for p in primals)
    g_out = torch.randn(case["q"].shape, generator=rng, dtype=torch.float64)

    def f(*xs):
        return pair_bias_attention_reference(*xs, case["key_mask"])
    out, tout = torch.func.jvp(f, primals, tangents)
    assert torch.isfinite(tout).all()
    _, vjp = torch.func.vjp(f, *primals)
    cotangents = vjp(g_out)
    finite = [torch.where(torch.isfinite(p), t, 0) for p, t in zip(primals, tangents)]
    lhs = (g_out * tout).sum()
    rhs = sum((c * t).sum() for c, t in zip(cotangents, finite))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    with torch.autograd.forward_ad.dual_level():
        dual = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        tangent = torch.autograd.forward_ad.unpack_dual(f(*dual)).tangent
    torch.testing.assert_close(tangent, tout, rtol=0, atol=1e-14)


# ---- on a GPU (compiled Triton) -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 100, 24, "float", True), (3, 32, 256, 24, "inf", False)],
                         ids=lambda c: "-".join(map(str, c)))
def test_gpu_jvp_matches_reference(rng, shape, dtype):
    """torch.func.jvp and vmap over 4 tangent sets on the compiled kernel; bf16 within twice
    the bf16 reference's own error plus a bf16 ulp of the scale."""
    from digfast.ops import _backend
    from digfast.ops.pair_bias_attention import pair_bias_attention
    if not _backend.available("triton", torch.device("cuda")):
        pytest.skip("triton not available")
    case = make_inputs(rng, *shape, "plain")
    case["which"] = "q,k,v,bias"
    names = tangent_names(case)
    sets = {n: torch.randn(4, *case[n].shape, generator=rng) for n in names}

    def run(backend, device, dt):
        args = dict(zip(ARGS, (None if a is None else a.to(device) for a in args_of(case, dt))))

        def f(*xs):
            return pair_bias_attention(**{**args, **dict(zip(names, xs))}, backend=backend)
        primals = tuple(args[n] for n in names)
        many = torch.func.vmap(lambda *ts: torch.func.jvp(f, primals, ts)[1])(
            *(sets[n].to(device, dt) for n in names))
        one = torch.func.jvp(f, primals, tuple(sets[n][0].to(device, dt) for n in names))[1]
        return [one.double().cpu(), many.double().cpu()]

    got = run("triton", "cuda", dtype)
    ref64 = run("reference", "cpu", torch.float64)
    low = run("reference", "cuda" if dtype != torch.float32 else "cpu", dtype)
    for name, g, r64, rlow in zip(("jvp", "vmap"), got, ref64, low):
        assert torch.isfinite(g).all(), name
        err = float((g - r64).abs().max())
        floor = 8 * 2.0**-23 if dtype == torch.float32 else 2.0**-8
        tol = 2 * float((rlow - r64).abs().max()) + floor * float(r64.abs().max())
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e} ({dtype})"
