"""Forward noising processes: the VE, VP and sub-VP SDEs of Song et al. (2021).

Each SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` has a Gaussian
perturbation kernel ``p_t(x_t | x_0) = N(a(t) x_0, std(t)^2 I)``. We expose

* ``drift(x, t)`` = f, ``diffusion(t)`` = g;
* ``mean_coef(t)`` = a(t) and ``marginal_std(t)`` = std(t);
* the prior ``p_T`` (``prior_sample``, ``prior_log_prob``);
* the reverse-time drift ``f - g^2 s`` and the probability-flow drift ``f - g^2 s / 2``
  for any score callable ``s`` (see :mod:`scorebook.contract`).

All time arguments are floats or ``(B,)`` tensors; outputs follow ``x``'s device and dtype.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .contract import LOG_2PI, ScoreFn, TimeLike, as_time, check_positive, evaluate_score

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "geometric_sigmas", "check_sigmas"]


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample ``(B,)`` tensor so it broadcasts against ``x`` (B, *shape)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class SDE(ABC):
    """A forward SDE ``dx = f(x,t) dt + g(t) dw`` with a Gaussian kernel, on ``[0, T]``."""

    T: float = 1.0

    # ----- what each SDE defines -------------------------------------------------
    @abstractmethod
    def _drift_coef(self, t: Tensor) -> Tensor:
        """``f(x, t) = drift_coef(t) * x`` (all three SDEs have a linear drift). (B,)"""

    @abstractmethod
    def _diffusion(self, t: Tensor) -> Tensor:
        """g(t), (B,)."""

    @abstractmethod
    def _mean_coef(self, t: Tensor) -> Tensor:
        """a(t), (B,)."""

    @abstractmethod
    def _std(self, t: Tensor) -> Tensor:
        """std(t), (B,)."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior p_T."""

    # ----- time handling -------------------------------------------------------------
    def _t(self, t: TimeLike, x: Tensor) -> Tensor:
        tt = as_time(t, x)
        if (tt < 0).any() or (tt > self.T).any() or not torch.isfinite(tt).all():
            raise ValueError(f"t must lie in [0, {self.T}] for {type(self).__name__}; got values in "
                             f"[{tt.min().item():.4g}, {tt.max().item():.4g}]")
        return tt

    @staticmethod
    def _time_only(t: TimeLike) -> tuple[Tensor, Tensor]:
        """Turn a bare time into a (B,) tensor plus a dummy x for device/dtype."""
        tt = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        if not tt.is_floating_point():
            tt = tt.double()
        tt = tt.reshape(-1)
        return tt, tt.reshape(-1, 1)

    # ----- public API ----------------------------------------------------------------
    def drift(self, x: Tensor, t: TimeLike) -> Tensor:
        """f(x, t), shaped like x."""
        return _bcast(self._drift_coef(self._t(t, x)), x) * x

    def diffusion(self, t: TimeLike) -> Tensor:
        """g(t) as a (B,) tensor (a bare number gives shape (1,))."""
        tt, dummy = self._time_only(t)
        return self._diffusion(self._t(tt, dummy))

    def mean_coef(self, t: TimeLike) -> Tensor:
        """a(t) in ``x_t = a(t) x_0 + std(t) z``; (B,)."""
        tt, dummy = self._time_only(t)
        return self._mean_coef(self._t(tt, dummy))

    def marginal_std(self, t: TimeLike) -> Tensor:
        """std(t) in ``x_t = a(t) x_0 + std(t) z``; (B,)."""
        tt, dummy = self._time_only(t)
        return self._std(self._t(tt, dummy))

    def marginal(self, x0: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Mean ``a(t) x0`` (shaped like x0) and std ``std(t)`` (B,) of ``p_t(x_t | x_0)``."""
        tt = self._t(t, x0)
        return _bcast(self._mean_coef(tt), x0) * x0, self._std(tt)

    def perturb(self, x0: Tensor, t: TimeLike, noise: Tensor) -> Tensor:
        """``x_t = a(t) x0 + std(t) noise``, shaped like x0."""
        mean, std = self.marginal(x0, t)
        return mean + _bcast(std, x0) * noise

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw from ``p_T = N(0, prior_std^2 I)``; shape ``(B, *shape)``."""
        if generator is not None and device is None:
            device = generator.device
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return self.prior_std * z

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p_T(z) in nats, summed over all non-batch dimensions; (B,)."""
        d = z[0].numel()
        s2 = self.prior_std ** 2
        sq = z.reshape(z.shape[0], -1).pow(2).sum(1)
        return -0.5 * d * (LOG_2PI + math.log(s2)) - 0.5 * sq / s2

    def reverse_drift(self, score: ScoreFn, x: Tensor, t: TimeLike) -> Tensor:
        """Drift of the reverse-time SDE, ``f(x,t) - g(t)^2 s(x,t)`` (Anderson 1982); like x."""
        tt = self._t(t, x)
        g2 = _bcast(self._diffusion(tt) ** 2, x)
        return self.drift(x, tt) - g2 * evaluate_score(score, x, tt)

    def ode_drift(self, score: ScoreFn, x: Tensor, t: TimeLike) -> Tensor:
        """Probability-flow ODE drift, ``f(x,t) - g(t)^2 s(x,t) / 2``; like x."""
        tt = self._t(t, x)
        g2 = _bcast(self._diffusion(tt) ** 2, x)
        return self.drift(x, tt) - 0.5 * g2 * evaluate_score(score, x, tt)

    def check_eps(self, eps: float) -> float:
        """Validate the small end time ``eps`` at which reverse-time solvers stop: ``0 < eps < T``."""
        if not isinstance(eps, (int, float)) or not (0.0 < eps < self.T):
            raise ValueError(f"eps must lie in (0, {self.T}), got {eps!r}")
        return float(eps)

    def corrector_alpha(self, t: Tensor, dt: float) -> float:
        """The ``alpha_i`` of the Langevin corrector's step ``2 alpha (snr ||z|| / ||s||)^2`` (Song et al.
        2021, Algorithm 5): 1 unless the SDE has a discrete-chain analogue that shrinks the signal."""
        return 1.0

    def discretize(self, x: Tensor, t: TimeLike, dt: float) -> tuple[Tensor, Tensor]:
        """The forward transition from ``t - dt`` to ``t``: returns ``(f dt, G)`` with ``x_t = x + f dt + G z``.

        The default is the Euler--Maruyama discretisation, ``G = g(t) sqrt(dt)``. The
        reverse-diffusion predictor inverts this step (Song et al. 2021, eq. 46).
        """
        tt = self._t(t, x)
        return self.drift(x, tt) * dt, self._diffusion(tt) * math.sqrt(dt)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v:g}" for k, v in vars(self).items() if isinstance(v, (int, float)))
        return f"{type(self).__name__}({fields})"


class VESDE(SDE):
    """Variance exploding: ``dx = sqrt(d sigma^2/dt) dw`` with ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``.

    The kernel started at the data at t=0 has std ``sqrt(sigma(t)^2 - sigma_min^2)``, exactly.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        check_positive("sigma_min", sigma_min)
        check_positive("sigma_max", sigma_max)
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def _drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

    def _mean_coef(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _std(self, t: Tensor) -> Tensor:
        return torch.sqrt(torch.clamp(self.sigma(t) ** 2 - self.sigma_min ** 2, min=0.0))

    @property
    def prior_std(self) -> float:
        return math.sqrt(self.sigma_max ** 2 - self.sigma_min ** 2)

    def discretize(self, x: Tensor, t: TimeLike, dt: float) -> tuple[Tensor, Tensor]:
        """Exact VE transition from ``t - dt`` to ``t``: ``G = sqrt(sigma(t)^2 - sigma(t-dt)^2)`` (the SMLD chain)."""
        tt = self._t(t, x)
        t_prev = torch.clamp(tt - dt, min=0.0)
        g = torch.sqrt(torch.clamp(self.sigma(tt) ** 2 - self.sigma(t_prev) ** 2, min=0.0))
        return torch.zeros_like(x), g


class VPSDE(SDE):
    """Variance preserving: ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw``, ``beta`` linear in t (DDPM's limit)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        check_positive("beta_min", beta_min)
        check_positive("beta_max", beta_max)
        if beta_max < beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _int_beta(self, t: Tensor) -> Tensor:
        """int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def _drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def _diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def _mean_coef(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._int_beta(t))

    def _std(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._int_beta(t)))

    @property
    def prior_std(self) -> float:
        return 1.0

    def corrector_alpha(self, t: Tensor, dt: float) -> float:
        """``alpha_i = 1 - beta_i`` of the DDPM chain, taken exactly as ``a(t)^2 / a(t - dt)^2 = exp(-int beta)``;
        it stays in (0, 1] on any grid, where the first-order ``1 - beta(t) dt`` goes negative on coarse ones."""
        return float((self._mean_coef(t) / self._mean_coef(t - dt)) ** 2)


