"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, App. D.2).

Along the ODE ``dx/dt = v(x, t) = f(x, t) - g(t)^2 s(x, t) / 2`` the log-density obeys the
instantaneous change of variables (Chen et al. 2018):

    d/dt log p_t(x(t)) = -div_x v(x(t), t),

so, integrating from ``eps`` up to ``T``,

    log p_eps(x) = log p_T(x(T)) + int_eps^T div_x v(x(t), t) dt.

The divergence is computed exactly (``D`` backward passes) or by Hutchinson's unbiased
estimator ``E_e[e^T (dv/dx) e]`` with probes held fixed along one solve (Grathwohl et al. 2019).
All log-likelihoods are in nats unless the name says bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .contract import ScoreFn, check_finite, check_positive
from .losses import jacobian_trace
from .samplers import ADAPTIVE_SOLVERS
from .sde import SDE

__all__ = [
    "LikelihoodResult",
    "log_likelihood",
    "exact_divergence",
    "hutchinson_divergence",
    "dequantize",
    "discrete_bpd",
]

VectorField = Callable[[Tensor], Tensor]

#: torchdiffeq's fixed-grid solvers: they take ``n_steps`` equal steps, and must be told how many
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
#: torchdiffeq's solvers with error control (``rtol``/``atol``)
ADAPTIVE_METHODS = ADAPTIVE_SOLVERS + ("fehlberg2",)


@dataclass
class LikelihoodResult:
    """Per-sample log-likelihood of a continuous density.

    nats: (B,) ``log p(x)`` in nats.  bpd: (B,) ``-log p(x) / (D ln 2)``, bits per dimension.
    nfe: number of ODE right-hand-side evaluations.
    """

    nats: Tensor
    bpd: Tensor
    nfe: int


