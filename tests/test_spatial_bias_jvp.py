"""Forward mode (JVP) of the spatial bias: the Triton tangent kernel (interpreted).

Oracle: torch.func.jvp of spatial_bias_reference in float64; tolerance per output (bias and
node features): 2 * (error of the reference's own float32 JVP) + 16 * EPS * max|oracle|, twice
the forward's floor: the Gaussians' tangent -phi z dz multiplies the rounding of y by |z| (up
to ~10 with these narrow Gaussians), which makes the float32 reference's own error a noisy
yardstick (kernel / reference error ratios up to ~0.8 seen over 20 runs at 8 EPS). Two ways in: the launcher with two tangent sets in one launch (the
second sharing the first's x tangent by a stride-0 view) into NaN-filled outputs, so an entry
never written fails; and torch.func.jvp through the dispatcher spatial_bias(backend="triton"),
which reaches the kernel through the autograd.Function's jvp.
"""
import pytest
import torch

from digfast.ops.spatial_bias import spatial_bias_reference

from interpreted import fresh_generator, jvp_along, run_interpreted
from test_spatial_bias_kernel import ARGS, args_of, make_inputs

EPS = 2.0**-23
ALL = "x,mul,add,means,stds,w1,b1,w2,b2"
# (B, N, D, K, H, atom types, masked, inputs with a tangent): N = 1, 7, 33 (partial tiles),
# B = 1 and 3 (with an all-padded sample), x alone (the likelihood's case), parameters alone, 2-D
JVP_CASES = [
    (1, 1, 3, 8, 4, 2, False, ALL),
    (3, 7, 3, 8, 4, 3, True, "x"),
    (1, 33, 3, 24, 5, 3, True, ALL),
    (3, 33, 2, 16, 3, 2, True, "stds,mul,w2,b2"),
]
PARAMS = ("mul", "add", "means", "stds", "w1", "b1", "w2", "b2")

_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from digfast.kernels.spatial_bias import spatial_bias_jvp_into
from digfast.ops.spatial_bias import spatial_bias
from test_spatial_bias_jvp import PARAMS, tangent_names
from test_spatial_bias_kernel import ARGS, args_of
results = []
for case in torch.load(sys.argv[1]):
    names = tangent_names(case)
    args = args_of(case)
    sets = {n: case["t"][n] for n in names}
    if "x" in sets:  # the second set shares the first's x tangent: a stride-0 view
        sets["x"] = sets["x"][:1].expand(2, *sets["x"].shape[1:])
    B, N, _ = case["x"].shape
    H, K = case["b2"].shape[0], case["means"].shape[0]
    nan = float("nan")
    tbias, tnode = torch.full((2, B, H, N, N), nan), torch.full((2, B, N, K), nan)
    spatial_bias_jvp_into(tbias, tnode, *args, sets.get("x"), [sets.get(n) for n in PARAMS])
    named = dict(zip(ARGS, args))
    f = lambda *xs: spatial_bias(**{**named, **dict(zip(names, xs))}, backend="triton")
    one = torch.func.jvp(f, tuple(named[n] for n in names), tuple(sets[n][1] for n in names))[1]
    results.append(((tbias, tnode), one))
torch.save(results, sys.argv[2])
"""


def tangent_names(case):
    return tuple(case["which"].split(","))


def reference_jvp(case, tangents, dtype):
    """(d bias, d node_features) of the float `dtype` reference along tangents {name: tensor}."""
    return jvp_along(spatial_bias_reference, dict(zip(ARGS, args_of(case, dtype))), tangent_names(case),
                     tangents, dtype)[1]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    cases = []
    for *shape, masked, which in JVP_CASES:
        case = make_inputs(rng, *shape, masked=masked)
        case["which"] = which
        case["t"] = {n: torch.randn(2, *case[n].shape, generator=rng)
                     for n in tangent_names(case)}
        cases.append(case)
    return cases, run_interpreted(_WORKER, cases, tmp_path_factory.mktemp("triton_sb_jvp"))


def _check(name, got, case, tangents):
    scales = []
    for part, g, r64, r32 in zip(("bias", "node"), got, reference_jvp(case, tangents, torch.float64),
                                 reference_jvp(case, tangents, torch.float32)):
        assert torch.isfinite(g).all(), f"{name} {part}: non-finite (unwritten?)"
        scale = float(r64.abs().max())
        err = float((g.double() - r64).abs().max())
        tol = 2 * float((r32.double() - r64).abs().max()) + 16 * EPS * scale
        print(f"{name} {part}: error {err:.2e}, tolerance {tol:.2e}, scale {scale:.1e}")
        assert err <= tol, f"{name} {part}: error {err:.3e} > tolerance {tol:.3e}"
        scales.append(scale)
    return scales


@pytest.mark.parametrize("index", range(len(JVP_CASES)),
                         ids=["B{}-N{}-D{}-K{}-H{}-T{}-mask{}".format(*c[:7]) + "-" + (
                             "all" if c[7] == ALL else c[7]) for c in JVP_CASES])
def test_spatial_bias_jvp_kernel_matches_reference_interpreted(interpreted, index):
    cases, outs = interpreted
    case, (launched, one) = cases[index], outs[index]
    names = tangent_names(case)
    for s in range(2):
        tangents = {n: case["t"][n][0 if n == "x" else s] for n in names}
        scales = _check(f"launch set {s}", [o[s] for o in launched], case, tangents)
        assert scales[0] > 0, "a zero bias tangent tests nothing"
    _check("torch.func.jvp via the dispatcher", one, case,  # the launch's second set
           {n: case["t"][n][0 if n == "x" else 1] for n in names})


@pytest.mark.slow  # minutes of LLVM on a loaded CPU
@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="interpreted here")
@pytest.mark.parametrize("dtype,K,H", [("fp32", 24, 4), ("bf16", 128, 32)])
def test_spatial_bias_jvp_kernel_compiles_for_gpus(dtype, K, H):
    from digfast.kernels.spatial_bias import _spatial_bias_jvp_kernel, launch_config, padded
    from test_vector_head_jvp import compile_for_gpus
    block_i, block_j, warps = launch_config(256, padded(K))
    pointers = {p.name: f"*{dtype}" for p in _spatial_bias_jvp_kernel.params
                if p.name.endswith("_ptr")}
    compile_for_gpus(_spatial_bias_jvp_kernel,
                     dict(D=3, K=K, H=H, K_PAD=padded(K), H_PAD=padded(H), BLOCK_I=block_i,
                          BLOCK_J=block_j, HAS_MASK=True, HAS_TX=True, HAS_TP=True,
                          DOT_PRECISION="ieee", PRECISE_MATH=True),
                     {**pointers, "type_ptr": "*i64", "mask_ptr": "*i1"}, (), warps)
