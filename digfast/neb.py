"""Minimum-energy paths by the zero-temperature string method, for checking reaction paths.

The string (images from start to end, both fixed) descends the energy image by image and is
then redistributed to equal arc length (E, Ren and Vanden-Eijnden 2007, simplified string):
it converges to the minimum-energy path, and its highest point to the highest saddle on it
(refined between images by a climbing step along the path). energy_fn(x (M, N, d)) -> (M,),
differentiable with torch autograd, float64.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class MinimumEnergyPath:
    images: torch.Tensor     # (M, N, d) from start to end
    energies: torch.Tensor   # (M,)
    saddle: torch.Tensor     # (N, d) the highest point on the path
    saddle_energy: float
    iterations: int
    max_change: float        # largest image move in the last iteration (convergence)

    @property
    def barrier(self) -> float:
        """Saddle energy minus the start's."""
        return self.saddle_energy - float(self.energies[0])


def align(x: torch.Tensor, ref: torch.Tensor, permute: bool = True) -> torch.Tensor:
    """x (N, d) rotated (reflections allowed), and for identical particles permuted, onto ref
    by least RMSD: the copy of x nearest ref, so a path between them has no spurious swaps."""
    x, ref = x - x.mean(0), ref - ref.mean(0)
    perms = itertools.permutations(range(x.shape[0])) if permute else [tuple(range(x.shape[0]))]
    best, best_err = None, float("inf")
    for p in perms:
        xp = x[list(p)]
        u, _, vt = torch.linalg.svd(xp.T @ ref)
        y = xp @ (u @ vt)
        err = float((y - ref).pow(2).sum())
        if err < best_err:
            best, best_err = y, err
    return best


def _gradient(energy_fn, x):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy_fn(x)
        (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), g


def redistribute(x: torch.Tensor) -> torch.Tensor:
    """Images at equal arc length along the piecewise-linear path through x (M, N, d)."""
    gaps = (x[1:] - x[:-1]).flatten(1).norm(dim=1)
    s = torch.cat([gaps.new_zeros(1), gaps.cumsum(0)])
    target = torch.linspace(0, float(s[-1]), x.shape[0], dtype=x.dtype)
    k = torch.searchsorted(s, target, right=True).clamp(1, x.shape[0] - 1)
    frac = ((target - s[k - 1]) / (s[k] - s[k - 1]).clamp_min(1e-300))[:, None, None]
    return x[k - 1] + frac * (x[k] - x[k - 1])


def string_method(energy_fn, start: torch.Tensor, end: torch.Tensor, n_images: int = 33, step: float = 1e-3,
                  max_step: float = 0.02, max_iter: int = 4000, tol: float = 1e-6) -> MinimumEnergyPath:
    """The minimum-energy path from start to end (N, d) (align them first for identical particles)."""
    if n_images < 3:
        raise ValueError(f"need at least 3 images, got {n_images}")
    s = torch.linspace(0, 1, n_images, dtype=torch.float64)[:, None, None]
    x = (1 - s) * start.double() + s * end.double()
    change, it = float("inf"), 0
    for it in range(1, max_iter + 1):
        _, g = _gradient(energy_fn, x)
        move = -step * g[1:-1]
        # cap each image's move: steep walls must not throw an image across the landscape
        norms = move.flatten(1).norm(dim=1)[:, None, None]
        move = move * (max_step / norms).clamp(max=1.0)
        new = x.clone()
        new[1:-1] = x[1:-1] + move
        new = redistribute(new)
        change = float((new - x).flatten(1).norm(dim=1).max())
        x = new
        if change < tol:
            break
    e, _ = _gradient(energy_fn, x)
    saddle, e_saddle = _climb(energy_fn, x, e)
    return MinimumEnergyPath(x, e, saddle, e_saddle, it, change)


def _climb(energy_fn, x, e, iters: int = 200):
    """Maximise the energy along the path between the top image's neighbours (golden section on
    the two segments), then take the larger: the saddle to second order in the image spacing."""
    k = int(torch.argmax(e[1:-1])) + 1
    best_x, best_e = x[k], float(e[k])
    for a, b in ((x[k - 1], x[k]), (x[k], x[k + 1])):
        lo, hi = 0.0, 1.0
        for _ in range(iters // 4):
            m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
            e1, e2 = (float(energy_fn(((1 - m) * a + m * b)[None])[0]) for m in (m1, m2))
            lo, hi = (m1, hi) if e1 < e2 else (lo, m2)
        y = (1 - 0.5 * (lo + hi)) * a + 0.5 * (lo + hi) * b
        ey = float(energy_fn(y[None])[0])
        if ey > best_e:
            best_x, best_e = y, ey
    return best_x, best_e
