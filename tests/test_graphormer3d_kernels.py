"""Graphormer3D with every op forced onto its Triton kernel (interpreted) against the reference.

The model's backend "triton" sends the spatial bias (bias and per-atom Gaussian sums), the
pair-bias attention of every layer and the fused vector head through the kernels; None (the
default) keeps the reference on the CPU. Oracle: the reference model in float64; tolerance
per tensor (output, input gradient, each weight gradient, forward-mode derivative along a
coordinate tangent: the kernels' tangent kernels): 2 * (error of the reference model
in float32) + 8 * EPS * max|oracle|, as the op-level tests.
"""
import pytest
import torch

from digfast.models import Graphormer3D, Graphormer3DConfig

from interpreted import fresh_generator, run_interpreted

EPS = 2.0**-23
CONFIG = dict(n_atom_types=3, layers=2, width=32, heads=4, ffn=48, gaussians=16)
# (B, N): a single-tile and a partial-tile molecule, both padded (mask)
CASES = [(2, 7), (1, 33)]

_WORKER = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_graphormer3d_kernels import forward_and_grads, build
state, cases = torch.load(sys.argv[1])
net = build(state)
net.backend = "triton"
torch.save([forward_and_grads(net, c) for c in cases], sys.argv[2])
"""


def build(state, dtype=torch.float32):
    net = Graphormer3D(Graphormer3DConfig(**CONFIG))
    net.load_state_dict(state)
    return net.to(dtype)


def make_case(rng, B, N):
    """Coordinates of unit scale, random types and times, a padding mask (atom 0 real, about
    a third of the rest padded) and a random output cotangent."""
    mask = torch.rand(B, N, generator=rng) < 0.7
    mask[:, 0] = True
    return dict(x=1.5 * torch.randn(B, N, 3, generator=rng), t=torch.rand(B, generator=rng),
                types=torch.randint(0, CONFIG["n_atom_types"], (B, N), generator=rng), mask=mask,
                cotangent=torch.randn(B, N, 3, generator=rng),
                tangent=torch.randn(B, N, 3, generator=rng))


def forward_and_grads(net, case, dtype=torch.float32):
    """eps, d<cotangent, eps>/dx, the gradient of every weight (by name) and the forward-mode
    derivative of eps along the coordinate tangent (the likelihood's divergence uses it)."""
    net.zero_grad(set_to_none=True)
    x = case["x"].detach().to(dtype, copy=True).requires_grad_(True)  # never the case's own
    eps = net(x, case["t"].to(dtype), case["types"], case["mask"])
    (eps * case["cotangent"].to(dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    with torch.no_grad():
        jvp = torch.func.jvp(lambda y: net(y, case["t"].to(dtype), case["types"], case["mask"]),
                             (x.detach(),), (case["tangent"].to(dtype),))[1]
    return dict(eps=eps.detach(), x=x.grad.detach(), jvp=jvp,
                **{f"w.{n}": g for n, g in grads.items()})


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    rng = fresh_generator()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = Graphormer3D(Graphormer3DConfig(**CONFIG))
    with torch.no_grad():  # O(1) non-default Gaussian parameters, so every path carries signal
        net.bias.mul.add_(0.3 * torch.randn(net.bias.mul.shape, generator=rng))
        net.bias.add.add_(0.3 * torch.randn(net.bias.add.shape, generator=rng))
    state = net.state_dict()
    cases = [make_case(rng, *c) for c in CASES]
    return state, cases, run_interpreted(_WORKER, (state, cases),
                                         tmp_path_factory.mktemp("triton_graphormer3d"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"B{b}-N{n}" for b, n in CASES])
def test_model_with_kernels_matches_reference_interpreted(interpreted, index):
    state, cases, outs = interpreted
    assert_matches_reference(state, cases[index], outs[index])


def assert_matches_reference(state, case, got):
    """got (forward_and_grads of the kernel path, on the CPU) against the float64 reference."""
    ref64 = forward_and_grads(build(state, torch.float64), case, torch.float64)
    ref32 = forward_and_grads(build(state), case)
    assert got.keys() == ref64.keys(), "the kernel path left a weight without gradient"
    # Weight gradients are sums over pairs and atoms, some of them 0 in exact arithmetic
    # (fc2.bias: a bias shared by a whole softmax row has no gradient), so their rounding
    # scales with the largest weight gradient, not with their own size.
    w_scale = max(float(g.abs().max()) for n, g in ref64.items() if n.startswith("w."))
    worst, worst_name = 0.0, None
    for name, oracle in ref64.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{name}: non-finite"
        err = float((g.double() - oracle).abs().max())
        scale = w_scale if name.startswith("w.") else float(oracle.abs().max())
        tol = 2 * float((ref32[name].double() - oracle).abs().max()) + 8 * EPS * scale
        if err > worst * tol:
            worst, worst_name = err / tol, name
        assert err <= tol, f"{name}: error {err:.3e} > tolerance {tol:.3e}"
    print(f"worst error / tolerance {worst:.2f} ({worst_name})")
    assert float(ref64["eps"].abs().max()) > 0 and float(ref64["x"].abs().max()) > 0
    # padded atoms output 0 on both paths
    assert (got["eps"][~case["mask"]] == 0).all()


def on_device(net, case, device):
    """forward_and_grads of net (its backend as set) on device, results on the CPU."""
    net = net.to(device)
    moved = {k: v.to(device) for k, v in case.items()}
    return {k: v.cpu() for k, v in forward_and_grads(net, moved).items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_model_default_backend_is_the_kernels_and_matches(rng):
    """On a GPU backend None runs the kernels (every op chooses Triton); N = 100, padded."""
    from digfast.ops import _backend
    cuda = torch.device("cuda")
    if any(_backend.choose(op, cuda) != "triton"
           for op in ("spatial_bias", "pair_bias_attention", "fused_vector_head")):
        pytest.skip("Triton not available on this GPU")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    state = Graphormer3D(Graphormer3DConfig(**CONFIG)).state_dict()
    case = make_case(rng, 3, 100)
    assert_matches_reference(state, case, on_device(build(state), case, cuda))


def test_default_backend_is_the_reference_on_the_cpu(rng, monkeypatch):
    """backend None on the CPU (float32 and float64) is the reference path, bit for bit."""
    monkeypatch.delenv("DIGFAST_BACKEND", raising=False)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = Graphormer3D(Graphormer3DConfig(**CONFIG))
    case = make_case(rng, 2, 9)
    for dtype in (torch.float32, torch.float64):
        net = net.to(dtype)
        args = (case["x"].to(dtype), case["t"].to(dtype), case["types"], case["mask"])
        net.backend = None
        default = net(*args)
        net.backend = "reference"
        assert torch.equal(default, net(*args))
