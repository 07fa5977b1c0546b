"""Energy-based models in one and two dimensions: unnormalised log-densities and their log Z.

An energy-based model writes a density as ``p(x) = exp(f(x)) / Z`` with
``Z = int exp(f(x)) dx``. Here ``f`` is the *unnormalised log-density* (the negative
energy). In one and two dimensions ``Z`` can still be computed by quadrature on a grid,
which is what this module does; Chapter 4 of the book measures why that stops working
as the dimension grows.

Conventions
-----------
* An energy function ``f`` maps a batch of points to one number per point:
  ``(N,)`` or ``(N, 1)`` -> ``(N,)`` in one dimension, ``(N, D)`` -> ``(N,)`` in ``D``.
  Values are in nats (natural-log units); ``-inf`` is allowed and means ``p = 0`` there.
* Quadrature runs in float64 and sums ``exp(f)`` with ``logsumexp``, so an ``f`` of
  size 1000 neither overflows nor underflows.
* Gradients flow: ``log_partition_1d(f, ...)`` is differentiable with respect to any
  parameters inside ``f`` (used for maximum likelihood in Chapter 3).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .contract import check_positive

__all__ = [
    "EnergyFn",
    "trapezoid_log_weights",
    "box_2d",
    "log_partition_1d",
    "log_partition_2d",
    "sample_1d",
    "quadratic_energy",
    "double_well_energy",
    "MLPEnergy",
]

EnergyFn = Callable[[Tensor], Tensor]
_F64 = torch.float64


# ----------------------------------------------------------------------------------------
# quadrature
# ----------------------------------------------------------------------------------------
def _check_interval(name: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two real numbers (lo, hi), got {lo!r}, {hi!r}") from None
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise ValueError(f"{name} must be finite, got lo={lo!r}, hi={hi!r}")
    if not lo_f < hi_f:
        raise ValueError(f"{name} needs lo < hi, got lo={lo_f}, hi={hi_f}")
    return lo_f, hi_f


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n (number of grid points per axis) must be an integer >= 2, got {n!r}")
    return n


def trapezoid_log_weights(lo: float, hi: float, n: int, device=None) -> tuple[Tensor, Tensor]:
    """Nodes and log-weights of the ``n``-point trapezoid rule on ``[lo, hi]``.

    Returns ``x`` (n,) equally spaced nodes and ``log_w`` (n,) with
    ``w = h * (1/2, 1, ..., 1, 1/2)`` and ``h = (hi - lo) / (n - 1)``, both float64,
    so that ``int g(x) dx ~= sum_i w_i g(x_i)``.
    """
    lo, hi = _check_interval("(lo, hi)", lo, hi)
    n = _check_n(n)
    x = torch.linspace(lo, hi, n, dtype=_F64, device=device)          # (n,)
    h = (hi - lo) / (n - 1)
    log_w = torch.full((n,), math.log(h), dtype=_F64, device=device)  # (n,)
    log_w[0] = log_w[-1] = math.log(h / 2)
    return x, log_w


def _eval_energy(f: EnergyFn, pts: Tensor, dtype: torch.dtype) -> Tensor:
    """Call ``f`` on ``pts`` (N, D), check the output is N finite-or-(-inf) numbers; float64 (N,)."""
    out = f(pts.to(dtype))
    if not isinstance(out, Tensor):
        raise TypeError(f"the energy f must return a tensor, got {type(out).__name__}")
    n = pts.shape[0]
    if out.numel() != n or (out.ndim == 2 and out.shape[1] != 1) or out.ndim > 2:
        raise ValueError(f"the energy f must map {n} points to {n} values (shape ({n},)), "
                         f"got shape {tuple(out.shape)}")
    out = out.reshape(n).to(_F64)
    if torch.isnan(out).any() or (out == math.inf).any():
        raise ValueError("the energy f returned NaN or +inf on the grid; "
                         "f must be finite or -inf (meaning zero density)")
    if (out == -math.inf).all():
        raise ValueError("the energy f is -inf at every grid point: exp(f) has no mass on this grid")
    return out


def log_partition_1d(f: EnergyFn, lo: float, hi: float, n: int = 4001,
                     dtype: torch.dtype = _F64, device=None) -> Tensor:
    """``log Z = log int_lo^hi exp(f(x)) dx`` by the ``n``-point trapezoid rule; a 0-d float64 tensor.

    ``f`` receives the nodes as a column ``(n, 1)`` (cast to ``dtype``, on ``device``) and
    must return ``(n,)`` (or ``(n, 1)``) values in nats; ``-inf`` means zero density.
    The sum is done as ``logsumexp(f(x_i) + log w_i)``, which is exact arithmetic for the
    rule and never overflows. To approximate the integral over the whole real line, pick
    ``[lo, hi]`` wide enough that ``exp(f)`` is negligible outside it: that truncation
    error is not included in the result. For a smooth ``f`` whose ``exp(f)`` has decayed at
    both ends the rule converges faster than any power of the spacing ``h``; otherwise
    its error is ``O(h^2)``.

    Raises ``ValueError`` unless ``lo < hi`` (both finite) and ``n >= 2``.
    """
    x, log_w = trapezoid_log_weights(lo, hi, n, device=device)   # (n,), (n,)
    fx = _eval_energy(f, x[:, None], dtype)                       # (n,)
    return torch.logsumexp(fx + log_w, dim=0)


def sample_1d(f: EnergyFn, n: int, lo: float, hi: float, n_grid: int = 4001,
              generator: torch.Generator | None = None) -> Tensor:
    """``n`` samples of the density ``exp(f) / Z`` restricted to ``[lo, hi]``, by inverting its CDF.

    The CDF is the running trapezoid integral of ``exp(f - max f)`` on ``n_grid`` nodes, normalised
    to end at 1, and is inverted by linear interpolation: within a cell the sampled density is
    constant, so the samples are exact up to the quadrature error ``O(h^2)``. This needs the
    normaliser (the last value of the running integral), which is why it works only in one
    dimension. ``f`` maps nodes ``(n_grid, 1)`` to ``(n_grid,)`` values in nats (``-inf`` allowed).
    Draws ``n`` uniforms from ``generator``; returns float64 ``(n,)``.

    Raises ``ValueError`` unless ``n >= 1``, ``lo < hi`` (both finite) and ``n_grid >= 2``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of samples) must be a positive integer, got {n!r}")
    x, _ = trapezoid_log_weights(lo, hi, n_grid)                       # (G,)
    with torch.no_grad():
        lp = _eval_energy(f, x[:, None], _F64)                          # (G,)
    dens = torch.exp(lp - lp.max())                                     # (G,) unnormalised, max 1
    h = x[1] - x[0]
    cdf = torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(0.5 * (dens[1:] + dens[:-1]) * h, 0)])
    cdf = cdf / cdf[-1]                                                 # (G,) from 0 to 1
    u = torch.rand(n, generator=generator, dtype=_F64)                  # (n,) uniform
    j = torch.searchsorted(cdf, u).clamp(1, n_grid - 1)                 # cdf[j-1] <= u <= cdf[j]
    width = (cdf[j] - cdf[j - 1]).clamp_min(torch.finfo(_F64).tiny)
    return x[j - 1] + (u - cdf[j - 1]) / width * h                      # (n,)


