"""Symmetries of the Graphormer-3D network: rotation, translation, permutation, padding."""
import pytest
import torch

from digfast.models import Graphormer3D, Graphormer3DConfig

TOL = dict(rtol=1e-4, atol=1e-5)


def _net(dim_types=3, seed=0):
    torch.manual_seed(seed)
    return Graphormer3D(Graphormer3DConfig(n_atom_types=dim_types, layers=2, width=32, heads=4, ffn=48,
                                           gaussians=16)).eval()


def _inputs(rng, b, n, d, n_types=3):
    x = 1.5 * torch.randn(b, n, d, generator=rng)
    t = torch.rand(b, generator=rng)
    types = torch.randint(0, n_types, (n,), generator=rng)
    return x, t, types


def _orthogonal(d, rng, proper=True):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=rng, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if proper and torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("proper", [True, False], ids=["SO", "O"])
def test_equivariant_to_rotations_and_reflections(rng, d, proper):
    net = _net()
    x, t, types = _inputs(rng, 3, 7, d)
    q = _orthogonal(d, rng, proper)
    with torch.no_grad():
        torch.testing.assert_close(net(x @ q.T, t, types), net(x, t, types) @ q.T, **TOL)


def test_invariant_to_translation(rng):
    net = _net()
    x, t, types = _inputs(rng, 3, 6, 3)
    with torch.no_grad():
        torch.testing.assert_close(net(x + torch.randn(3, 1, 3, generator=rng), t, types), net(x, t, types), **TOL)


def test_permutes_with_atoms(rng):
    net = _net()
    x, t, types = _inputs(rng, 2, 9, 3)
    perm = torch.randperm(9, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(net(x[:, perm], t, types[perm]), net(x, t, types)[:, perm], **TOL)


def test_padding_gives_the_unpadded_result(rng):
    net = _net()
    x, t, types = _inputs(rng, 2, 5, 3)
    pad = torch.cat([x, 100 * torch.randn(2, 3, 3, generator=rng)], dim=1)  # junk in the padding
    ptypes = torch.cat([types, torch.zeros(3, dtype=torch.long)])
    mask = torch.tensor([True] * 5 + [False] * 3).expand(2, -1)
    with torch.no_grad():
        out = net(pad, t, ptypes, mask)
        torch.testing.assert_close(out[:, :5], net(x, t, types), **TOL)
        assert out[:, 5:].abs().max() == 0


def test_depends_on_time_and_types(rng):
    net = _net()
    x, t, types = _inputs(rng, 2, 5, 3)
    with torch.no_grad():
        base = net(x, t, types)
        assert (net(x, t + 0.3, types) - base).abs().max() > 1e-4
        assert (net(x, t, (types + 1) % 3) - base).abs().max() > 1e-4


def test_reference_size_parameter_count():
    cfg = Graphormer3DConfig.reference_size()
    assert (cfg.layers, cfg.width, cfg.heads, cfg.gaussians) == (12, 768, 32, 128)
    with pytest.raises(ValueError, match="divisible"):
        Graphormer3DConfig(width=30, heads=4)


def test_bond_paths_bias_attention(rng):
    from digfast.systems.graph import UNCONNECTED, shortest_paths

    paths = shortest_paths(5, [(0, 1), (1, 2), (2, 3)])
    assert paths[0, 3] == 3 and paths[3, 0] == 3 and paths[0, 4] == UNCONNECTED and paths[2, 2] == 0
    torch.manual_seed(1)
    net = Graphormer3D(Graphormer3DConfig(n_atom_types=3, layers=1, width=16, heads=2, ffn=16, gaussians=8,
                                          max_path=3)).eval()
    torch.nn.init.normal_(net.path_bias.weight)
    x, t, types = _inputs(rng, 2, 5, 3)
    with torch.no_grad():
        a = net(x, t, types, paths=paths)
        b = net(x, t, types, paths=shortest_paths(5, [(0, 1), (1, 2), (3, 4)]))
        perm = torch.randperm(5, generator=rng)
        torch.testing.assert_close(net(x[:, perm], t, types[perm], paths=paths[perm][:, perm]), a[:, perm], **TOL)
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="paths"):
        net(x, t, types)


def test_float32_input_jacobian_matches_float64(rng):
    """d eps / d x in float32 agrees with float64 (the likelihood's divergence needs it): no
    cancellation noise from the zero-length diagonal of the vector head."""
    net = _net()
    x, t, types = _inputs(rng, 2, 9, 3)
    probe = torch.randn(2, 9, 3, generator=rng)
    grads = []
    for dtype in (torch.float32, torch.float64):
        model = net.to(dtype)
        xi = x.to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad((model(xi, t, types) * probe.to(dtype)).sum(), xi)
        grads.append(g.double())
    net.float()
    err = (grads[0] - grads[1]).abs().max() / grads[1].abs().max()
    assert err < 1e-4, float(err)
