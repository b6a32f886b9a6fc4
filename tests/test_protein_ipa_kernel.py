"""The fused IPA-style attention kernels (kernels/ipa_attention.py) under TRITON_INTERPRET=1
against the pure-torch reference (digfast/ops/ipa_attention.py).

Oracle: the reference in float64 on the same inputs. Tolerance per output (absolute, whole
tensor): 2 * (error of the reference run in the kernel's input dtype) + FLOOR * max|oracle|,
FLOOR = 8 float32 ulps (16-bit inputs: one ulp of that dtype). Outputs are NaN-free and
every entry is written (the launcher allocates with torch.empty; a row never written would
show garbage far outside the tolerance, or NaN). Fresh random inputs each run.
"""
import os

import pytest
import torch

from digfast.ops.ipa_attention import ipa_attention, ipa_attention_reference

from interpreted import fresh_generator, run_interpreted

EPS32 = 2.0**-23
ARGS = ("q", "k", "v", "qp", "kp", "vp", "point_weight", "bias", "z", "key_mask")

# (B, H, L, C, P, PV, DP, masked, dtype)
CASES = [
    (1, 1, 1, 8, 4, 8, 16, False, "fp32"),
    (2, 3, 7, 24, 4, 8, 32, True, "fp32"),
    (2, 2, 33, 24, 4, 8, 20, False, "fp32"),   # two key tiles, d_pair not a power of two
    (3, 2, 40, 12, 4, 8, 48, True, "fp32"),    # two tiles, one sample with every key padded
    (2, 2, 17, 24, 4, 8, 32, True, "fp16"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def make_case(rng, B, H, L, C, P, PV, DP, masked, dtype):
    g = lambda *s, scale=1.0: torch.randn(*s, generator=rng) * scale  # noqa: E731
    T = g(B, 1, L, 1, 3, scale=15.0)  # points spread like residues (tens of A), logits O(1)
    case = dict(q=g(B, H, L, C, scale=C**-0.5), k=g(B, H, L, C), v=g(B, H, L, C),
                qp=T + g(B, H, L, P, 3, scale=2.0), kp=T + g(B, H, L, P, 3, scale=2.0),
                vp=T + g(B, H, L, PV, 3, scale=2.0), point_weight=-0.02 * g(H).abs(),
                bias=g(H, L, L), z=g(L, L, DP), key_mask=None)
    if masked:
        mask = torch.rand(B, L, generator=rng) < 0.7
        mask[:, 0] = True
        if B >= 3:
            mask[2] = False
        case["key_mask"] = mask
    for name in ("q", "k", "v", "bias", "z"):
        case[name] = case[name].to(DTYPES[dtype])
    return case


def args_of(case, dtype=None):
    out = []
    for name in ARGS:
        t = case[name]
        if t is not None and dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out.append(t)
    return out


_WORKER = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from digfast.kernels.ipa_attention import ipa_attention_triton
cases = torch.load(sys.argv[1])
names = ("q", "k", "v", "qp", "kp", "vp", "point_weight", "bias", "z", "key_mask")
torch.save([ipa_attention_triton(*(c[n] for n in names)) for c in cases], sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    cases = [make_case(rng, *c) for c in CASES]
    outs = run_interpreted(_WORKER, cases, tmp_path_factory.mktemp("triton_ipa_attention"))
    return list(zip(cases, outs))


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_triton_ipa_attention_matches_reference_interpreted(triton_results, index):
    case, got = triton_results[index]
    dtype = DTYPES[CASES[index][-1]]
    ref64 = ipa_attention_reference(*args_of(case, torch.float64))
    low = ipa_attention_reference(*args_of(case))
    floor = 8 * EPS32 if dtype == torch.float32 else torch.finfo(dtype).eps
    for name, g, r64, rl in zip(("scalar", "point", "pair"), got, ref64, low):
        assert g.shape == r64.shape and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), f"{name}: non-finite entries"
        err = float((g.double() - r64).abs().max())
        tol = 2 * float((rl.double() - r64).abs().max()) + floor * float(r64.abs().max())
        print(f"{name}: error {err:.2e}, tolerance {tol:.2e}")
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e}"
    if case["key_mask"] is not None:
        empty = ~case["key_mask"].any(1)
        assert all((g[empty] == 0).all() for g in got), "samples without keys must give zeros"


def test_dispatch_cpu_runs_reference(rng, monkeypatch):
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    case = make_case(rng, 2, 2, 5, 8, 4, 8, 6, True, "fp32")
    for a, b in zip(ipa_attention(*args_of(case)), ipa_attention_reference(*args_of(case))):
        assert torch.equal(a, b)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted here")
def test_triton_checks_its_inputs(rng):
    pytest.importorskip("triton")
    from digfast.kernels.ipa_attention import ipa_attention_triton
    good = make_case(rng, 2, 2, 5, 8, 4, 8, 6, True, "fp32")
    bad = [("bias", lambda c: c["bias"][None].expand(2, -1, -1, -1), ValueError, "shared by the batch"),
           ("z", lambda c: c["z"][:4], ValueError, r"z must be \(5, 5, d_pair\)"),
           ("k", lambda c: c["k"].double(), TypeError, "k must have q's dtype"),
           ("qp", lambda c: c["qp"][..., :2], ValueError, "qp and kp must be"),
           ("key_mask", lambda c: c["key_mask"].int(), TypeError, "key_mask must be bool")]
    for name, change, error, message in bad:
        with pytest.raises(error, match=message):
            ipa_attention_triton(*args_of(dict(good, **{name: change(good)})))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ipa_attention_triton(*args_of(good))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 32, 1, 24, 4, 8, 256, False), (4, 32, 130, 24, 4, 8, 256, True),
                                   (2, 32, 257, 24, 4, 8, 256, False)])