def box_2d(lim) -> tuple[tuple[float, float], tuple[float, float]]:
    """``L`` -> [-L, L]^2; ``(lo, hi)`` -> [lo, hi]^2; ``((x0, x1), (y0, y1))`` -> a rectangle."""
    if isinstance(lim, (int, float)) and not isinstance(lim, bool):
        if not (math.isfinite(lim) and lim > 0):
            raise ValueError(f"lim as a single number is the half-width L > 0 of [-L, L]^2, got {lim!r}")
        return (-float(lim), float(lim)), (-float(lim), float(lim))
    if isinstance(lim, Sequence) and len(lim) == 2:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lim):
            box = _check_interval("lim", lim[0], lim[1])
            return box, box
        if all(isinstance(v, Sequence) and len(v) == 2 for v in lim):
            return (_check_interval("lim[0] (x-range)", *lim[0]),
                    _check_interval("lim[1] (y-range)", *lim[1]))
    raise ValueError("lim must be a half-width L, a pair (lo, hi), or ((x0, x1), (y0, y1)); "
                     f"got {lim!r}")


def log_partition_2d(f: EnergyFn, lim=6.0, n: int = 301,
                     dtype: torch.dtype = _F64, device=None) -> Tensor:
    """``log Z = log iint exp(f(x)) dx`` over a rectangle by the tensor-product trapezoid rule.

    ``lim`` is a half-width ``L`` (the square ``[-L, L]^2``), a pair ``(lo, hi)`` (the square
    ``[lo, hi]^2``) or ``((x0, x1), (y0, y1))``. ``f`` maps points ``(n*n, 2)`` to ``(n*n,)``.
    The grid has ``n`` points per axis, so the cost is ``n^2`` evaluations of ``f``: the
    price of quadrature in ``D`` dimensions is ``n^D``. Returns a 0-d float64 tensor.
    """
    (x0, x1), (y0, y1) = box_2d(lim)
    gx, lwx = trapezoid_log_weights(x0, x1, n, device=device)     # (n,), (n,)
    gy, lwy = trapezoid_log_weights(y0, y1, n, device=device)     # (n,), (n,)
    X, Y = torch.meshgrid(gx, gy, indexing="ij")                  # (n, n) each
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1)      # (n*n, 2)
    log_w = (lwx[:, None] + lwy[None, :]).reshape(-1)             # (n*n,)
    fx = _eval_energy(f, pts, dtype)                              # (n*n,)
    return torch.logsumexp(fx + log_w, dim=0)


