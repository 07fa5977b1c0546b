"""Estimating the partition function ``Z = integral of exp(f(x)) dx`` in D dimensions.

Chapter 4 of the book measures why this is hard. Three estimators live here:

* :func:`grid_log_partition`: tensor-product quadrature (midpoint or trapezoid rule) on a
  box; exact to many digits in low D, but it needs ``n_per_axis ** dim`` evaluations of ``f``;
* :func:`mc_log_partition`: naive Monte Carlo with points drawn uniformly in the box;
* :func:`importance_log_partition`: importance sampling from a normalised proposal ``q``.

Every ``f`` maps points (B, D) to log-unnormalised densities (B,) (for an energy-based
model, ``f = -E``). All results are natural logarithms (nats), computed in float64 with
log-sum-exp so that neither ``exp(f)`` nor the weights overflow. The Monte Carlo estimators
return a :class:`ZEstimate` that also carries the estimator's *self-reported* relative
standard error and its effective sample size, so that the chapter can compare them with
the truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .energy import trapezoid_log_weights

__all__ = [
    "LogDensityFn",
    "Proposal",
    "ZEstimate",
    "box_limits",
    "grid_log_partition",
    "mc_log_partition",
    "importance_log_partition",
    "gaussian_log_partition",
]

LogDensityFn = Callable[[Tensor], Tensor]  #: f: (B, D) -> (B,), an unnormalised log-density
_F64 = torch.float64


class Proposal(Protocol):
    """A normalised proposal density ``q``: what :func:`importance_log_partition` needs.

    :class:`scorebook.densities.Gaussian` and :class:`~scorebook.densities.GaussianMixture` fulfil it.
    """

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...  # (n, D)

    def log_prob(self, x: Tensor) -> Tensor: ...  # (n, D) -> (n,), normalised, in nats


@dataclass(frozen=True)
class ZEstimate:
    """A Monte Carlo estimate of ``log Z``.

    Attributes:
        log_z: the estimate ``log Z_hat`` in nats, where ``Z_hat = mean_i w_i`` and
            ``w_i = exp(f(x_i)) / q(x_i)`` are the importance weights.
        rel_se: the estimator's own estimate of ``std(Z_hat) / Z``, from the sample
            variance of the weights. When the weights are heavy tailed it is itself
            unreliable (it tends to be far too small): Chapter 4 measures this.
        ess: effective sample size ``(sum w)^2 / sum w^2``, between 1 and ``n``.
        n: number of samples used.
    """

    log_z: float
    rel_se: float
    ess: float
    n: int


def box_limits(lim: float | tuple[float, float]) -> tuple[float, float]:
    """Read a box ``[lo, hi]`` per axis from ``lim`` (a number ``L`` means ``[-L, L]``)."""
    if isinstance(lim, (int, float)) and not isinstance(lim, bool):
        lo, hi = -float(lim), float(lim)
    elif isinstance(lim, (tuple, list)) and len(lim) == 2:
        lo, hi = float(lim[0]), float(lim[1])
    else:
        raise ValueError(f"lim must be a positive number L (box [-L, L]) or a pair (lo, hi), got {lim!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"lim must describe a finite interval with lo < hi, got ({lo}, {hi})")
    return lo, hi


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _eval_f(f: LogDensityFn, x: Tensor) -> Tensor:
    """Call ``f`` on (B, D) points, check it returns (B,), and cast to float64."""
    out = f(x)
    if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"f must map points of shape (B, D) to log-densities of shape (B,), got {got}")
    out = out.to(_F64)
    if torch.isnan(out).any() or (out == math.inf).any():
        raise ValueError("f returned NaN or +inf; an unnormalised log-density must be finite or -inf")
    return out


def grid_log_partition(f: LogDensityFn, dim: int, lim: float | tuple[float, float], n_per_axis: int,
                       rule: str = "trapezoid", chunk_size: int = 2 ** 16,
                       device: torch.device | str | None = None) -> Tensor:
    """``log Z`` by tensor-product quadrature on the box ``[lo, hi]^dim``: a 0-d float64 tensor (nats).

    The grid has ``n_per_axis ** dim`` nodes; they are generated ``chunk_size`` at a time
    from their flat index, so memory stays at ``O(chunk_size * dim)`` however large the grid.
    The cost, ``n_per_axis ** dim`` evaluations of ``f``, grows exponentially with ``dim``.

    Args:
        f: unnormalised log-density, (B, dim) -> (B,).
        dim: dimension D >= 1.
        lim: ``L`` for the box ``[-L, L]`` on every axis, or a pair ``(lo, hi)``.
        n_per_axis: nodes per axis (>= 2 for the trapezoid rule, >= 1 for the midpoint rule).
        rule: ``"trapezoid"`` (nodes include the end points, end weights halved) or
            ``"midpoint"`` (nodes at the centres of ``n_per_axis`` equal cells).
        chunk_size: nodes evaluated per call of ``f``.
        device: where the nodes are built (default: CPU). ``f`` must accept them there.

    The result is differentiable with respect to parameters inside ``f``.
    """
    dim = _check_int("dim", dim, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    lo, hi = box_limits(lim)
    if rule == "trapezoid":
        n = _check_int("n_per_axis", n_per_axis, 2)
        nodes, log_w = trapezoid_log_weights(lo, hi, n, device=device)            # (n,), (n,)
    elif rule == "midpoint":
        n = _check_int("n_per_axis", n_per_axis, 1)
        h = (hi - lo) / n
        nodes = lo + h * (torch.arange(n, dtype=_F64, device=device) + 0.5)   # (n,)
        log_w = torch.full((n,), math.log(h), dtype=_F64, device=device)      # (n,)
    else:
        raise ValueError(f"rule must be 'trapezoid' or 'midpoint', got {rule!r}")
    total = n ** dim
    acc = None
    for start in range(0, total, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, total), device=nodes.device)  # (B,)
        idx = torch.empty(flat.shape[0], dim, dtype=torch.long, device=nodes.device)     # (B, D)
        rest = flat
        for d in range(dim - 1, -1, -1):  # unravel the flat index, last axis fastest
            idx[:, d] = rest % n
            rest = rest // n
        x = nodes[idx]                                                           # (B, D)
        terms = _eval_f(f, x) + log_w[idx].sum(dim=1)                            # (B,)
        part = torch.logsumexp(terms, dim=0)
        acc = part if acc is None else torch.logaddexp(acc, part)
    return acc


def _estimate_from_log_weights(log_w: Tensor) -> ZEstimate:
    """Turn log importance weights (n,) into a :class:`ZEstimate`."""
    n = log_w.shape[0]
    log_s1 = torch.logsumexp(log_w, dim=0)          # log sum w
    log_s2 = torch.logsumexp(2 * log_w, dim=0)      # log sum w^2
    if not torch.isfinite(log_s1):
        # every weight is zero (all samples where exp(f) underflows): Z_hat = 0
        return ZEstimate(log_z=-math.inf, rel_se=math.inf, ess=0.0, n=n)
    ess = float(torch.exp(2 * log_s1 - log_s2))
    # relative variance of the mean: (m2 / m1^2 - 1) / (n - 1) with m_k = S_k / n
    rel_var = max(n / ess - 1.0, 0.0) / max(n - 1, 1)
    return ZEstimate(log_z=float(log_s1 - math.log(n)), rel_se=math.sqrt(rel_var), ess=ess, n=n)


def mc_log_partition(f: LogDensityFn, dim: int, n: int, lim: float | tuple[float, float],
                     generator: torch.Generator | None = None, batch_size: int = 2 ** 16,
                     device: torch.device | str | None = None) -> ZEstimate:
    """Naive Monte Carlo: ``Z_hat = V * mean_i exp(f(x_i))`` with ``x_i`` uniform in the box ``[lo, hi]^dim``.

    ``V = (hi - lo)^dim`` is the box volume. It estimates the integral over the box only; mass
    outside the box is missed (a bias that the caller controls through ``lim``).
    Samples are drawn ``batch_size`` at a time, so memory stays bounded for large ``n``.
    """
    dim = _check_int("dim", dim, 1)
    n = _check_int("n", n, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    lo, hi = box_limits(lim)
    log_vol = dim * math.log(hi - lo)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    parts = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        u = torch.rand(b, dim, generator=generator, dtype=_F64, device=device)  # (b, D) in [0, 1)
        x = lo + (hi - lo) * u                                                  # (b, D) uniform in the box
        parts.append(_eval_f(f, x) + log_vol)  # log w = f(x) - log q(x), q = 1 / V
    return _estimate_from_log_weights(torch.cat(parts))


def importance_log_partition(f: LogDensityFn, proposal: Proposal, n: int,
                             generator: torch.Generator | None = None) -> ZEstimate:
    """Importance sampling: ``Z_hat = mean_i exp(f(x_i)) / q(x_i)`` with ``x_i ~ q`` (the proposal).

    Unbiased for ``Z`` whenever ``q > 0`` wherever ``exp(f) > 0``; its variance is finite only
    if ``integral exp(2 f) / q`` is finite, which fails when ``q`` has lighter tails than ``exp(f)``.
    """
    n = _check_int("n", n, 2)
    if not (hasattr(proposal, "sample") and hasattr(proposal, "log_prob")):
        raise ValueError("proposal must have .sample(n, generator) and .log_prob(x) (e.g. scorebook.densities.Gaussian)")
    x = proposal.sample(n, generator=generator)                                   # (n, D)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"proposal.sample(n) must return shape (n, D) = ({n}, D), got {tuple(x.shape)}")
    log_q = proposal.log_prob(x).to(_F64)                                          # (n,)
    return _estimate_from_log_weights(_eval_f(f, x) - log_q)


def gaussian_log_partition(cov: Tensor) -> float:
    """Closed form ``log Z`` of ``f(x) = -1/2 (x - m)^T cov^{-1} (x - m)``: ``D/2 log(2 pi) + 1/2 log det cov``.

    The oracle against which the estimators above are tested. ``cov`` is (D, D) positive definite.
    """
    c = torch.as_tensor(cov, dtype=_F64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cov must be a square (D, D) matrix, got shape {tuple(c.shape)}")
    sign, logdet = torch.linalg.slogdet(c)
    if sign <= 0 or not torch.isfinite(logdet) or bool((torch.linalg.eigvalsh(c) <= 0).any()):
        raise ValueError("cov must be symmetric positive definite")
    d = c.shape[0]
    return 0.5 * d * math.log(2 * math.pi) + 0.5 * float(logdet)
