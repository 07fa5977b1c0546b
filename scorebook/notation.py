r"""Notation crosswalk: one diffusion, written in the vocabularies of five papers.

Every forward process in the package has the Gaussian kernel ``x_t = a(t) x_0 + std(t) eps``,
``eps ~ N(0, I)`` (:mod:`scorebook.sde`). Each paper names the same quantities differently:

===========================  ==============================================  ======================================================
vocabulary                   its noise variable                              in terms of ``a(t)`` and ``std(t)``
===========================  ==============================================  ======================================================
NCSN (Song & Ermon 2019)     ``sigma_i``; ``p_sigma = p_0 * N(0, s^2)``      VE time with ``std(t_i) = sigma_i`` (exact)
VE SDE (Song et al. 2021)    ``sigma(t) = s_min (s_max / s_min)^t``          ``a = 1``, ``std = sqrt(sigma(t)^2 - s_min^2)``
VP SDE (Song et al. 2021)    ``beta(t)``, linear in ``t``                    ``a = exp(-int beta / 2)``, ``std^2 = 1 - a^2``
DDPM (Ho et al. 2020)        ``beta_i``, ``alpha_bar_i = prod(1 - beta_j)``  ``beta_i ~ beta(t_i) / N``, ``alpha_bar_i ~ a(i/N)^2``
EDM (Karras et al. 2022)     ``sigma``, ``x / a = x_0 + sigma eps``          ``sigma = std / a``
DPM-Solver (Lu et al. 2022)  ``lambda`` (half log-SNR)                       ``lambda = log(a / std) = -log sigma_EDM``
===========================  ==============================================  ======================================================

and a network may predict any of four equivalent targets (each is an affine function of the others
at fixed ``x_t`` and ``t``; the exact ones are posterior means):

==========================  ====================================  ==========================================
prediction                  exact value                           from the score ``s = grad log p_t(x_t)``
==========================  ====================================  ==========================================
score ``s``                 ``grad log p_t(x_t)``                 ``s``
noise ``eps_hat``           ``E[eps | x_t]``                      ``-std s``
clean data ``x0_hat``       ``E[x_0 | x_t]`` (Tweedie)            ``(x_t + std^2 s) / a``
velocity ``v_hat``          ``E[a eps - std x_0 | x_t]``          ``a eps_hat - std x0_hat``
==========================  ====================================  ==========================================

The velocity follows Salimans & Ho (2022), ``v = alpha eps - sigma x_0`` with ``alpha = a`` and
``sigma = std``. We keep the same formula for every SDE; for VE (``a = 1``) it reads
``v = eps - std x_0``. Only when ``a^2 + std^2 = 1`` (VP) is ``v`` the derivative ``dx_t / dphi`` along
``phi = atan(std / a)``; the inverse conversions below hold for any ``a`` and ``std``.

All times ``t`` are SDE times in ``[0, T]`` (a float or a ``(B,)`` tensor); all EDM ``sigma`` are
dimensionless noise-to-signal ratios in ``[0, sigma_EDM(T)]``. Prediction conversions take the
prediction, the point ``x`` (B, ...) it was made at and ``t``, and return a tensor shaped like ``x``.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

from .contract import ScoreFn, TimeLike, check_finite
from .sde import SDE, SubVPSDE, VESDE, VPSDE, _bcast, check_sigmas

__all__ = [
    # noise variables
    "edm_sigma",
    "edm_time",
    "half_log_snr",
    "ve_time_of_sigma",
    "ncsn_sigmas_to_ve_times",
    "vp_alpha_bar",
    "ddpm_betas",
    "ddpm_alpha_bars",
    "ddpm_betas_from_alpha_bars",
    "ddpm_times",
    # predictions
    "eps_from_score",
    "score_from_eps",
    "x0_from_score",
    "score_from_x0",
    "v_from_score",
    "score_from_v",
    # whole score callables
    "SigmaScoreFn",
    "sigma_score",
    "time_score",
    "edm_denoiser",
]

F64 = torch.float64
SigmaLike = Union[float, Tensor]
#: a score in the NCSN/EDM convention: ``score(y, sigma)`` with ``y = x / a`` and ``sigma`` the EDM noise level
SigmaScoreFn = Callable[[Tensor, SigmaLike], Tensor]


# ----- noise variables -------------------------------------------------------------------------
def _times(sde: SDE, t: TimeLike) -> Tensor:
    """``t`` as a float64 (B,) tensor inside ``[0, T]``."""
    tt = torch.as_tensor(t, dtype=F64).reshape(-1) if not isinstance(t, Tensor) else t.to(F64).reshape(-1)
    check_finite("t", tt)
    if (tt < 0).any() or (tt > sde.T).any():
        raise ValueError(f"t must lie in [0, {sde.T}], got values in [{tt.min().item():.4g}, {tt.max().item():.4g}]")
    return tt


def edm_sigma(sde: SDE, t: TimeLike) -> Tensor:
    """EDM's noise level ``sigma(t) = std(t) / a(t)`` (Karras et al. 2022), so ``x_t / a(t) = x_0 + sigma eps``; (B,) float64."""
    tt = _times(sde, t)
    return sde.marginal_std(tt) / sde.mean_coef(tt)