class SubVPSDE(VPSDE):
    """Sub-VP: the VP drift with ``g(t)^2 = beta(t) (1 - exp(-2 int_0^t beta))``; std(t) = 1 - a(t)^2."""

    def _diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self._int_beta(t)))

    def _std(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self._int_beta(t))


def check_sigmas(sigmas: Tensor) -> Tensor:
    """Validate a noise schedule: 1-D, positive, finite and strictly decreasing."""
    s = torch.as_tensor(sigmas)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {tuple(s.shape)}")
    check_positive("sigmas", s)
    if s.numel() > 1 and not (s[1:] < s[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing (largest noise first), got {s.tolist()}")
    return s


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> Tensor:
    """``n`` noise levels from ``sigma_max`` down to ``sigma_min`` in geometric progression; (n,) float64."""
    check_positive("sigma_max", sigma_max)
    check_positive("sigma_min", sigma_min)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > 1 and sigma_max <= sigma_min:
        raise ValueError(f"sigma_max must exceed sigma_min, got {sigma_max} <= {sigma_min}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


# ----- choosing the noise levels (Song & Ermon 2020, "Improved techniques") ----------------------
__all__ += ["max_pairwise_distance", "shell_overlap", "ratio_for_overlap", "overlap_sigmas"]
_BAND = 3.0 / math.sqrt(2.0)  # the norm of N(0, s^2 I_D) has standard deviation ~ s / sqrt(2): 3 of them


def max_pairwise_distance(x: Tensor, chunk: int = 1024) -> float:
    """The largest Euclidean distance between two examples of ``x`` (N, *shape), computed exactly.

    Technique 1 of Song & Ermon (2020) takes ``sigma_max`` about this large, so that the noisiest
    level can carry a sample from any training point to any other. Costs O(N^2 D) in chunks of
    ``chunk`` rows.
    """
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"x must be a tensor of at least two examples shaped (N, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    flat = x.reshape(x.shape[0], -1)                                        # (N, D)
    if not torch.isfinite(flat).all():
        raise ValueError("x contains NaN or infinite values")
    best = 0.0
    for i in range(0, flat.shape[0], chunk):
        best = max(best, float(torch.cdist(flat[i:i + chunk], flat).max()))  # (chunk, N) distances
    return best


def shell_overlap(ratio: float | Tensor, dim: int, exact: bool = True) -> Tensor:
    """Overlap of consecutive noise levels, Technique 2 of Song & Ermon (2020); a probability, shaped like ``ratio``.

    With ``ratio = sigma_{i-1} / sigma_i >= 1``: the probability that ``||x||`` for
    ``x ~ N(0, sigma_i^2 I_D)`` falls within three standard deviations of the typical norm of the
    previous level, the band ``sigma_{i-1} (sqrt(D) -+ 3 / sqrt(2))``. ``exact=False`` is the paper's
    normal approximation ``Phi(sqrt(2D)(g-1) + 3g) - Phi(sqrt(2D)(g-1) - 3g)``; ``exact=True`` uses
    the chi distribution of ``||x|| / sigma_i`` for the same band (clipped at 0).
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    g = torch.as_tensor(ratio, dtype=torch.float64)
    if not torch.isfinite(g).all() or (g < 1).any():
        raise ValueError(f"ratio must be finite and >= 1 (sigma_(i-1) / sigma_i), got {ratio!r}")
    root_d = math.sqrt(dim)
    if not exact:
        centre = math.sqrt(2 * dim) * (g - 1)
        phi = torch.special.ndtr
        return phi(centre + 3 * g) - phi(centre - 3 * g)
    lo = torch.clamp(g * (root_d - _BAND), min=0.0)                        # band of the previous level's norm,
    hi = g * (root_d + _BAND)                                              # in units of sigma_i
    chi2_cdf = lambda r: torch.special.gammainc(torch.full_like(r, dim / 2), r * r / 2)  # P(||z|| <= r), z ~ N(0, I_D)
    return chi2_cdf(hi) - chi2_cdf(lo)


def ratio_for_overlap(dim: int, overlap: float = 0.5, exact: bool = True) -> float:
    """The ratio ``sigma_{i-1} / sigma_i`` at which :func:`shell_overlap` equals ``overlap`` (Song & Ermon 2020).

    Solved by bisection on the decreasing branch. Raises ``ValueError`` when no ratio reaches
    ``overlap``: in ``dim <= 4`` the band holds zero, so the overlap never falls below ~0.997.
    """
    if not (isinstance(overlap, (int, float)) and 0.0 < overlap < 1.0):
        raise ValueError(f"overlap must lie in (0, 1), got {overlap!r}")
    f = lambda g: float(shell_overlap(g, dim, exact)) - overlap
    if f(1.0) <= 0:
        raise ValueError(f"overlap={overlap} is at or above the overlap of equal levels, {f(1.0) + overlap:.4f}")
    hi = 2.0
    while f(hi) > 0:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(f"no ratio brings the overlap down to {overlap} in dim={dim}: for dim <= 4 the band "
                             f"around the previous level's norm contains 0 and the criterion cannot be met")
    lo = 1.0
    for _ in range(200):                                                   # f(lo) > 0 >= f(hi)
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        if hi - lo < 1e-13:
            break
    return 0.5 * (lo + hi)


def overlap_sigmas(sigma_max: float, sigma_min: float, dim: int, overlap: float = 0.5, exact: bool = True) -> Tensor:
    """The fewest geometric levels from ``sigma_max`` to ``sigma_min`` whose consecutive overlap is at least
    ``overlap`` (Technique 2 of Song & Ermon 2020); (L,) float64."""
    check_positive("sigma_max", sigma_max)
    check_positive("sigma_min", sigma_min)
    if sigma_max <= sigma_min:
        raise ValueError(f"sigma_max must exceed sigma_min, got {sigma_max} <= {sigma_min}")
    gamma = ratio_for_overlap(dim, overlap, exact)
    n = math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9) + 1
    return geometric_sigmas(sigma_max, sigma_min, n)

__all__ += ["noise_to_time", "sigma_score"]


def noise_to_time(sde: SDE, sigma: float | Tensor, iters: int = 64) -> Tensor:
    """The time ``t`` at which the noise-to-signal ratio ``std(t) / a(t)`` of ``sde`` equals ``sigma``; (B,) float64.

    ``x_t / a(t) = x_0 + (std(t) / a(t)) z``, so ``t`` is where the SDE's kernel, rescaled by ``a(t)``, is
    NCSN's perturbation by noise of standard deviation ``sigma``. The ratio increases with ``t`` for the
    VE, VP and sub-VP SDEs; we solve by bisection on ``[0, T]``: 64 halvings reach float64 resolution.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu().reshape(-1)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    ratio = lambda t: sde._std(t) / sde._mean_coef(t)                     # noqa: E731  (t validated below)
    top = float(ratio(torch.tensor([sde.T], dtype=torch.float64)))
    if (s > top).any():
        raise ValueError(f"sigma must be at most std(T)/a(T) = {top:.6g} for {sde!r}, got max {float(s.max()):.6g}")
    lo, hi = torch.zeros_like(s), torch.full_like(s, sde.T)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = ratio(mid) < s
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def sigma_score(sde: SDE, score: ScoreFn) -> ScoreFn:
    """Turn a time-conditioned score ``score(x, t)`` for ``sde`` into NCSN's noise-conditioned ``score(y, sigma)``.

    ``p_t(x) = a^-D q_sigma(x / a)`` with ``q_sigma = p_0 * N(0, sigma^2 I)`` and ``sigma = std(t)/a(t)``, so
    ``grad log q_sigma(y) = a(t) s(a(t) y, t)``: one network serves the SDE samplers and annealed Langevin.
    """
    def score_sigma(y: Tensor, sigma: TimeLike) -> Tensor:
        sig = as_time(sigma, y)                                            # (B,)
        levels, where = torch.unique(sig.detach().double().cpu(), return_inverse=True)   # usually one level
        t = noise_to_time(sde, levels)[where].to(device=y.device, dtype=y.dtype)          # (B,)
        a = _bcast(sde.mean_coef(t).to(device=y.device, dtype=y.dtype), y)
        return a * evaluate_score(score, a * y, t)

    return score_sigma
