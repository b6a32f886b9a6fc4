"""Reaction paths through the latent space, checked against a string-method saddle."""
import pytest
import torch

import digfast
from digfast.neb import align, string_method
from digfast.paths import interpolate, reaction_path


def dw4_minimum(system, x0):
    x = x0.double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        e = system.energy(x[None]).sum()
        e.backward()
        return e
    opt.step(closure)
    return x.detach()


@pytest.fixture(scope="module")
def dw4_states():
    """The two DW-4 states (2 short + 4 long pairs, and 4 short + 2 long), aligned."""
    model = digfast.load("dw4")
    s = model.system
    ref = s.reference_samples(40, seed=0)
    minima = [dw4_minimum(s, x) for x in ref]
    e = s.energy(torch.stack(minima))
    a = minima[int(torch.argmin(e))]  # global minimum
    short = [int((torch.cdist(m[None], m[None])[0] < 3.5).sum() - 4) // 2 for m in minima]
    b = [m for m, n in zip(minima, short) if n == 4][0]
    b = align(b, a)
    return model, a, b, string_method(model.system.energy, a, b)


def test_string_method_finds_a_first_order_saddle(dw4_states):
    model, a, b, mep = dw4_states
    assert mep.max_change < 1e-5
    hess = torch.autograd.functional.hessian(lambda y: model.system.energy(y.reshape(1, 4, 2)).sum(),
                                             mep.saddle.reshape(-1))
    eig = torch.linalg.eigvalsh(hess)
    # one unstable direction, three zero modes (2 translations, 1 rotation), four stable ones
    assert eig[0] < -1.0 and eig[1:4].abs().max() < 0.05 and eig[4] > 1.0, eig
    assert mep.saddle_energy > float(mep.energies.max()) - 1e-9


def test_latent_path_crosses_the_barrier_near_the_saddle(dw4_states):
    model, a, b, mep = dw4_states
    path = reaction_path(model, start=a, end=b, n_points=16, interpolation="linear", steps=50, max_gap=0.15,
                         max_rounds=5)
    assert max(path.metadata["round_trip_error"]) < 0.05  # the ODE maps the ends back
    assert torch.isfinite(path.energies).all()
    # the path is continuous, so it cannot pass below the saddle; the bound: 2 kT above
    assert mep.saddle_energy - 0.5 < path.highest < mep.saddle_energy + 2.0, (path.highest, mep.saddle_energy)


def test_spherical_interpolation_keeps_the_norm(rng):
    z0, z1 = torch.randn(5, 3, generator=rng), 2 * torch.randn(5, 3, generator=rng)
    f = torch.linspace(0, 1, 7, dtype=torch.float64)
    z = interpolate(z0, z1, f, "spherical")
    assert torch.allclose(z[0], z0, atol=1e-6) and torch.allclose(z[-1], z1, atol=1e-6)
    norms = z.flatten(1).norm(dim=1)
    assert torch.allclose(norms, (1 - f.float()) * z0.norm() + f.float() * z1.norm(), atol=1e-5)
    assert (interpolate(z0, z1, f, "linear").flatten(1).norm(dim=1)[3] < norms[3])
    with pytest.raises(ValueError, match="interpolation"):
        interpolate(z0, z1, f, "cubic")


def test_mixture_path_round_trip_and_output(tmp_path, mixture):
    model = digfast.load("mixture")
    a, b = mixture.means[0].float(), mixture.means[1].float()
    path = reaction_path(model, start=a, end=b, n_points=5, steps=50)
    assert max(path.metadata["round_trip_error"]) < 1e-2
    assert path.positions.shape == (5, 4, 3) and path.energies.shape == (5,)
    assert path.to_mdtraj().n_frames == 5
    assert path.plot(tmp_path / "p.png").exists()
