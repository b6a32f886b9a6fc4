"""The fused sampler step: compiled (C++, CUDA) and Triton backends against the reference.

Tolerance (per sample, absolute): EPS * (6 + log2 N) * max|y|, where y = a*x + b*d + c*z is
the step before the centre-of-mass projection and EPS = 2^-23 (float32 ulp of 1):
  - a*x + b*d (+ c*z) is the same float32 operations in the same order in every backend
    (no FMA contraction: -ffp-contract=off on the CPU, __fmul_rn/__fadd_rn in CUDA);
  - the noise uses float32 log/sqrt/sin/cos from different libraries (Sleef in torch, the
    C++ op's own vectorized ones, CUDA's libm, Triton's), each within ~2 ulp, so
    |dz| <= ~4 ulp(|z|) (tests/test_philox.py measures it against float64);
  - the centre of mass is summed in different orders (torch pairwise float32, C++ double,
    CUDA/Triton float trees): error <= ~log2(N) ulp of max|y|, plus the subtraction's rounding.
Padded atoms must be exactly zero in every backend.
"""
import importlib.util
import math
import os
import shutil

import pytest
import torch

from digfast.ops import _backend
from digfast.ops.philox import STREAM_STEP, philox_normal
from digfast.ops.sampler_step import sampler_step, sampler_step_reference

from interpreted import fresh_generator, run_interpreted

EPS = 2.0**-23
C_OR_NONE = importlib.util.find_spec("digfast._C") is not None
needs_C = pytest.mark.skipif(not C_OR_NONE, reason="digfast._C is not built")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _C():
    import digfast._C as C
    return C