def half_log_snr(sde: SDE, t: TimeLike) -> Tensor:
    """DPM-Solver's ``lambda(t) = log(a(t) / std(t)) = -log sigma_EDM(t)`` (Lu et al. 2022); (B,) float64, +inf at t = 0."""
    return -torch.log(edm_sigma(sde, t))


def _int_beta_inverse(sde: VPSDE, integral: Tensor) -> Tensor:
    """The time ``t`` with ``int_0^t beta = integral`` for the linear ``beta`` of VP and sub-VP."""
    b0, db = sde.beta_min, sde.beta_max - sde.beta_min
    # root of db/2 t^2 + b0 t - L = 0, written without cancellation (and valid for db = 0)
    return 2 * integral / (b0 + torch.sqrt(b0 * b0 + 2 * db * integral))


def edm_time(sde: SDE, sigma: SigmaLike) -> Tensor:
    """The SDE time whose EDM noise level is ``sigma``: the inverse of :func:`edm_sigma`; (B,) float64.

    Closed forms for VE (``sigma(t)^2 = sigma^2 + sigma_min^2``), VP (``int beta = log(1 + sigma^2)``) and
    sub-VP (``a = 2 / (sigma + sqrt(sigma^2 + 4))``); any other SDE is inverted by bisection.
    """
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1) if not isinstance(sigma, Tensor) else sigma.to(F64).reshape(-1)
    check_finite("sigma", s)
    if (s < 0).any():
        raise ValueError(f"sigma must lie in [0, sigma_EDM(T)], got values in [{s.min().item():.6g}, {s.max().item():.6g}]")
    if isinstance(sde, VESDE):
        t = 0.5 * torch.log1p((s / sde.sigma_min) ** 2) / math.log(sde.sigma_max / sde.sigma_min)
    elif isinstance(sde, SubVPSDE):      # std = 1 - a^2 and sigma = std / a: a^2 + sigma a - 1 = 0
        a = 2.0 / (s + torch.sqrt(s * s + 4.0))
        t = _int_beta_inverse(sde, -2.0 * torch.log(a))
    elif isinstance(sde, VPSDE):         # 1 / a^2 = 1 + sigma^2 and a^2 = exp(-int beta)
        t = _int_beta_inverse(sde, torch.log1p(s * s))
    else:                                # sigma_EDM(t) increases with t: bisect
        s_max = float(edm_sigma(sde, sde.T))
        if (s > s_max * (1 + 1e-12)).any():
            raise ValueError(f"sigma must lie in [0, sigma_EDM(T) = {s_max:.6g}] for {type(sde).__name__}, "
                             f"got values in [{s.min().item():.6g}, {s.max().item():.6g}]")
        lo, hi = torch.zeros_like(s), torch.full_like(s, sde.T)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            below = edm_sigma(sde, mid) < s
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = 0.5 * (lo + hi)
    if (t > sde.T * (1 + 1e-12)).any():  # closed forms: beyond the SDE's largest noise level
        s_max = float(edm_sigma(sde, sde.T))
        raise ValueError(f"sigma must lie in [0, sigma_EDM(T) = {s_max:.6g}] for {type(sde).__name__}, "
                         f"got values in [{s.min().item():.6g}, {s.max().item():.6g}]")
    return t.clamp(0.0, sde.T)           # rounding at sigma_EDM(T) must not step past T


def ve_time_of_sigma(sde: VESDE, sigma: SigmaLike) -> Tensor:
    """The VE time with ``sigma(t) = sigma``, the identification of NCSN's ``sigma_i`` used by Song et al. (2021); (B,) float64."""
    if not isinstance(sde, VESDE):
        raise ValueError(f"sde must be a VESDE, got {type(sde).__name__}")
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1)
    check_finite("sigma", s)
    if (s < sde.sigma_min * (1 - 1e-12)).any() or (s > sde.sigma_max * (1 + 1e-12)).any():
        raise ValueError(f"sigma must lie in [sigma_min, sigma_max] = [{sde.sigma_min}, {sde.sigma_max}], "
                         f"got values in [{s.min().item():.6g}, {s.max().item():.6g}]")
    return (torch.log(s / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)).clamp(0.0, sde.T)


