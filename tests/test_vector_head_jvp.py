"""Forward mode (JVP) of the fused vector head: the Triton tangent kernel (interpreted).

Oracle: torch.func.jvp of fused_vector_head_reference in float64; tolerance as the forward's
(tests/test_vector_head_kernel.py): 2 * (error of the reference's own float32 JVP) +
8 * EPS * max|oracle|. Two ways in: the launcher with two tangent sets in one launch (the
second sharing the first's x tangent by a stride-0 view) into a NaN-filled output, so an entry
never written fails; and torch.func.jvp through the dispatcher fused_vector_head(backend=
"triton"), which reaches the kernel through the autograd.Function's jvp.
"""
import pytest
import torch

from digfast.ops.vector_head import fused_vector_head_reference

from interpreted import fresh_generator, jvp_along, run_interpreted
from test_vector_head_kernel import ARGS, args_of, make_inputs

EPS = 2.0**-23
TANGENT_OF = {"q": "tq", "k": "tk", "bias": "tbias", "x": "tx", "vw": "tvw"}
# (B, H, N, dh, d, bias, masked, inputs with a tangent): N = 1, 7, 33 (a partial tile), B = 1
# and 3 (with an all-padded sample), -inf padding in the bias (as Graphormer3D), no bias, 2-D
JVP_CASES = [
    (1, 2, 1, 24, 3, "float", False, "q,k,bias,x,vw"),
    (3, 2, 7, 32, 3, "float", True, "q,k,bias,x,vw"),
    (1, 3, 33, 24, 3, "inf", True, "q,k,bias,x,vw"),
    (3, 1, 33, 12, 2, None, True, "q,x"),
]

_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from digfast.kernels.vector_head import fused_vector_head_jvp_into
from digfast.ops.vector_head import fused_vector_head
from test_vector_head_jvp import ARGS, TANGENT_OF, tangent_names
from test_vector_head_kernel import args_of
results = []
for case in torch.load(sys.argv[1]):
    names = tangent_names(case)
    args = args_of(case)
    sets = {n: case["t"][n] for n in names}
    if "x" in sets:  # the second set shares the first's x tangent: a stride-0 view
        sets["x"] = sets["x"][:1].expand(2, *sets["x"].shape[1:])
    tout = torch.full((2, *case["x"].shape), float("nan"))
    fused_vector_head_jvp_into(tout, *args, *(sets.get(n) for n in TANGENT_OF))
    named = dict(zip(ARGS, args))
    f = lambda *xs: fused_vector_head(**{**named, **dict(zip(names, xs))}, backend="triton")
    one = torch.func.jvp(f, tuple(named[n] for n in names), tuple(sets[n][1] for n in names))[1]
    results.append((tout, one))