def make_inputs(rng, B, N, D, *, masked, device="cpu"):
    x = torch.randn(B, N, D, generator=rng)
    d = torch.randn(B, N, D, generator=rng)
    ids = torch.randint(0, 2**32, (B,), generator=rng, dtype=torch.int64)
    mask = None
    if masked:
        mask = torch.rand(B, N, generator=rng) < 0.6
        # at least one real atom per sample, at a random place
        mask[torch.arange(B), torch.randint(0, N, (B,), generator=rng)] = True
        if B >= 2:  # one sample with exactly one real atom
            mask[1] = False
            mask[1, N // 2] = True
    seed = int(torch.randint(0, 2**62, (), generator=rng)) * 4 + 3  # mostly > 2^32
    step = int(torch.randint(0, 2**32, (), generator=rng))
    t = lambda v: None if v is None else v.to(device)
    return t(x), t(d), t(ids), t(mask), seed, step


def assert_step_close(out, ref, x, d, a, b, c, *, seed, ids, step, mask):
    assert out.shape == ref.shape and out.dtype == torch.float32
    B, N, D = x.shape
    if B == 0:
        return
    out, ref = out.cpu(), ref.cpu()
    z = philox_normal(seed, ids.cpu(), step, STREAM_STEP, N * D).reshape(B, N, D)
    y = a * x.cpu() + b * d.cpu() + c * z
    tol = EPS * (6 + math.log2(N)) * y.abs().amax(dim=(1, 2)).clamp_min(1e-30)
    err = (out - ref).abs().amax(dim=(1, 2))
    assert (err <= tol).all(), f"max error / tolerance {float((err / tol).max()):.2f}"
    if mask is not None:
        pad = ~mask.cpu()
        assert (out[pad] == 0).all(), "padded atoms must be exactly zero"


ABC = [(0.9, 0.3, 0.0), (0.97, -0.41, 0.73)]  # c == 0: ODE step, no noise drawn


# ---- C++ CPU backend --------------------------------------------------------------------

@needs_C
@pytest.mark.parametrize("abc", ABC, ids=["c0", "noise"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("N", [1, 2, 5, 13, 127, 1000])
@pytest.mark.parametrize("B", [0, 1, 3, 17])
def test_cpp_matches_reference(rng, B, N, D, masked, abc):
    from digfast.ops._compiled import sampler_step_cpp
    x, d, ids, mask, seed, step = make_inputs(rng, B, N, D, masked=masked)
    a, b, c = abc
    kw = dict(seed=seed, sample_ids=ids, step=step, mask=mask)
    ref = sampler_step_reference(x, d, a, b, c, **kw)
    out = sampler_step_cpp(x, d, a, b, c, **kw)
    assert_step_close(out, ref, x, d, a, b, c, seed=seed, ids=ids, step=step, mask=mask)


@needs_C
def test_cpp_extreme_keys(rng):
    """Largest seed, sample id and step: all 32-bit words at their ends."""
    from digfast.ops._compiled import sampler_step_cpp
    x, d, _, _, _, _ = make_inputs(rng, 4, 7, 3, masked=False)
    ids = torch.tensor([0, 1, 2**31, 2**32 - 1])
    for seed in (0, 2**32 - 1, 2**32, 2**64 - 1):
        for step in (0, 2**32 - 1):
            kw = dict(seed=seed, sample_ids=ids, step=step, mask=None)
            ref = sampler_step_reference(x, d, 1.0, 0.5, 1.0, **kw)
            out = sampler_step_cpp(x, d, 1.0, 0.5, 1.0, **kw)
            assert_step_close(out, ref, x, d, 1.0, 0.5, 1.0, seed=seed, ids=ids, step=step,
                              mask=None)


@needs_C
def test_cpp_projection_properties(rng):
    from digfast.ops._compiled import sampler_step_cpp
    x, d, ids, mask, seed, step = make_inputs(rng, 5, 11, 3, masked=True)
    out = sampler_step_cpp(x, d, 0.8, 0.2, 0.5, seed=seed, sample_ids=ids, step=step, mask=mask)
    m = mask.unsqueeze(-1).float()
    com = (out * m).sum(1) / m.sum(1)
    assert com.abs().max() < 1e-5           # centred on the real atoms
    assert (out[~mask] == 0).all()          # padded atoms exactly zero
    assert (out[1] == 0).all()              # sample 1 has one real atom: it sits at 0


@needs_C
def test_cpp_noise_depends_only_on_sample_keys(rng):
    """Permuting or splitting the batch permutes the result bit for bit; threads don't matter."""
    C = _C()
    # big enough (~2M work units) for the C++ op to start several threads
    x, d, ids, mask, seed, step = make_inputs(rng, 50, 3000, 3, masked=True)
    kw = dict(a=0.9, b=0.1, c=0.6, seed=seed, step=step)

    def run(sel, threads):
        out = torch.empty_like(x[sel])
        C.sampler_step_cpu(out=out, x=x[sel].contiguous(), direction=d[sel].contiguous(),
                           sample_ids=ids[sel].contiguous(), mask=mask[sel].contiguous(),
                           num_threads=threads, **kw)
        return out

    full = run(slice(None), 1)
    perm = torch.randperm(50, generator=rng)
    assert torch.equal(run(perm, 2), full[perm])
    assert torch.equal(run(slice(7, 8), 1), full[7:8])
    assert torch.equal(run(slice(None), 7), full)


@needs_C
def test_cpp_c_zero_draws_no_noise(rng):
    from digfast.ops._compiled import sampler_step_cpp
    x, d, ids, _, seed, step = make_inputs(rng, 3, 9, 3, masked=False)
    one = sampler_step_cpp(x, d, 0.5, 0.25, 0.0, seed=seed, sample_ids=ids, step=step)
    other = sampler_step_cpp(x, d, 0.5, 0.25, 0.0, seed=seed + 1, sample_ids=ids + 1, step=0)
    assert torch.equal(one, other)
    y = 0.5 * x + 0.25 * d
    expected = y - y.mean(1, keepdim=True)
    assert (one - expected).abs().max() <= EPS * (6 + math.log2(9)) * y.abs().max()


@needs_C
def test_cpp_in_place_output(rng):
    C = _C()
    x, d, ids, mask, seed, step = make_inputs(rng, 3, 20, 3, masked=True)
    kw = dict(a=0.9, b=0.3, c=0.2, seed=seed, sample_ids=ids, step=step, mask=mask)
    expected = torch.empty_like(x)
    C.sampler_step_cpu(out=expected, x=x, direction=d, num_threads=1, **kw)
    x2 = x.clone()
    C.sampler_step_cpu(out=x2, x=x2, direction=d, num_threads=1, **kw)  # out aliases x
    assert torch.equal(x2, expected)


# ---- dispatch ------------------------------------------------------------------------

@needs_C
def test_dispatcher_picks_compiled_on_cpu(rng, monkeypatch):
    C = _C()
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    assert _backend.choose("sampler_step", torch.device("cpu")) == "cpp"
    calls = []
    real = C.sampler_step_cpu
    monkeypatch.setattr(C, "sampler_step_cpu", lambda **kw: calls.append(1) or real(**kw))
    x, d, ids, mask, seed, step = make_inputs(rng, 3, 6, 3, masked=True)
    with torch.no_grad():
        out = sampler_step(x, d, 0.9, 0.1, 0.3, seed=seed, sample_ids=ids, step=step, mask=mask)
    assert calls == [1]
    ref = sampler_step(x, d, 0.9, 0.1, 0.3, seed=seed, sample_ids=ids, step=step, mask=mask,
                       backend="reference")
    assert_step_close(out, ref, x, d, 0.9, 0.1, 0.3, seed=seed, ids=ids, step=step, mask=mask)


@needs_C
def test_dispatcher_accepts_non_contiguous_inputs(rng):
    x, d, ids, mask, seed, step = make_inputs(rng, 6, 10, 3, masked=True)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)       # same values, other strides
    dt = torch.cat([d, d], dim=2)[..., :3]                       # a non-contiguous slice
    idt = torch.stack([ids, ids], 1)[:, 0]
    mt = mask.t().contiguous().t()
    assert not (xt.is_contiguous() or dt.is_contiguous() or idt.is_contiguous()
                or mt.is_contiguous())
    kw = dict(seed=seed, step=step)
    out = sampler_step(xt, dt, 0.9, 0.1, 0.3, sample_ids=idt, mask=mt, backend="cpp", **kw)
    ref = sampler_step(x, d, 0.9, 0.1, 0.3, sample_ids=ids, mask=mask, backend="reference", **kw)
    assert_step_close(out, ref, x, d, 0.9, 0.1, 0.3, seed=seed, ids=ids, step=step, mask=mask)


@needs_C
def test_compiled_refuses_to_drop_gradients(rng):
    x, d, ids, _, seed, step = make_inputs(rng, 2, 4, 3, masked=False)
    d.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        sampler_step(x, d, 1.0, 0.1, 0.2, seed=seed, sample_ids=ids, step=step, backend="cpp")
    with torch.no_grad():
        sampler_step(x, d, 1.0, 0.1, 0.2, seed=seed, sample_ids=ids, step=step, backend="cpp")


# ---- the C++ boundary: every input checked, with a message naming it ----------------------

def _good(rng):
    x, d, ids, mask, seed, step = make_inputs(rng, 3, 5, 3, masked=True)
    return dict(out=torch.empty_like(x), x=x, direction=d, a=1.0, b=0.5, c=0.3, seed=seed,
                sample_ids=ids, step=step, mask=mask, num_threads=2)


BAD = [
    ("x", lambda k: k["x"].double(), TypeError, "x must have dtype torch.float32"),
    ("x", lambda k: k["x"].numpy(), TypeError, "x must be a torch.Tensor"),
    ("x", lambda k: k["x"][:, :, :2].contiguous(), ValueError, "direction must have shape"),
    ("x", lambda k: k["x"].reshape(3, 15), ValueError, r"x must be \(batch, atoms, dim\)"),
    ("x", lambda k: k["x"].transpose(0, 1).contiguous().transpose(0, 1), ValueError,
     "x must be contiguous"),
    ("x", lambda k: k["x"].to("meta"), ValueError, "x must be on a cpu device, got meta"),
    ("direction", lambda k: k["direction"].half(), TypeError,
     "direction must have dtype torch.float32, got torch.float16"),
    ("direction", lambda k: k["direction"][:, :4], ValueError,
     r"direction must have shape \(3, 5, 3\), got \(3, 4, 3\)"),
    ("direction", lambda k: k["direction"].transpose(1, 2).contiguous().transpose(1, 2),
     ValueError, "direction must be contiguous"),
    ("direction", lambda k: k["direction"].to("meta"), ValueError,
     "direction is on meta but x is on cpu"),
    ("out", lambda k: k["out"].double(), TypeError, "out must have dtype torch.float32"),
    ("out", lambda k: k["out"][:2], ValueError, "out must have shape"),
    ("sample_ids", lambda k: k["sample_ids"].int(), TypeError,
     "sample_ids must have dtype torch.int64, got torch.int32"),
    ("sample_ids", lambda k: k["sample_ids"][:2], ValueError,
     r"sample_ids must have shape \(3,\), got \(2,\)"),
    ("sample_ids", lambda k: torch.tensor([0, 1, 2**32]), ValueError,
     r"sample_ids must lie in \[0, 2\*\*32\)"),
    ("sample_ids", lambda k: torch.tensor([0, -5, 1]), ValueError, "got -5 at position 1"),
    ("mask", lambda k: k["mask"].to(torch.uint8), TypeError,
     "mask must have dtype torch.bool, got torch.uint8"),
    ("mask", lambda k: k["mask"][:, :3], ValueError, r"mask must have shape \(3, 5\)"),
    ("mask", lambda k: torch.ones(5, 3, dtype=torch.bool).t(), ValueError,
     "mask must be contiguous"),
    ("seed", lambda k: -1, ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ("seed", lambda k: 2**64, ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ("seed", lambda k: 1.5, TypeError, "seed must be an integer"),
    ("step", lambda k: 2**32, ValueError, r"step must be in \[0, 2\*\*32\)"),
    ("num_threads", lambda k: 0, ValueError, "num_threads must be >= 1"),
]


@needs_C
@pytest.mark.parametrize("name,bad,error,message", BAD)
def test_cpp_boundary_checks(rng, name, bad, error, message):
    C = _C()
    kw = _good(rng)
    kw[name] = bad(kw)
    with pytest.raises(error, match=message):
        C.sampler_step_cpu(**kw)


@needs_C
def test_cpp_boundary_checks_coordinates_dim(rng):
    C = _C()
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="last dimension .* must be 2 or 3"):
        C.sampler_step_cpu(out=torch.empty_like(x), x=x, direction=x, a=1.0, b=0.0, c=0.0,
                           seed=0, sample_ids=torch.arange(2), step=0, mask=None, num_threads=1)
    x = torch.randn(2, 0, 3)
    with pytest.raises(ValueError, match="at least one atom"):
        C.sampler_step_cpu(out=torch.empty_like(x), x=x, direction=x, a=1.0, b=0.0, c=0.0,
                           seed=0, sample_ids=torch.arange(2), step=0, mask=None, num_threads=1)


@needs_C
def test_cpp_accepts_numpy_integers_for_keys(rng):
    np = pytest.importorskip("numpy")
    C = _C()
    kw = _good(rng)
    kw["seed"], kw["step"] = np.uint64(2**63 + 7), np.int64(5)
    C.sampler_step_cpu(**kw)


@needs_C
def test_build_info_and_cuda_compiled():
    C = _C()
    info = C.build_info()
    assert info["cuda"] == C.has_cuda()
    assert info["version"] and info["cxx_compiler"]
    if info["cuda"]:
        assert info["cuda_compiler"].startswith("NVIDIA") and info["cuda_archs"]
        assert hasattr(C, "sampler_step_cuda")
    elif info["cuda_option"] and shutil.which("nvcc"):
        pytest.fail(f"nvcc is on PATH but the CUDA kernels were not built: {info['cuda_status']}")


@needs_C
def test_cuda_op_without_gpu_is_a_clear_error(rng):
    C = _C()
    if not C.has_cuda() or torch.cuda.is_available():
        pytest.skip("needs a CUDA build on a machine without a GPU")
    kw = _good(rng)
    kw.pop("num_threads")
    with pytest.raises(ValueError, match="x must be on a cuda device, got cpu"):
        C.sampler_step_cuda(stream=0, **kw)


# ---- Triton, under the interpreter on the CPU ------------------------------------------
# One subprocess runs every case with TRITON_INTERPRET=1 (see tests/interpreted.py for why).

TRITON_SHAPES = [(1, 1, 3), (3, 5, 2), (17, 13, 3), (3, 127, 3), (2, 1000, 2), (0, 4, 3)]
TRITON_CASES = [(shape, masked, abc) for shape in TRITON_SHAPES for masked in (False, True)
                for abc in ABC]

_TRITON_WORKER = """
import sys, torch
from digfast.kernels.sampler_step import sampler_step_triton
cases = torch.load(sys.argv[1])
outs = [sampler_step_triton(c["x"], c["d"], c["a"], c["b"], c["c"], seed=c["seed"],
                            sample_ids=c["ids"], step=c["step"], mask=c["mask"])
        for c in cases]
torch.save(outs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """(inputs, triton output) per case of TRITON_CASES, computed under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    rng = fresh_generator()
    cases = []
    for shape, masked, (a, b, c) in TRITON_CASES:
        x, d, ids, mask, key, step = make_inputs(rng, *shape, masked=masked)
        cases.append(dict(x=x, d=d, ids=ids, mask=mask, seed=key, step=step, a=a, b=b, c=c))
    return list(zip(cases, run_interpreted(_TRITON_WORKER, cases, tmp_path_factory.mktemp("triton"))))


@pytest.mark.parametrize("case", range(len(TRITON_CASES)),
                         ids=["x".join(map(str, s)) + ("-mask" if m else "-nomask")
                              + ("-noise" if abc[2] else "-c0") for s, m, abc in TRITON_CASES])
def test_triton_matches_reference_interpreted(triton_results, case):
    inputs, out = triton_results[case]
    x, d, ids, mask = inputs["x"], inputs["d"], inputs["ids"], inputs["mask"]
    a, b, c, seed, step = (inputs[k] for k in ("a", "b", "c", "seed", "step"))
    ref = sampler_step_reference(x, d, a, b, c, seed=seed, sample_ids=ids, step=step, mask=mask)
    assert_step_close(out, ref, x, d, a, b, c, seed=seed, ids=ids, step=step, mask=mask)


def test_triton_launch_config_is_sane():
    pytest.importorskip("triton")
    from digfast.kernels.sampler_step import launch_config
    for n, dim in [(1, 2), (5, 3), (1000, 3), (10**5, 3)]:
        blocks, warps = launch_config(n, dim)
        assert 16 <= blocks <= 256 and blocks & (blocks - 1) == 0 and warps in (1, 2, 4)


def test_triton_kernel_compiles_for_gpus():
    """Compile (not run) the Triton kernel for sm_80 and sm_90: catches type and lowering
    errors without a GPU, and checks that no approximate transcendental slips in."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API: {err}")
    from digfast.kernels.sampler_step import _sampler_step_kernel
    signature = {"x_ptr": "*fp32", "dir_ptr": "*fp32", "out_ptr": "*fp32", "ids_ptr": "*i64",
                 "mask_ptr": "*i1", "a": "fp32", "b": "fp32", "c": "fp32", "seed_lo": "i64",
                 "seed_hi": "i32", "step": "i64", "stream": "i32", "n_atoms": "i32"}
    constexprs = {"D": 3, "HAS_MASK": True, "HAS_NOISE": True, "PHILOX_BLOCKS": 64,
                  "PRECISE_MATH": True}
    try:
        src = ASTSource(_sampler_step_kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")},
                        constexprs=constexprs)
    except TypeError as err:  # the ASTSource API changes between releases
        pytest.skip(f"ASTSource API differs in triton {triton.__version__}: {err}")
    for arch in (80, 90):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": 2, "enable_fp_fusion": False})
        ptx = compiled.asm["ptx"]
        assert "mul.hi.u32" in ptx
        for approx in ("sin.approx", "cos.approx", "lg2.approx"):
            assert approx not in ptx


# ---- GPU (run on a machine with a CUDA device) -------------------------------------------

GPU_SHAPES = [(1, 1, 3), (3, 5, 2), (17, 13, 3), (1024, 13, 3), (5, 1000, 3), (3, 5003, 3),
              (2, 20000, 2), (0, 4, 3)]


def _gpu_backends():
    names = []
    if C_OR_NONE and _C().has_cuda():
        names.append("cuda")
    if _backend.triton_available():
        names.append("triton")
    return names


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("abc", ABC, ids=["c0", "noise"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference(rng, backend, shape, masked, abc):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available")
    x, d, ids, mask, seed, step = make_inputs(rng, *shape, masked=masked, device="cuda")
    a, b, c = abc
    kw = dict(seed=seed, sample_ids=ids, step=step, mask=mask)
    ref = sampler_step_reference(x.cpu(), d.cpu(), a, b, c, seed=seed, sample_ids=ids.cpu(),
                                 step=step, mask=None if mask is None else mask.cpu())
    with torch.no_grad():
        out = sampler_step(x, d, a, b, c, backend=backend, **kw)
    assert out.device == x.device
    assert_step_close(out, ref, x, d, a, b, c, seed=seed, ids=ids, step=step, mask=mask)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_side_stream_and_graph_capture(rng, backend):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available")
    x, d, ids, mask, seed, step = make_inputs(rng, 64, 50, 3, masked=True, device="cuda")
    kw = dict(seed=seed, sample_ids=ids, step=step, mask=mask, backend=backend)
    with torch.no_grad():
        expected = sampler_step(x, d, 0.9, 0.1, 0.4, **kw)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # runs on the caller's (side) stream
            on_side = sampler_step(x, d, 0.9, 0.1, 0.4, **kw)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(on_side, expected)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = sampler_step(x, d, 0.9, 0.1, 0.4, **kw)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected)


@pytest.mark.gpu
@needs_gpu
def test_gpu_dispatcher_picks_cuda_or_triton(monkeypatch):
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    names = _gpu_backends()
    chosen = _backend.choose("sampler_step", torch.device("cuda"))
    assert chosen == (names[0] if names else "reference")
