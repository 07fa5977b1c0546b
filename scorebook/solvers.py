r"""Fast samplers: few-step solvers of the probability-flow ODE, and their stochastic variants.

Every SDE in the package becomes the same ODE in EDM's variables (Karras et al. 2022), the rescaled
state ``y = x / a(t)`` and the noise level ``sigma = std(t) / a(t)`` (:mod:`scorebook.notation`):

    dy / dsigma = eps_hat(y, sigma) = (y - D(y; sigma)) / sigma,

where ``D(y; sigma) = E[x_0 | y]`` is the denoiser. So each sampler here takes a decreasing grid of
EDM noise levels ``sigmas`` and reaches the SDE only through the conversions ``sigma <-> t`` and
``x = a y`` of :mod:`scorebook.notation`; one implementation serves VE, VP and sub-VP.

* :func:`edm_heun` -- Heun's method on the ODE above, Algorithm 1 of Karras et al. (2022);
* :func:`edm_stochastic` -- the same with "churn" noise, Algorithm 2 of Karras et al. (2022);
* :func:`ddim` -- DDIM with ``eta`` in [0, 1], Song, Meng & Ermon (2021), eq. 12;
* :func:`dpm_solver_pp_2m` -- DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022b).

:func:`sigma_steps` builds the grid: EDM's rho-schedule, uniform in ``t``, or uniform in
``lambda = -log sigma``. A grid that ends in ``0`` makes the last step the Tweedie denoising step
``x = D(y; sigma_min)``, and every sampler returns ``x`` at the time of the grid's last level.

All samplers also have one uniform signature in :data:`SAMPLERS`,
``sample(sde, score, x_T, nfe, generator=None) -> x``: ``x_T`` is drawn at time ``T`` and ``nfe`` is the
budget of score evaluations (the sampler uses at most that many; wrap the score in :class:`NFECounter`
to count them).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .contract import ScoreFn, check_finite, check_positive, evaluate_score
from .notation import edm_denoiser, edm_sigma, edm_time, eps_from_score, x0_from_score
from .samplers import euler_maruyama, predictor_corrector, probability_flow
from .sde import SDE

__all__ = [
    "sigma_steps",
    "edm_heun",
    "edm_stochastic",
    "ddim",
    "dpm_solver_pp_2m",
    "NFECounter",
    "Sampler",
    "SAMPLERS",
]

F64 = torch.float64
SCHEDULES = ("edm", "time", "logsnr")


# ----- noise-level grids -----------------------------------------------------------------------
def sigma_steps(sde: SDE, n: int, schedule: str = "edm", rho: float = 7.0, eps: float = 1e-3,
                denoise: bool = True) -> Tensor:
    """``n`` EDM noise levels from ``sigma_EDM(T)`` down to ``sigma_EDM(eps)``, then ``0`` if ``denoise``; float64.

    ``schedule``: ``"edm"`` spaces ``sigma^(1/rho)`` evenly (Karras et al. 2022, eq. 5; ``rho = 7``),
    ``"time"`` spaces the SDE time evenly (DDIM's and the SDE samplers' grid), ``"logsnr"`` spaces
    ``lambda = -log sigma`` evenly (DPM-Solver's grid for low-resolution data). Shape (n,) or (n + 1,).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_positive("rho", rho)
    sde.check_eps(eps)
    s_max, s_min = float(edm_sigma(sde, sde.T)), float(edm_sigma(sde, eps))
    u = torch.linspace(0.0, 1.0, n, dtype=F64)                                     # (n,) from the start to the end
    if schedule == "edm":
        sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    elif schedule == "time":
        sig = edm_sigma(sde, sde.T + u * (eps - sde.T))
    else:
        sig = torch.exp(math.log(s_max) + u * (math.log(s_min) - math.log(s_max)))
    sig[0], sig[-1] = s_max, s_min                                                 # exact ends, no rounding
    return torch.cat([sig, torch.zeros(1, dtype=F64)]) if denoise else sig


def _check_sigmas(sde: SDE, sigmas: Tensor) -> Tensor:
    s = torch.as_tensor(sigmas, dtype=F64).detach().cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 noise levels, got shape {tuple(s.shape)}")
    check_finite("sigmas", s)
    if not (s[1:] < s[:-1]).all() or (s[:-1] <= 0).any() or s[-1] < 0:
        raise ValueError("sigmas must be strictly decreasing and positive (only the last may be 0), "
                         f"got {s.tolist()}")
    s_max = float(edm_sigma(sde, sde.T))
    if s[0] > s_max * (1 + 1e-9):
        raise ValueError(f"sigmas[0] = {float(s[0]):.6g} exceeds sigma_EDM(T) = {s_max:.6g}, the largest noise "
                         f"level of {type(sde).__name__}")
    return s


def _check_start(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"x_T must be a batch tensor shaped (B, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return check_finite("x_T", x)


def _a(sde: SDE, sigma: float, x: Tensor) -> float:
    """a(t) at the time with EDM noise level ``sigma`` (1 at sigma = 0)."""
    return float(sde.mean_coef(edm_time(sde, sigma)))


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----- the samplers ----------------------------------------------------------------------------
def edm_heun(sde: SDE, score: ScoreFn, x_T: Tensor, sigmas: Tensor) -> Tensor:
    """Heun's 2nd-order method on ``dy/dsigma = (y - D(y; sigma)) / sigma``, Algorithm 1 of Karras et al. (2022).

    ``x_T`` is the state at noise level ``sigmas[0]``; a step to ``sigma = 0`` is a plain Euler step.
    Score evaluations: 2 per step, 1 for a final step to 0. Returns x at ``sigmas[-1]``, like ``x_T``.
    """
    sig = _check_sigmas(sde, sigmas)
    D = edm_denoiser(lambda x, t: evaluate_score(score, x, t), sde)
    y = _check_start(x_T) / _a(sde, float(sig[0]), x_T)                       # (B, ...) on the data scale
    for s_cur, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        y = _heun_step(D, y, s_cur, s_next)
    return _a(sde, float(sig[-1]), y) * y


def _heun_step(D, y: Tensor, s_cur: float, s_next: float) -> Tensor:
    """One step of EDM's Heun solver on ``dy/dsigma = (y - D(y, sigma)) / sigma`` from ``s_cur`` to ``s_next``
    (Karras et al. 2022, Algorithm 1, lines 4-8): Euler, then the trapezoidal correction unless ``s_next = 0``."""
    d = (y - D(y, s_cur)) / s_cur                                              # slope dy/dsigma at s_cur
    y_next = y + (s_next - s_cur) * d                                          # Euler step
    if s_next > 0:                                                             # 2nd-order correction
        d_next = (y_next - D(y_next, s_next)) / s_next
        y_next = y + (s_next - s_cur) * 0.5 * (d + d_next)
    return y_next


def edm_stochastic(sde: SDE, score: ScoreFn, x_T: Tensor, sigmas: Tensor, s_churn: float = 40.0,
                   s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """EDM's stochastic sampler, Algorithm 2 of Karras et al. (2022): raise the noise, then take a Heun step.

    At each level ``sigma_i`` in ``[s_tmin, s_tmax]`` the noise is first raised to
    ``sigma_hat = (1 + gamma) sigma_i`` with ``gamma = min(s_churn / N, sqrt(2) - 1)`` by adding fresh
    noise (capped at ``sigma_EDM(T)``); ``s_churn = 0`` gives :func:`edm_heun`. ``s_noise`` inflates
    the added noise (EDM uses 1.003 for networks; an exact score needs 1). Returns x at ``sigmas[-1]``.
    """
    sig = _check_sigmas(sde, sigmas)
    for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be >= s_tmin, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    D = edm_denoiser(lambda x, t: evaluate_score(score, x, t), sde)
    s_max = float(edm_sigma(sde, sde.T))
    n = len(sig) - 1
    y = _check_start(x_T) / _a(sde, float(sig[0]), x_T)
    for s_cur, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s_cur <= s_tmax else 0.0
        s_hat = min(s_cur * (1 + gamma), s_max)                                # raise the noise level ...
        y_hat = y + math.sqrt(s_hat ** 2 - s_cur ** 2) * s_noise * _noise(y, generator)   # ... by adding noise
        y = _heun_step(D, y_hat, s_hat, s_next)                                # Heun step from s_hat
    return _a(sde, float(sig[-1]), y) * y


def ddim(sde: SDE, score: ScoreFn, x_T: Tensor, sigmas: Tensor, eta: float = 0.0,
         generator: torch.Generator | None = None) -> Tensor:
    """DDIM, eq. 12 of Song, Meng & Ermon (2021): ``x' = a' x0_hat + sqrt(std'^2 - c^2) eps_hat + c z``.

    ``c = eta std' sqrt(1 - (sigma'/sigma)^2)``: ``eta = 0`` is deterministic (and is Euler's method on
    ``dy/dsigma = eps_hat`` in EDM's variables); ``eta = 1`` samples the exact Gaussian posterior
    ``q(x_t' | x_t, x_0 = x0_hat)``, DDPM's ancestral step. One score evaluation per step.
    """
    sig = _check_sigmas(sde, sigmas)
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    x = _check_start(x_T).clone()
    for s_cur, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        t_cur, t_next = edm_time(sde, s_cur), edm_time(sde, s_next)
        a_next, std_next = float(sde.mean_coef(t_next)), float(sde.marginal_std(t_next))
        sc = evaluate_score(score, x, t_cur.to(device=x.device, dtype=x.dtype).expand(x.shape[0]))
        x0 = x0_from_score(sc, x, t_cur, sde)                                  # predicted clean data
        eps = eps_from_score(sc, x, t_cur, sde)                                # predicted noise
        c = eta * std_next * math.sqrt(1 - (s_next / s_cur) ** 2)              # std of the fresh noise
        x = a_next * x0 + math.sqrt(max(std_next ** 2 - c ** 2, 0.0)) * eps    # deterministic direction
        if c > 0:
            x = x + c * _noise(x, generator)                                   # random part
    return x


def dpm_solver_pp_2m(sde: SDE, score: ScoreFn, x_T: Tensor, sigmas: Tensor) -> Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022b): a 2nd-order multistep solver in ``lambda = log(a/std)``.

    ``x_i = (std_i/std_{i-1}) x_{i-1} - a_i (e^{-h_i} - 1) D_i`` with ``h_i = lambda_i - lambda_{i-1}`` and
    ``D_i = (1 + 1/(2 r_i)) x0_{i-1} - x0_{i-2} / (2 r_i)``, ``r_i = h_{i-1} / h_i``; the first step and a
    final step to ``sigma = 0`` use ``D_i = x0_{i-1}`` (first order). One score evaluation per step.
    """
    sig = _check_sigmas(sde, sigmas)
    x = _check_start(x_T).clone()
    x0_prev, h_prev = None, None
    for s_cur, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        t_cur, t_next = edm_time(sde, s_cur), edm_time(sde, s_next)
        std_cur = float(sde.marginal_std(t_cur))
        a_next, std_next = float(sde.mean_coef(t_next)), float(sde.marginal_std(t_next))
        sc = evaluate_score(score, x, t_cur.to(device=x.device, dtype=x.dtype).expand(x.shape[0]))
        x0 = x0_from_score(sc, x, t_cur, sde)                                  # data prediction at t_cur
        if s_next == 0:                                                        # last step: x = x0_hat
            x = x0
            break
        h = math.log(s_cur / s_next)                                           # lambda_next - lambda_cur
        if x0_prev is None:
            d = x0                                                             # first step: 1st order
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)                     # 2nd-order combination
        x = (std_next / std_cur) * x - a_next * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


# ----- one signature for every sampler ---------------------------------------------------------
class Sampler(Protocol):
    def __call__(self, sde: SDE, score: ScoreFn, x_T: Tensor, nfe: int,
                 generator: torch.Generator | None = None) -> Tensor: ...


class NFECounter:
    """A score wrapper that counts its evaluations (the number of function evaluations, NFE)."""

    def __init__(self, score: ScoreFn):
        self.score, self.nfe = score, 0

    def __call__(self, x: Tensor, t) -> Tensor:
        self.nfe += 1
        return self.score(x, t)


def _check_nfe(nfe: int, minimum: int = 1) -> int:
    if not isinstance(nfe, int) or nfe < minimum:
        raise ValueError(f"nfe must be an integer >= {minimum}, got {nfe!r}")
    return nfe


def _edm(sde, score, x_T, nfe, generator=None):
    """EDM: Heun on the rho = 7 grid (Karras et al. 2022, Algorithm 1); 2 NFE per step, 1 for the last."""
    n = (_check_nfe(nfe) + 1) // 2                               # n levels cost 2 (n - 1) + 1 <= nfe
    return edm_heun(sde, score, x_T, sigma_steps(sde, n))


def _edm_sde(sde, score, x_T, nfe, generator=None):
    """EDM stochastic: churn 40 on the rho = 7 grid (Karras et al. 2022, Algorithm 2)."""
    n = (_check_nfe(nfe) + 1) // 2
    return edm_stochastic(sde, score, x_T, sigma_steps(sde, n), generator=generator)


def _ddim(sde, score, x_T, nfe, generator=None):
    """DDIM, eta = 0, uniform in t (Song, Meng & Ermon 2021)."""
    return ddim(sde, score, x_T, sigma_steps(sde, _check_nfe(nfe), "time"))


def _ddpm(sde, score, x_T, nfe, generator=None):
    """DDIM with eta = 1 (DDPM's ancestral step), uniform in t."""
    return ddim(sde, score, x_T, sigma_steps(sde, _check_nfe(nfe), "time"), eta=1.0, generator=generator)


def _dpmpp(sde, score, x_T, nfe, generator=None):
    """DPM-Solver++(2M), uniform in lambda (Lu et al. 2022b)."""
    return dpm_solver_pp_2m(sde, score, x_T, sigma_steps(sde, _check_nfe(nfe), "logsnr"))


def _em(sde, score, x_T, nfe, generator=None):
    """Euler-Maruyama on the reverse SDE, uniform in t (Song et al. 2021)."""
    return euler_maruyama(sde, score, x_T, _check_nfe(nfe), generator=generator)


def _pc(sde, score, x_T, nfe, generator=None):
    """Predictor-corrector with one Langevin corrector step, uniform in t (Song et al. 2021); 2 NFE per step."""
    return predictor_corrector(sde, score, x_T, _check_nfe(nfe, 2) // 2, generator=generator)


def _ode_heun(sde, score, x_T, nfe, generator=None):
    """Probability-flow ODE, Heun's method uniform in t (Song et al. 2021); 2 NFE per step."""
    return probability_flow(sde, score, x_T, method="heun", n_steps=_check_nfe(nfe, 2) // 2)


def _ode_euler(sde, score, x_T, nfe, generator=None):
    """Probability-flow ODE, Euler's method uniform in t (Song et al. 2021)."""
    return probability_flow(sde, score, x_T, method="euler", n_steps=_check_nfe(nfe))


#: every fixed-budget sampler by name: ``SAMPLERS[name](sde, score, x_T, nfe, generator=None) -> x``
SAMPLERS: dict[str, Sampler] = {
    "edm": _edm,
    "edm_sde": _edm_sde,
    "dpmpp_2m": _dpmpp,
    "ddim": _ddim,
    "ddpm": _ddpm,
    "em": _em,
    "pc": _pc,
    "ode_heun": _ode_heun,
    "ode_euler": _ode_euler,
}
