"""Numbers, not just pictures: sample-quality and score-error metrics.

* :func:`mmd` -- maximum mean discrepancy with a sum of RBF kernels (unbiased estimate of MMD^2);
* :func:`sliced_wasserstein` -- the sliced 1-Wasserstein distance;
* :func:`mode_fractions` -- what share of samples each mixture component is responsible for;
* :func:`fisher_divergence` -- ``E ||s - grad log p||^2`` against an exact score.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .contract import ScoreFn, TimeLike
from .losses import explicit_score_matching
from .densities import GaussianMixture

__all__ = ["mmd", "sliced_wasserstein", "mode_fractions", "fisher_divergence"]


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be (N, D) and (M, D) with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("x and y need at least two samples each")
    dt = torch.promote_types(x.dtype, y.dtype)
    return x.to(dt), y.to(device=x.device, dtype=dt)


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0)) -> Tensor:
    """Unbiased MMD^2 between samples ``x`` (N, D) and ``y`` (M, D) with the kernel
    ``k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2))`` over the ``bandwidths`` h.

    Zero in expectation iff the two distributions agree; can be slightly negative by chance.
    """
    x, y = _pair(x, y)
    if len(bandwidths) == 0 or any(h <= 0 for h in bandwidths):
        raise ValueError(f"bandwidths must be positive, got {bandwidths!r}")

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)                                     # (N, M)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return term_x + term_y - 2 * kxy.mean()


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Sliced 1-Wasserstein distance: the mean over random unit directions of the 1-D W1 between projections.

    With unequal sample sizes both projections are compared at common quantile levels.
    """
    x, y = _pair(x, y)
    if not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive integer, got {n_projections!r}")
    d = x.shape[1]
    dirs = torch.randn(d, n_projections, generator=generator, device=x.device, dtype=x.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)                            # (D, P) unit columns
    px, _ = torch.sort(x @ dirs, dim=0)                                      # (N, P)
    py, _ = torch.sort(y @ dirs, dim=0)                                      # (M, P)
    if px.shape[0] != py.shape[0]:
        q = torch.linspace(0, 1, max(px.shape[0], py.shape[0]), device=x.device, dtype=x.dtype)
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return (px - py).abs().mean()


def mode_fractions(samples: Tensor, mixture: GaussianMixture) -> Tensor:
    """Share of ``samples`` (N, D) whose most responsible component is k, for each k; (K,) summing to 1."""
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be (N, D) with N > 0, got {tuple(samples.shape)}")
    k = mixture.responsibilities(samples).argmax(dim=1)                       # (N,)
    return torch.bincount(k, minlength=mixture.n_components).to(samples.dtype) / samples.shape[0]


def fisher_divergence(score: ScoreFn, dist: GaussianMixture, x: Tensor, t: TimeLike = 0.0) -> Tensor:
    """``E_x ||s(x, t) - grad log p(x)||^2`` over the points ``x`` (N, D), against ``dist``'s exact score.

    ``dist`` should be the density the score is meant for at ``t`` (e.g. ``mixture.perturb(sigma)``).
    """
    # twice the explicit score-matching loss, which carries the conventional factor 1/2
    return 2.0 * explicit_score_matching(score, x, dist.score(x), t)


def count_crossings(path: Tensor, low: float, high: float) -> Tensor:
    """Crossings between two cores of a scalar coordinate: ``A = {x <= low}`` and ``B = {x >= high}``.

    ``path`` is (T,) for one chain or (T, N) for N chains, one row per time step. A crossing is
    counted each time a chain enters one core after having last been in the other; excursions into
    the gap ``(low, high)`` that return to the same core do not count. A chain that starts in the gap
    is assigned to the core on its side of ``(low + high) / 2``. Returns crossings per chain, (N,) long.
    """
    if not isinstance(path, Tensor) or path.ndim not in (1, 2) or path.shape[0] < 1:
        got = tuple(path.shape) if isinstance(path, Tensor) else type(path).__name__
        raise ValueError(f"path must be a tensor shaped (T,) or (T, N) with T >= 1, got {got}")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"low and high must be finite with low < high, got low={low!r}, high={high!r}")
    x = path[:, None] if path.ndim == 1 else path                                  # (T, N)
    if torch.isnan(x).any():
        raise ValueError("path contains NaN")
    state = (x >= high).long() - (x <= low).long()                                 # (T, N): +1 in B, -1 in A, 0 between
    start = torch.where(x[0] >= 0.5 * (low + high), 1, -1)                         # (N,) side of the midpoint
    state[0] = torch.where(state[0] == 0, start, state[0])
    # forward-fill: the last core visited, found from the index of the last non-zero state
    steps = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(state)    # (T, N)
    last = torch.cummax(torch.where(state != 0, steps, 0), dim=0).values           # (T, N)
    core = state.gather(0, last)                                                   # (T, N) in {-1, +1}
    return (core[1:] != core[:-1]).sum(0)                                          # (N,)


def mean_crossing_time(path: Tensor, low: float, high: float, dt: float = 1.0) -> tuple[float, int]:
    """Mean time between crossings (see :func:`count_crossings`): total simulated time / number of crossings.

    ``path`` (T, N) holds N chains of T states ``dt`` apart (time units of ``dt``), so the total time is
    ``N (T - 1) dt``. Crossings alternate A -> B and B -> A, so for chains started in equilibrium this
    rate estimator is consistent for the average of the two mean first-passage times (from the edge of
    one core to the other core). Returns ``(tau, n_crossings)``; ``tau`` is ``inf`` when nothing crossed.
    """
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be finite and > 0, got {dt!r}")
    n = int(count_crossings(path, low, high).sum())
    chains = 1 if path.ndim == 1 else path.shape[1]
    total = chains * (path.shape[0] - 1) * dt
    return (total / n if n else math.inf), n


__all__ += ["count_crossings", "mean_crossing_time"]