def exact_divergence(fn: VectorField, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(div fn(x), fn(x))`` per sample, exactly, with one backward pass per dimension; (B,), (B, ...).

    The same computation as the Jacobian trace of implicit score matching
    (:func:`scorebook.losses.jacobian_trace`), without keeping the graph.
    """
    with torch.enable_grad():
        div, out = jacobian_trace(lambda y, _t: fn(y), x, 0.0, create_graph=False)
    return div.detach(), out.detach()


def hutchinson_divergence(fn: VectorField, x: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate ``mean_m e_m^T (d fn/dx) e_m`` (unbiased when ``E[e e^T] = I``).

    probes: (M, B, ...) probe vectors. Returns the estimate (B,) and fn(x) (B, ...).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        est = torch.zeros(x.shape[0], dtype=out.dtype, device=x.device)
        for e in probes:
            (vjp,) = torch.autograd.grad((out * e).sum(), x, retain_graph=True)   # e^T (d fn/dx)
            est = est + (vjp * e).reshape(x.shape[0], -1).sum(1)
    return (est / probes.shape[0]).detach(), out.detach()


def log_likelihood(sde: SDE, score: ScoreFn, x: Tensor, trace: str = "exact", rtol: float = 1e-5,
                   atol: float = 1e-5, eps: float = 1e-5, n_probes: int = 1, probe: str = "rademacher",
                   method: str = "dopri5", generator: torch.Generator | None = None,
                   prior_log_prob: Callable[[Tensor], Tensor] | None = None,
                   n_steps: int | None = None) -> LikelihoodResult:
    """``log p_eps(x)`` under the probability-flow ODE of ``sde`` and ``score``, per sample, in nats.

    Args:
        trace: ``"exact"`` (D backward passes per evaluation) or ``"hutchinson"`` (``n_probes``
            ``probe`` vectors, Rademacher or Gaussian, fixed along the solve).
        rtol, atol, method: passed to the torchdiffeq solver. ``method`` is adaptive (``ADAPTIVE_METHODS``,
            default ``"dopri5"``, with ``rtol``/``atol``) or fixed-step (``FIXED_STEP_METHODS``, such as
            ``"euler"`` or ``"rk4"``), which then needs ``n_steps``.
        n_steps: number of equal steps from ``eps`` to ``T`` for a fixed-step ``method``; required there
            (without it torchdiffeq would take a single step over the whole interval), refused otherwise.
        eps: the ODE starts at ``t = eps`` (the density of ``x_eps``, close to the data for small eps).
        prior_log_prob: ``log p_T`` used at the end of the solve; defaults to ``sde.prior_log_prob``.
            Passing the exact marginal at ``T`` (known for a Gaussian mixture) removes the
            prior-mismatch error, leaving only solver error.
    """
    from torchdiffeq import odeint

    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError("x must be a batch tensor shaped (B, ...)")
    check_finite("x", x)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    sde.check_eps(eps)
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    if method in FIXED_STEP_METHODS:
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
            raise ValueError(f"method={method!r} is fixed-step: pass n_steps, a positive integer number of steps "
                             f"from eps to T, got n_steps={n_steps!r}")
    elif method in ADAPTIVE_METHODS:
        if n_steps is not None:
            raise ValueError(f"n_steps applies to the fixed-step methods {FIXED_STEP_METHODS}; method={method!r} "
                             "chooses its own steps from rtol and atol")
    else:
        raise ValueError(f"method must be one of {ADAPTIVE_METHODS + FIXED_STEP_METHODS}, got {method!r}")
    probes = None
    if trace == "hutchinson":
        if not isinstance(n_probes, int) or n_probes < 1:
            raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
        shape = (n_probes, *x.shape)
        if probe == "rademacher":
            probes = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        elif probe == "gaussian":
            probes = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")

    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        y, _ = state                                                       # (B, ...), (B,)
        # the solver's first-step heuristic may probe past T; the field is only used inside [eps, T]
        t = t.clamp(eps, sde.T)
        field = lambda z: sde.ode_drift(score, z, t)                       # noqa: E731
        if probes is None:
            div, v = exact_divergence(field, y)
        else:
            div, v = hutchinson_divergence(field, y, probes)
        return v, div                                                      # d/dt of (x, accumulated divergence)

    ts = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
    delta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if method in FIXED_STEP_METHODS:  # n_steps equal steps on [eps, T]
        options = {"grid_constructor": lambda *_: torch.linspace(eps, sde.T, n_steps + 1, dtype=x.dtype,
                                                                 device=x.device)}
    else:
        options = {"step_t": ts} if method in ADAPTIVE_SOLVERS else None
    with torch.no_grad():
        xs, deltas = odeint(rhs, (x.detach(), delta0), ts, rtol=rtol, atol=atol, method=method, options=options)
    x_T, delta_T = xs[-1], deltas[-1]
    log_p_T = sde.prior_log_prob(x_T) if prior_log_prob is None else prior_log_prob(x_T)
    nats = log_p_T + delta_T                                                # (B,)
    dim = x[0].numel()
    return LikelihoodResult(nats=nats, bpd=-nats / (dim * math.log(2.0)), nfe=nfe)


def dequantize(x_int: Tensor, n_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization: integers in ``{0, ..., n_levels-1}`` -> ``(x + u) / n_levels`` in ``[0, 1)``.

    A continuous density ``p`` on the result gives the discrete data a log-likelihood lower bound
    (Theis et al. 2016): ``log P(x) >= E_u[log p((x+u)/K)] - D log K`` with ``K = n_levels``.

    The noise ``u`` is drawn on the generator's device when a generator is given (so a data
    pipeline gives the same numbers whatever device the data sit on), else on ``x_int``'s device;
    the result is on ``x_int``'s device, shaped like it, in the default float dtype for integer input.
    """
    if not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
    xi = torch.as_tensor(x_int)
    if xi.is_floating_point() and not torch.equal(xi, xi.round()):
        raise ValueError("dequantize expects integer-valued data")
    if (xi < 0).any() or (xi > n_levels - 1).any():
        raise ValueError(f"data must lie in {{0, ..., {n_levels - 1}}}, got range "
                         f"[{float(xi.min())}, {float(xi.max())}]")
    xf = xi.to(torch.get_default_dtype()) if not xi.is_floating_point() else xi
    noise_device = generator.device if generator is not None else xf.device
    u = torch.rand(xf.shape, generator=generator, device=noise_device, dtype=xf.dtype).to(xf.device)
    return (xf + u) / n_levels


def discrete_bpd(log_prob: Tensor, dim: int, n_levels: int, scale: float = 1.0) -> Tensor:
    """Bits per dimension of discrete data from a continuous model's log-density (nats).

    The model density is on ``z = scale * y + shift`` where ``y = (x + u) / n_levels`` is the
    dequantized data in ``[0, 1)``. Changing variables, ``log p_Y(y) = log p_Z(z) + D log(scale)``;
    the offset for the bin width ``1/n_levels`` then gives

        bpd = -(log p_Z(z) + D log(scale) - D log(n_levels)) / (D ln 2).

    (Use ``scale=2`` for data mapped to ``[-1, 1]``.)
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2, got {n_levels!r}")
    check_positive("scale", scale)
    nats_y = log_prob + dim * math.log(scale)
    return -(nats_y - dim * math.log(n_levels)) / (dim * math.log(2.0))


__all__ += ["prior_kl"]


def prior_kl(dist, sde: SDE) -> float:
    """``KL(p_T || prior)`` in nats: how far the SDE's prior is from the true law at ``T`` of data ``dist``.

    ``dist`` is a Gaussian mixture in 1 or 2 dimensions, whose marginal ``p_T`` is again a mixture.
    ``KL = E_{p_T}[log p_T] - E_{p_T}[log prior]``: the cross-entropy term is closed form (it needs
    only the mean and second moment of ``p_T``, :func:`~scorebook.densities.gaussian_cross_entropy`);
    the entropy of ``p_T`` is a mixture's entropy, which has no closed form and is computed by
    quadrature (:func:`~scorebook.densities.mixture_entropy`).
    """
    from .densities import GaussianMixture, gaussian_cross_entropy, mixture_entropy

    if not isinstance(dist, GaussianMixture):
        raise TypeError(f"dist must be a Gaussian or GaussianMixture, got {type(dist).__name__}")
    p_T = dist.marginal(sde, sde.T)
    return gaussian_cross_entropy(p_T, 0.0, sde.prior_std) - mixture_entropy(p_T)
