"""Samplers that need nothing but a score: each reads like the algorithm in its paper.

Every sampler takes a score callable (:mod:`scorebook.contract`), so a trained network and an
exact oracle plug in alike. Each returns the final samples, shaped like the start ``x``; with
``return_trajectory=True`` it returns ``(x, trajectory)`` where ``trajectory`` is
``(n_saved, B, *shape)`` and starts with the initial state. ``progress=None`` shows a tqdm bar
on long runs in a terminal; pass ``True``/``False`` to force it.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from .contract import ScoreFn, TimeLike, check_finite, check_positive, evaluate_score
from .sde import SDE, _bcast, check_sigmas

__all__ = [
    "langevin",
    "annealed_langevin",
    "euler_maruyama",
    "predictor_corrector",
    "probability_flow",
]


def _steps(n: int, progress: bool | None, desc: str) -> Iterable[int]:
    show = (n >= 500 and sys.stderr.isatty()) if progress is None else progress
    return tqdm(range(n), desc=desc, leave=False) if show else range(n)


def _check_start(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"{name} must be a batch tensor shaped (B, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return check_finite(name, x)


def _check_steps(n_steps: int) -> None:
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def langevin(score: ScoreFn, x0: Tensor, step_size: float, n_steps: int, t: TimeLike = 0.0,
             generator: torch.Generator | None = None, return_trajectory: bool = False,
             progress: bool | None = None):
    """Unadjusted Langevin: ``x <- x + eps s(x, t) + sqrt(2 eps) z`` (Roberts & Tweedie 1996).

    Exact only as ``eps -> 0`` and ``n_steps -> inf``; for ``N(m, v)`` its stationary
    variance is ``v / (1 - eps / (2 v))``.
    """
    check_positive("step_size", step_size)
    _check_steps(n_steps)
    x = _check_start("x0", x0).clone()
    traj = [x]
    for _ in _steps(n_steps, progress, "Langevin"):
        x = x + step_size * evaluate_score(score, x, t) + math.sqrt(2 * step_size) * _noise(x, generator)
        if return_trajectory:
            traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def annealed_langevin(score: ScoreFn, x0: Tensor, sigmas: Tensor, n_steps_each: int, eps: float,
                      generator: torch.Generator | None = None, denoise: bool = False,
                      return_trajectory: bool = False, progress: bool | None = None):
    """Annealed Langevin dynamics, Algorithm 1 of Song & Ermon (2019).

    For ``sigma_1 > ... > sigma_L`` run ``n_steps_each`` steps of
    ``x <- x + alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z`` with ``alpha_i = eps sigma_i^2 / sigma_L^2``.
    ``denoise`` adds one final step ``x + sigma_L^2 s(x, sigma_L)`` (Tweedie's formula).
    """
    sig = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64))
    check_positive("eps", eps)
    _check_steps(n_steps_each)
    x = _check_start("x0", x0).clone()
    traj = [x]
    sigma_last = float(sig[-1])
    for i in _steps(len(sig), progress, "annealed Langevin"):
        sigma_i = float(sig[i])
        alpha = eps * sigma_i ** 2 / sigma_last ** 2                    # step size for this level
        # alpha/2 s + sqrt(alpha) z  is the Langevin step with step size alpha/2
        out = langevin(score, x, alpha / 2, n_steps_each, t=sigma_i, generator=generator,
                       return_trajectory=return_trajectory, progress=False)
        x, level_traj = out if return_trajectory else (out, None)
        if return_trajectory:
            traj.extend(level_traj[1:])
    if denoise:
        x = x + sigma_last ** 2 * evaluate_score(score, x, sigma_last)
        if return_trajectory:
            traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def _time_grid(sde: SDE, n_steps: int, eps: float, x: Tensor) -> Tensor:
    sde.check_eps(eps)
    return torch.linspace(sde.T, eps, n_steps + 1, dtype=x.dtype, device=x.device)  # (N+1,) from T down to eps


def euler_maruyama(sde: SDE, score: ScoreFn, x_T: Tensor, n_steps: int, eps: float = 1e-3,
                   generator: torch.Generator | None = None, denoise: bool = True,
                   return_trajectory: bool = False, progress: bool | None = None):
    """Euler--Maruyama on the reverse-time SDE ``dx = [f - g^2 s] dt + g dw-bar`` (Song et al. 2021, eq. 6).

    Integrates from ``T`` down to ``eps``; with ``denoise`` the last step adds no noise.
    """
    _check_steps(n_steps)
    x = _check_start("x_T", x_T).clone()
    ts = _time_grid(sde, n_steps, eps, x)
    traj = [x]
    for i in _steps(n_steps, progress, "Euler-Maruyama"):
        t, dt = ts[i], ts[i + 1] - ts[i]                                    # dt < 0: time runs backwards
        x_mean = x + sde.reverse_drift(score, x, t) * dt                    # drift step
        g = _bcast(sde.diffusion(t).to(x.dtype), x)
        last = i == n_steps - 1
        x = x_mean if (denoise and last) else x_mean + g * torch.sqrt(-dt) * _noise(x, generator)  # diffusion step
        if return_trajectory:
            traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def predictor_corrector(sde: SDE, score: ScoreFn, x_T: Tensor, n_steps: int, snr: float = 0.16,
                        n_corrector: int = 1, eps: float = 1e-3, generator: torch.Generator | None = None,
                        denoise: bool = True, return_trajectory: bool = False, progress: bool | None = None):
    """Predictor--corrector sampling, Algorithms 2--3 of Song et al. (2021).

    At each time ``t_i`` (from ``T`` down to ``eps``): ``n_corrector`` Langevin corrector steps
    with step ``2 alpha (snr ||z|| / ||s||)^2``, then one reverse-diffusion predictor step to
    ``t_{i+1}``, ordered as in the paper's reference code. ``||.||`` are batch-mean norms.
    """
    _check_steps(n_steps)
    check_positive("snr", snr)
    if not isinstance(n_corrector, int) or n_corrector < 0:
        raise ValueError(f"n_corrector must be a non-negative integer, got {n_corrector!r}")
    x = _check_start("x_T", x_T).clone()
    ts = _time_grid(sde, n_steps, eps, x)
    traj = [x]
    for i in _steps(n_steps, progress, "predictor-corrector"):
        t, dt = ts[i], float(ts[i] - ts[i + 1])                             # dt > 0
        # corrector: Langevin MCMC at the current noise level
        alpha = sde.corrector_alpha(t, dt)
        for _ in range(n_corrector):
            s = evaluate_score(score, x, t)
            z = _noise(x, generator)
            s_norm = s.reshape(s.shape[0], -1).norm(dim=1).mean()
            z_norm = z.reshape(z.shape[0], -1).norm(dim=1).mean()
            step = 2 * alpha * (snr * z_norm / s_norm) ** 2
            x = x + step * s + torch.sqrt(2 * step) * z
        # predictor: invert the forward transition from t - dt to t
        f, G = sde.discretize(x, t, dt)                                    # (B, ...), (B,)
        G = _bcast(G.to(x.dtype), x)
        x_mean = x - (f - G ** 2 * evaluate_score(score, x, t))
        last = i == n_steps - 1
        x = x_mean if (denoise and last) else x_mean + G * _noise(x, generator)
        if return_trajectory:
            traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


_FIXED = ("euler", "heun")
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")  #: torchdiffeq solvers with error control


def probability_flow(sde: SDE, score: ScoreFn, x_T: Tensor, method: str = "dopri5", n_steps: int | None = None,
                     rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3, return_nfe: bool = False,
                     return_trajectory: bool = False, n_saved: int = 21, progress: bool | None = None):
    """Deterministic sampling by the probability-flow ODE ``dx/dt = f - g^2 s / 2`` (Song et al. 2021, eq. 13).

    ``method``: an adaptive torchdiffeq solver (``"dopri5"`` default, with ``rtol``/``atol``) or a
    fixed-step ``"euler"`` / ``"heun"`` with ``n_steps``. Returns ``x``, plus the number of score
    evaluations (NFE) with ``return_nfe`` and the trajectory (``n_saved`` states for adaptive
    solvers, every step for fixed ones) with ``return_trajectory``, in that order.
    """
    x = _check_start("x_T", x_T).clone()
    nfe = 0

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        # adaptive solvers' first-step heuristic may probe outside [eps, T]; the field is only used inside
        return sde.ode_drift(score, y, t.clamp(eps, sde.T))

    if method in _FIXED:
        if n_steps is None:
            raise ValueError(f"method={method!r} is fixed-step: pass n_steps")
        _check_steps(n_steps)
        ts = _time_grid(sde, n_steps, eps, x)
        traj = [x]  # kept only with return_trajectory: 1000 image-sized states would not fit in memory
        for i in _steps(n_steps, progress, f"probability flow ({method})"):
            t, dt = ts[i], ts[i + 1] - ts[i]
            v = velocity(t, x)
            if method == "euler":
                x = x + v * dt
            else:  # Heun: Euler predictor, trapezoidal corrector
                x_pred = x + v * dt
                x = x + 0.5 * (v + velocity(ts[i + 1], x_pred)) * dt
            if return_trajectory:
                traj.append(x)
        trajectory = torch.stack(traj) if return_trajectory else None
    elif method in ADAPTIVE_SOLVERS:
        from torchdiffeq import odeint

        check_positive("rtol", rtol)
        check_positive("atol", atol)
        sde.check_eps(eps)
        n_out = max(int(n_saved), 2) if return_trajectory else 2
        ts = torch.linspace(sde.T, eps, n_out, dtype=x.dtype, device=x.device)
        # step_t makes the solver land exactly on each output time instead of stepping past eps
        trajectory = odeint(velocity, x, ts, rtol=rtol, atol=atol, method=method, options={"step_t": ts})
        x = trajectory[-1]
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {_FIXED + ADAPTIVE_SOLVERS}")
    out: tuple = (x,)
    if return_nfe:
        out += (nfe,)
    if return_trajectory:
        out += (trajectory,)
    return out[0] if len(out) == 1 else out


LogProbFn = Callable[[Tensor], Tensor]  #: ``log_prob(x (B, ...)) -> (B,)``, an unnormalised log-density in nats


def _log_density(log_prob: LogProbFn, x: Tensor) -> Tensor:
    out = log_prob(x)
    if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"log_prob(x) must return one log-density per point, shape ({x.shape[0]},), got {got}")
    if torch.isnan(out).any() or (out == math.inf).any():
        raise ValueError("log_prob(x) returned NaN or +inf (-inf, meaning p = 0, is allowed)")
    return out


def mala(score: ScoreFn, log_prob: LogProbFn, x0: Tensor, step_size: float, n_steps: int, t: TimeLike = 0.0,
         generator: torch.Generator | None = None, return_acceptance: bool = False,
         return_trajectory: bool = False, progress: bool | None = None):
    """Metropolis-adjusted Langevin (MALA; Roberts & Tweedie 1996, Besag 1994): a Langevin proposal, then accept/reject.

    The proposal is the unadjusted step ``y = x + eps s(x, t) + sqrt(2 eps) z``; it is accepted with
    probability ``min(1, p(y) q(x | y) / (p(x) q(y | x)))``, ``q(y | x) = N(y; x + eps s(x), 2 eps I)``,
    so ``p`` is exactly stationary for every ``eps > 0``. ``log_prob`` is ``log p`` up to an additive
    constant (nats), ``(B, ...) -> (B,)``; it must belong to the same density as ``score``.
    Returns ``x``, then the per-chain acceptance rate ``(B,)`` with ``return_acceptance`` and the
    trajectory ``(n_steps + 1, B, ...)`` with ``return_trajectory``, in that order.
    """
    check_positive("step_size", step_size)
    _check_steps(n_steps)
    if not callable(log_prob):
        raise TypeError(f"log_prob must be a callable x -> (B,) log-densities, got {type(log_prob).__name__}")
    x = _check_start("x0", x0).clone()
    if not torch.isfinite(_log_density(log_prob, x)).all():
        raise ValueError("x0 must start where p > 0: log_prob(x0) is -inf for some chains")
    traj = [x]
    accepted = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)              # (B,)

    def log_q(to: Tensor, frm: Tensor, s_frm: Tensor) -> Tensor:
        """log N(to; frm + eps s(frm), 2 eps I) up to a constant that cancels; (B,)."""
        return -(to - frm - step_size * s_frm).pow(2).flatten(1).sum(1) / (4 * step_size)

    s_x, lp_x = evaluate_score(score, x, t), _log_density(log_prob, x)                  # (B, ...), (B,)
    for _ in _steps(n_steps, progress, "MALA"):
        # propose: one unadjusted Langevin step
        y = x + step_size * s_x + math.sqrt(2 * step_size) * _noise(x, generator)
        s_y, lp_y = evaluate_score(score, y, t), _log_density(log_prob, y)
        # Metropolis-Hastings: log of the acceptance ratio
        log_alpha = lp_y - lp_x + log_q(x, y, s_y) - log_q(y, x, s_x)                # (B,)
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        accept = torch.log(u) < log_alpha                                             # (B,) bool
        # keep the accepted proposals, and the score and log-density that go with them
        mask = accept.reshape(-1, *([1] * (x.ndim - 1)))
        x, s_x = torch.where(mask, y, x), torch.where(mask, s_y, s_x)
        lp_x = torch.where(accept, lp_y, lp_x)
        accepted += accept.to(x.dtype)
        if return_trajectory:
            traj.append(x)
    out: tuple = (x,)
    if return_acceptance:
        out += (accepted / n_steps,)
    if return_trajectory:
        out += (torch.stack(traj),)
    return out[0] if len(out) == 1 else out


__all__ += ["mala"]

__all__ += ["probability_flow_encode"]


def probability_flow_encode(sde: SDE, score: ScoreFn, x: Tensor, method: str = "dopri5", n_steps: int | None = None,
                            rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3, return_nfe: bool = False):
    """Encode data into latents: the probability-flow ODE (Song et al. 2021, eq. 13) run forwards from ``eps`` to ``T``.

    The inverse of :func:`probability_flow` with the same ``score``, ``eps`` and solver settings, up to
    solver error: ``probability_flow(sde, score, probability_flow_encode(sde, score, x))`` returns ``x``.
    ``x`` (B, ...) holds states at time ``eps``; returns the latents at ``T`` shaped like ``x``, plus the
    number of score evaluations with ``return_nfe``.
    """
    x = _check_start("x", x).clone()
    sde.check_eps(eps)
    nfe = 0

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return sde.ode_drift(score, y, t.clamp(eps, sde.T))                  # (B, ...)

    if method in _FIXED:
        if n_steps is None:
            raise ValueError(f"method={method!r} is fixed-step: pass n_steps")
        _check_steps(n_steps)
        ts = torch.linspace(eps, sde.T, n_steps + 1, dtype=x.dtype, device=x.device)   # (N+1,) from eps up to T
        for i in range(n_steps):
            t, dt = ts[i], ts[i + 1] - ts[i]                                  # dt > 0: time runs forwards
            v = velocity(t, x)
            if method == "euler":
                x = x + v * dt
            else:  # Heun: Euler predictor, trapezoidal corrector
                x = x + 0.5 * (v + velocity(ts[i + 1], x + v * dt)) * dt
    elif method in ADAPTIVE_SOLVERS:
        from torchdiffeq import odeint

        check_positive("rtol", rtol)
        check_positive("atol", atol)
        ts = torch.tensor([eps, sde.T], dtype=x.dtype, device=x.device)
        x = odeint(velocity, x, ts, rtol=rtol, atol=atol, method=method, options={"step_t": ts})[-1]
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {_FIXED + ADAPTIVE_SOLVERS}")
    return (x, nfe) if return_nfe else x