torch.save(results, sys.argv[2])
"""


def tangent_names(case):
    return tuple(n for n in case["which"].split(",") if case[n] is not None)


def reference_jvp(case, tangents, dtype):
    """d out of the float `dtype` reference along tangents {name: tensor}."""
    return jvp_along(fused_vector_head_reference, dict(zip(ARGS, args_of(case, dtype))), tangent_names(case),
                     tangents, dtype)[1]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    cases = []
    for *shape, which in JVP_CASES:
        case = make_inputs(rng, *shape)
        case["which"] = which
        # two fresh tangent sets; a bias tangent also where the bias is -inf (it must vanish)
        case["t"] = {n: torch.randn(2, *case[n].shape, generator=rng)
                     for n in tangent_names(case)}
        cases.append(case)
    return cases, run_interpreted(_WORKER, cases, tmp_path_factory.mktemp("triton_vh_jvp"))


def _check(name, got, case, tangents):
    ref64 = reference_jvp(case, tangents, torch.float64)
    ref32 = reference_jvp(case, tangents, torch.float32)
    assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten?)"
    scale = float(ref64.abs().max())
    err = float((got.double() - ref64).abs().max())
    tol = 2 * float((ref32.double() - ref64).abs().max()) + 8 * EPS * scale
    print(f"{name}: error {err:.2e}, tolerance {tol:.2e}, scale {scale:.1e}")
    assert err <= tol, f"{name}: error {err:.3e} > tolerance {tol:.3e}"
    return scale


@pytest.mark.parametrize("index", range(len(JVP_CASES)),
                         ids=["B{}-H{}-N{}-dh{}-d{}-{}-mask{}-{}".format(*c) for c in JVP_CASES])
def test_vector_head_jvp_kernel_matches_reference_interpreted(interpreted, index):
    cases, outs = interpreted
    case, (tout, one) = cases[index], outs[index]
    names = tangent_names(case)
    scales = []
    for s in range(2):
        tangents = {n: case["t"][n][0 if n == "x" else s] for n in names}
        scales.append(_check(f"launch set {s}", tout[s], case, tangents))
    _check("torch.func.jvp via the dispatcher", one, case,  # the launch's second set
           {n: case["t"][n][0 if n == "x" else 1] for n in names})
    if case["x"].shape[1] > 1:
        assert max(scales) > 0, "a zero tangent tests nothing"
    if case["key_mask"] is not None and case["x"].shape[0] > 1:  # the all-padded sample
        assert (tout[:, 1] == 0).all() and (one[1] == 0).all()


def jvp_on(device, case, backend=None, probes=4, rng=None):
    """(one tangent set by torch.func.jvp, `probes` sets by vmap) through the dispatcher on
    device, and the same of the float64 and float32 references, all moving every input."""
    from digfast.ops.vector_head import fused_vector_head
    names = tangent_names(case)
    tangents = {n: torch.randn(probes, *case[n].shape, generator=rng) for n in names}

    def run(fn, dtype, dev):
        args = dict(zip(ARGS, [None if a is None else a.to(dev) for a in args_of(case, dtype)]))

        def f(*xs):
            return fn(**{**args, **dict(zip(names, xs))})
        primals = tuple(args[n] for n in names)
        ts = tuple(tangents[n].to(dev, dtype) for n in names)
        one = torch.func.jvp(f, primals, tuple(t[0] for t in ts))[1]
        many = torch.func.vmap(lambda *t: torch.func.jvp(f, primals, t)[1])(*ts)
        return one.cpu(), many.cpu()
    got = run(lambda **a: fused_vector_head(**a, backend=backend), torch.float32, device)
    return got, run(fused_vector_head_reference, torch.float64, "cpu"), \
        run(fused_vector_head_reference, torch.float32, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_vector_head_jvp_matches_reference(rng):
    """On a GPU the dispatcher's default is the kernel: jvp and vmap over 4 probes, N = 100
    (partial tiles), padding as -inf in the bias."""
    from digfast.ops import _backend
    if _backend.choose("fused_vector_head", torch.device("cuda")) != "triton":
        pytest.skip("Triton not available on this GPU")
    case = make_inputs(rng, 3, 4, 100, 24, 3, "inf", True)
    case["which"] = "q,k,bias,x,vw"
    got, ref64, ref32 = jvp_on("cuda", case, rng=rng)
    for name, g, r64, r32 in zip(("jvp", "vmap"), got, ref64, ref32):
        scale = float(r64.abs().max())
        err = float((g.double() - r64).abs().max())
        tol = 2 * float((r32.double() - r64).abs().max()) + 8 * EPS * scale
        print(f"{name}: error {err:.2e}, tolerance {tol:.2e}")
        assert scale > 0 and err <= tol, f"{name}: error {err:.3e} > tolerance {tol:.3e}"


def compile_for_gpus(kernel, constexprs, pointer_types, float_args=(), num_warps=4):
    """Compile (not run) kernel for sm_90, its signature built from its parameter
    names: *_ptr -> pointer_types.get(name, "*fp32"), float_args -> fp32, the rest integers
    (strides i64). Catches type and lowering errors without a GPU."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointer_types.get(p.name, "*fp32")
        elif p.name in float_args:
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i64" if p.name.startswith("stride") else "i32"
    try:
        src = ASTSource(kernel, signature, constexprs=constexprs)
    except TypeError as err:  # the ASTSource API changes between releases
        pytest.skip(f"ASTSource API differs in triton {triton.__version__}: {err}")
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert ".entry" in compiled.asm["ptx"]


@pytest.mark.slow  # minutes of LLVM on a loaded CPU
@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="interpreted here")
def test_vector_head_jvp_kernel_compiles_for_gpus():
    from digfast.kernels.vector_head import _fused_vector_head_jvp_kernel, launch_config, padded
    block_m, block_n, warps = launch_config(256)
    flags = dict.fromkeys(("HAS_BIAS", "HAS_MASK", "HAS_TQ", "HAS_TK", "HAS_TB", "HAS_TX",
                           "HAS_TW"), True)
    compile_for_gpus(_fused_vector_head_jvp_kernel,
                     dict(DH=24, D_PAD=padded(24), SPACE_DIM=3, BLOCK_M=block_m, BLOCK_N=block_n,
                          DOT_PRECISION="ieee", **flags),
                     {"mask_ptr": "*i1"}, ("scale2", "scale", "eps"), warps)