# ----------------------------------------------------------------------------------------
# energies
# ----------------------------------------------------------------------------------------
def _as_points(x: Tensor, d: int) -> Tensor:
    """Accept (N,) when d == 1, or (N, d); return (N, d)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.ndim == 1 and d == 1:
        return x[:, None]
    if x.ndim != 2 or x.shape[1] != d:
        expected = "(N,) or (N, 1)" if d == 1 else f"(N, {d})"
        raise ValueError(f"x must have shape {expected}, got {tuple(x.shape)}")
    return x


def quadratic_energy(mu=0.0, sigma=1.0) -> EnergyFn:
    """``f(x) = -||x - mu||^2 / (2 sigma^2)`` (summed over coordinates for per-axis ``sigma``).

    ``exp(f)`` is an unnormalised Gaussian ``N(mu, diag(sigma^2))`` with
    ``Z = prod_d sigma_d sqrt(2 pi)``. ``mu`` is a number (one dimension) or a (D,) vector;
    ``sigma`` a positive number or a (D,) vector of positive standard deviations. Tensors
    with ``requires_grad`` are used as they are, so gradients reach them.
    """
    mu_t = mu if isinstance(mu, Tensor) else torch.as_tensor(mu, dtype=_F64)
    sig_t = sigma if isinstance(sigma, Tensor) else torch.as_tensor(sigma, dtype=_F64)
    if not torch.isfinite(mu_t.detach()).all():
        raise ValueError(f"mu must be finite, got {mu!r}")
    check_positive("sigma", sig_t.detach())
    if mu_t.ndim > 1 or sig_t.ndim > 1:
        raise ValueError("mu and sigma must be numbers or (D,) vectors")
    d = max(mu_t.numel() if mu_t.ndim == 1 else 1, sig_t.numel() if sig_t.ndim == 1 else 1)
    for name, v in (("mu", mu_t), ("sigma", sig_t)):
        if v.ndim == 1 and v.numel() not in (1, d):
            raise ValueError(f"{name} has {v.numel()} entries but the dimension is {d}")

    def f(x: Tensor) -> Tensor:
        x = _as_points(x, d)                                      # (N, D)
        z = (x - mu_t.to(x.device)) / sig_t.to(x.device)          # (N, D)
        return -0.5 * (z ** 2).sum(dim=1)                         # (N,)

    f.dim = d  # type: ignore[attr-defined]
    return f


def double_well_energy(a: float = 1.0, b: float = 1.0, tilt: float = 0.0) -> EnergyFn:
    """The 1-D double well ``f(x) = -a (x^2 - b^2)^2 + tilt * x``.

    With ``tilt = 0`` the density ``exp(f)/Z`` has two modes at ``x = +-b`` and a dip at
    ``x = 0`` where it is ``exp(-a b^4)`` times smaller than at the modes: ``a b^4`` is the
    barrier height in nats. ``tilt`` favours the right well (``> 0``) or the left (``< 0``).
    The quartic term makes ``exp(f)`` integrable for every ``a > 0``.
    Accepts ``x`` of shape (N,) or (N, 1); returns (N,).
    """
    for name, v in (("a", a), ("b", b)):
        if isinstance(v, Tensor):
            check_positive(name, v.detach())
        else:
            check_positive(name, v)
    if not isinstance(tilt, Tensor) and not math.isfinite(float(tilt)):
        raise ValueError(f"tilt must be finite, got {tilt!r}")

    def f(x: Tensor) -> Tensor:
        x = _as_points(x, 1)[:, 0]                                # (N,)
        return -a * (x ** 2 - b ** 2) ** 2 + tilt * x             # (N,)

    f.dim = 1  # type: ignore[attr-defined]
    return f


class MLPEnergy(nn.Module):
    """A small neural energy ``f_theta(x) = g_theta(x) - confine * ||x||^2 / 2``.

    ``g_theta`` is an MLP with ``tanh`` hidden layers and a linear scalar output, so it is
    bounded: ``|g_theta(x)| <= B = sum_j |w_j| + |b|`` over the output layer's weights and
    bias (see :meth:`output_bound`). The Gaussian term then makes ``exp(f_theta)`` integrable
    for every ``confine > 0``, with
    ``e^{-B} sqrt(2 pi / confine)^D <= Z_theta <= e^{B} sqrt(2 pi / confine)^D``.
    With ``confine = 0`` nothing guarantees ``Z_theta < inf``.

    Args:
        dim: input dimension D. hidden: width. depth: number of hidden layers.
        confine: precision of the Gaussian envelope (>= 0).
    Input (N, D) (or (N,) when D = 1); output (N,).
    """

    def __init__(self, dim: int = 1, hidden: int = 32, depth: int = 2, confine: float = 0.5):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (math.isfinite(confine) and confine >= 0):
            raise ValueError(f"confine must be finite and >= 0, got {confine!r}")
        self.dim, self.confine = dim, float(confine)
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_points(x, self.dim)                               # (N, D)
        x = x.to(self.head.weight.dtype)
        g = self.head(self.body(x))[:, 0]                         # (N,)
        return g - 0.5 * self.confine * (x ** 2).sum(dim=1)       # (N,)

    def output_bound(self) -> float:
        """``B = sum_j |w_j| + |b|`` for the output layer: ``|g_theta(x)| <= B`` for all x."""
        with torch.no_grad():
            return float(self.head.weight.abs().sum() + self.head.bias.abs().sum())