def test_gpu_triton_matches_reference(shape, dtype):
    rng = fresh_generator()
    case = make_case(rng, *shape, "fp32")
    dev = [None if t is None else t.cuda() for t in args_of(case)]
    dev = [t.to(dtype) if t is not None and n in ("q", "k", "v", "bias", "z") else t for n, t in zip(ARGS, dev)]
    got = ipa_attention(*dev, backend="triton")
    ref64 = ipa_attention_reference(*args_of(case, torch.float64))
    low = ipa_attention_reference(*dev)
    floor = 8 * EPS32 if dtype == torch.float32 else 2.0**-8
    for g, r64, rl in zip(got, ref64, low):
        err = float((g.double().cpu() - r64).abs().max())
        tol = 2 * float((rl.double().cpu() - r64).abs().max()) + floor * float(r64.abs().max())
        assert err <= tol, f"{err:.3e} > {tol:.3e} ({dtype})"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIGFAST_COMPILE_CHECKS") != "1",
                    reason="~90 s of CPU: set DIGFAST_COMPILE_CHECKS=1")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_gpus(dtype):
    """Compile (not run) both kernels for sm_80 and sm_90 at the full-size shapes (c = 24,
    4 / 8 points, d_pair 256): catches type and lowering errors without a GPU, and shared
    memory over the card's limit (seen on an H200 before the pair kernel's stages were set). Opt-in
    (DIGFAST_COMPILE_CHECKS=1): the unrolled point and channel loops take ~90 s to compile on
    a small CPU."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from digfast.kernels import ipa_attention as ipa
    fp, f32 = f"*{dtype}", "*fp32"
    cfg = ipa.launch_config(256, 4 * 32)
    common = dict(C=24, P=4, HAS_MASK=True, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    smem_limit = {80: 163 * 1024, 90: 227 * 1024}  # per block, opt-in maximum (A100, H100/H200)
    kernels = [
        (ipa._ipa_rows_kernel,
         {"q_ptr": fp, "k_ptr": fp, "v_ptr": fp, "qp_ptr": f32, "kp_ptr": f32, "vp_ptr": f32, "w_ptr": f32,
          "bias_ptr": fp, "mask_ptr": "*i8", "os_ptr": f32, "op_ptr": f32, "stats_ptr": f32,
          "n_tokens": "i32", "n_heads": "i32", "n_rows": "i32"},
         dict(common, C_PAD=32, PV3=24, PV3_PAD=32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]), 3),
        (ipa._ipa_pair_kernel,
         {"q_ptr": fp, "k_ptr": fp, "qp_ptr": f32, "kp_ptr": f32, "w_ptr": f32, "bias_ptr": fp, "mask_ptr": "*i8",
          "z_ptr": fp, "stats_ptr": f32, "oz_ptr": f32, "n_tokens": "i32", "n_heads": "i32", "n_bh": "i32",
          "n_rows": "i32"},
         dict(common, DP=256, DP_PAD=256, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"]), cfg["pair_stages"]),
    ]
    for kernel, signature, constexprs, stages in kernels:
        try:
            src = ASTSource(kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
        except TypeError as err:
            pytest.skip(f"ASTSource API differs in triton {triton.__version__}: {err}")
        for arch in (80, 90):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": cfg["num_warps"], "num_stages": stages})
            assert compiled.asm["ptx"]
            assert compiled.metadata.shared <= smem_limit[arch], (kernel.__name__, arch, compiled.metadata.shared)


_MODEL_WORKER = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from protein_helpers import SMALL
from digfast.models.protein import ProteinScoreModel
from digfast.models.protein.fast import FastProteinModel
case = torch.load(sys.argv[1])
model = ProteinScoreModel(SMALL)
model.load_state_dict(case["state"])
fast = FastProteinModel(model.eval(), backend="triton")
ctx = fast.context(case["single"], case["pair"])
torch.save(fast(ctx, case["T"], case["IR"], case["step"], case["padding"]), sys.argv[2])
"""


def test_fused_model_under_interpreter_matches_reference(tmp_path):
    """The whole fast model with the Triton attention core (interpreted) against the reference
    model in the public layout: 1e-5 relative, a padded structure included."""
    pytest.importorskip("triton")
    from digfast.models.protein import ProteinScoreModel
    from protein_helpers import SMALL, random_inputs, random_state
    rng = fresh_generator()
    state = random_state(SMALL, rng)
    model = ProteinScoreModel(SMALL)
    model.load_state_dict(state)
    model.eval()
    x = random_inputs(2, 9, rng)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    step = int(x["step"][0])
    got = run_interpreted(_MODEL_WORKER, dict(state=state, single=x["single"], pair=x["pair"], T=x["T"],
                                              IR=x["IR"], step=step, padding=padding), tmp_path)
    with torch.no_grad():
        want = model(x["T"], x["IR"], torch.full((2,), step), x["single"].expand(2, -1, -1),
                     x["pair"].expand(2, -1, -1, -1), padding)
    real = ~padding
    for g, w in zip(got, want):
        err = float((g - w)[real].abs().max() / w[real].abs().max())
        print(f"relative error {err:.2e}")
        assert err < 1e-5