def ncsn_sigmas_to_ve_times(sde: VESDE, sigmas: Tensor, exact: bool = True) -> Tensor:
    """VE times for NCSN's noise levels ``sigma_1 > ... > sigma_L``; (L,) float64.

    ``exact=True``: the time at which the VE marginal *is* ``p_0 * N(0, sigma_i^2 I)``, i.e.
    ``std(t_i) = sigma_i``. ``exact=False``: ``sigma(t_i) = sigma_i``, Song et al.'s (2021)
    identification, which differs by ``sigma_min^2 / (2 sigma_i)`` in the noise std.
    """
    if not isinstance(sde, VESDE):
        raise ValueError(f"sde must be a VESDE, got {type(sde).__name__}")
    s = check_sigmas(torch.as_tensor(sigmas, dtype=F64))
    return edm_time(sde, s) if exact else ve_time_of_sigma(sde, s)


def vp_alpha_bar(sde: VPSDE, t: TimeLike) -> Tensor:
    """The continuous ``alpha_bar(t) = a(t)^2 = exp(-int_0^t beta)`` of the VP SDE; (B,) float64."""
    if not isinstance(sde, VPSDE) or isinstance(sde, SubVPSDE):
        raise ValueError(f"sde must be a VPSDE, got {type(sde).__name__}")
    return sde.mean_coef(_times(sde, t)) ** 2


def ddpm_betas(sde: VPSDE, n: int) -> Tensor:
    """DDPM's ``N`` discrete betas for a VP SDE: ``beta_i = beta(t)/N`` on ``N`` evenly spaced ``t`` in [0, 1]; (N,) float64.

    With the defaults (``beta_min = 0.1``, ``beta_max = 20``, ``N = 1000``) these are Ho et al.'s (2020)
    ``linspace(1e-4, 0.02, 1000)``; step ``i`` (1-based) of the chain corresponds to time ``i / N``.
    """
    if not isinstance(sde, VPSDE) or isinstance(sde, SubVPSDE):
        raise ValueError(f"sde must be a VPSDE, got {type(sde).__name__}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    return torch.linspace(sde.beta_min / n, sde.beta_max / n, n, dtype=F64)


def ddpm_times(n: int) -> Tensor:
    """The SDE times ``t_i = i / N`` of DDPM's steps ``i = 1..N``; (N,) float64."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return torch.arange(1, n + 1, dtype=F64) / n


def ddpm_alpha_bars(betas: Tensor) -> Tensor:
    """``alpha_bar_i = prod_{j <= i} (1 - beta_j)``, the signal variance after ``i`` DDPM steps; (N,)."""
    b = torch.as_tensor(betas, dtype=F64)
    if b.ndim != 1 or b.numel() == 0 or not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
        raise ValueError("betas must be a non-empty 1-D tensor with every entry in (0, 1)")
    return torch.cumprod(1.0 - b, dim=0)


def ddpm_betas_from_alpha_bars(alpha_bars: Tensor) -> Tensor:
    """The inverse of :func:`ddpm_alpha_bars`: ``beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}``, ``alpha_bar_0 = 1``; (N,)."""
    ab = torch.as_tensor(alpha_bars, dtype=F64)
    if ab.ndim != 1 or ab.numel() == 0 or (ab <= 0).any() or (ab >= 1).any() or (ab[1:] >= ab[:-1]).any():
        raise ValueError("alpha_bars must be a non-empty, strictly decreasing 1-D tensor in (0, 1)")
    prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    return 1.0 - ab / prev


# ----- predictions -----------------------------------------------------------------------------
def _batch(name: str, v: TimeLike, x: Tensor) -> Tensor:
    """A number or a (B,) tensor as a float64 (B,) tensor on the CPU, where the coefficients are computed."""
    b = x.shape[0]
    vv = v.detach().to(device="cpu", dtype=F64).reshape(-1) if isinstance(v, Tensor) else torch.tensor(
        [float(v)], dtype=F64)
    if vv.numel() == 1:
        return vv.expand(b)
    if vv.shape != (b,):
        raise ValueError(f"{name} must be a number or a tensor of shape ({b},) to match x; got shape {tuple(vv.shape)}")
    return vv


def _coefs(sde: SDE, x: Tensor, t: TimeLike, need_std: bool = False) -> tuple[Tensor, Tensor]:
    """``a(t)`` and ``std(t)`` broadcast against ``x`` (B, ...), in x's dtype and device."""
    tt = _times(sde, _batch("t", t, x))
    a, s = sde.mean_coef(tt), sde.marginal_std(tt)
    if need_std and (s == 0).any():
        raise ValueError("t must be > 0 for this conversion: std(0) = 0 and the prediction does not determine the score")
    return (_bcast(a.to(device=x.device, dtype=x.dtype), x), _bcast(s.to(device=x.device, dtype=x.dtype), x))


def eps_from_score(score: Tensor, x: Tensor, t: TimeLike, sde: SDE) -> Tensor:
    """``eps_hat = -std(t) s``: the noise prediction ``E[eps | x_t]`` from the score; like x."""
    _, s = _coefs(sde, x, t)
    return -s * score


def score_from_eps(eps: Tensor, x: Tensor, t: TimeLike, sde: SDE) -> Tensor:
    """``s = -eps_hat / std(t)`` (needs ``t > 0``); like x."""
    _, s = _coefs(sde, x, t, need_std=True)
    return -eps / s


def x0_from_score(score: Tensor, x: Tensor, t: TimeLike, sde: SDE) -> Tensor:
    """Tweedie's formula ``x0_hat = E[x_0 | x_t] = (x_t + std^2 s) / a``; like x."""
    a, s = _coefs(sde, x, t)
    return (x + s * s * score) / a


def score_from_x0(x0: Tensor, x: Tensor, t: TimeLike, sde: SDE) -> Tensor:
    """``s = (a x0_hat - x_t) / std^2`` (needs ``t > 0``); like x."""
    a, s = _coefs(sde, x, t, need_std=True)
    return (a * x0 - x) / (s * s)


def v_from_score(score: Tensor, x: Tensor, t: TimeLike, sde: SDE) -> Tensor:
    """``v_hat = a eps_hat - std x0_hat`` (Salimans & Ho 2022, for every SDE); like x."""
    a, s = _coefs(sde, x, t)
    return a * eps_from_score(score, x, t, sde) - s * x0_from_score(score, x, t, sde)


def score_from_v(v: Tensor, x: Tensor, t: TimeLike, sde: SDE) -> Tensor:
    """From ``x_t = a x0 + std eps`` and ``v = a eps - std x0``: ``eps = (std x_t + a v) / (a^2 + std^2)``; then ``s = -eps / std``."""
    a, s = _coefs(sde, x, t, need_std=True)
    eps = (s * x + a * v) / (a * a + s * s)
    return -eps / s


# ----- whole score callables -------------------------------------------------------------------
def sigma_score(score: ScoreFn, sde: SDE) -> SigmaScoreFn:
    """Turn a time score ``s(x, t) = grad log p_t`` into NCSN/EDM's ``s_sigma(y) = grad log (p_0 * N(0, sigma^2 I))(y)``.

    Because ``x_t = a (x_0 + sigma eps)``, ``p_t(x) = a^-D p_sigma(x / a)`` and so
    ``s_sigma(y) = a s(a y, t(sigma))``, with ``t(sigma)`` from :func:`edm_time`.
    """
    def s_sigma(y: Tensor, sigma: SigmaLike) -> Tensor:
        tt = edm_time(sde, _batch("sigma", sigma, y))                           # (B,)
        a = _bcast(sde.mean_coef(tt).to(device=y.device, dtype=y.dtype), y)
        return a * score(a * y, tt.to(device=y.device, dtype=y.dtype))
    return s_sigma


def time_score(score_sigma: SigmaScoreFn, sde: SDE) -> ScoreFn:
    """The inverse of :func:`sigma_score`: ``s(x, t) = s_sigma(x / a, sigma_EDM(t)) / a``."""
    def s_time(x: Tensor, t: TimeLike) -> Tensor:
        tt = _times(sde, _batch("t", t, x))
        a = _bcast(sde.mean_coef(tt).to(device=x.device, dtype=x.dtype), x)
        sig = edm_sigma(sde, tt).to(device=x.device, dtype=x.dtype)
        return score_sigma(x / a, sig) / a
    return s_time


def edm_denoiser(score: ScoreFn, sde: SDE) -> SigmaScoreFn:
    """EDM's denoiser ``D(y; sigma) = E[x_0 | y] = y + sigma^2 s_sigma(y)`` (Tweedie) for a time score ``s(x, t)``.

    ``y = x_t / a(t)`` lives on the data scale; ``D`` has the data's units.
    """
    s_sigma = sigma_score(score, sde)

    def denoise(y: Tensor, sigma: SigmaLike) -> Tensor:
        sig = _bcast(_batch("sigma", sigma, y).to(device=y.device, dtype=y.dtype), y)
        return y + sig * sig * s_sigma(y, sigma)
    return denoise
