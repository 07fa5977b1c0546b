"""Exact densities: Gaussians and Gaussian mixtures, with closed-form scores at every noise level.

A Gaussian mixture stays a Gaussian mixture when it is convolved with Gaussian noise
or pushed through a linear-drift SDE, so its score is known exactly at every sigma and
every time t. That makes it the book's oracle: it separates model error from sampler error.

Each component covariance is stored by its eigendecomposition ``Sigma_k = U_k diag(lam_k) U_k^T``;
then ``a^2 Sigma_k + s^2 I = U_k diag(a^2 lam_k + s^2) U_k^T`` for any per-sample ``a`` and ``s``,
so densities and scores of every perturbed version cost one batched rotation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .contract import LOG_2PI, ScoreFn, TimeLike, as_time, check_finite, check_positive

__all__ = [
    "GaussianMixture",
    "Gaussian",
    "song_ermon_mixture",
    "eight_gaussians_mixture",
    "make_toy",
    "TOY_NAMES",
    "oracle_score",
]

_F64 = torch.float64


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact oracles, except on Apple MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else _F64


def _as64(name: str, value) -> Tensor:
    """Parameters are parsed and stored canonically in float64 on the CPU; ``.to(device)`` moves them."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().to(_F64)
    else:  # parse Python numbers and lists straight into float64 (never via float32)
        t = torch.as_tensor(value, dtype=_F64)
    check_finite(name, t)
    return t


def _parse_stds(stds, k: int, d: int) -> Tensor:
    """Standard deviations -> (K, D, D) covariances.

    scalar: one isotropic std for every component.  (K,): an isotropic std per component.
    (K, D): diagonal standard deviations per component.
    """
    c = _as64("stds", stds)
    if c.ndim == 0:
        check_positive("stds", c)
        return (c ** 2) * torch.eye(d, dtype=_F64).expand(k, d, d).clone()
    if c.ndim == 1:
        if c.shape[0] != k:
            raise ValueError(f"a 1-D stds is one isotropic std per component: expected {k} entries, got {c.shape[0]}")
        check_positive("stds", c)
        return (c ** 2)[:, None, None] * torch.eye(d, dtype=_F64)
    if c.ndim == 2:
        if c.shape != (k, d):
            raise ValueError(f"a 2-D stds is ({k}, {d}) diagonal standard deviations, got shape {tuple(c.shape)}")
        check_positive("stds", c)
        return torch.diag_embed(c ** 2)
    raise ValueError(f"stds must be a scalar, ({k},) or ({k}, {d}); got shape {tuple(c.shape)}. "
                     f"For full covariance matrices pass covs= of shape ({k}, {d}, {d})")


def _parse_covs(covs, k: int, d: int) -> Tensor:
    """Full covariance matrices, (K, D, D), and nothing else: their meaning never depends on the shape."""
    c = _as64("covs", covs)
    if c.shape != (k, d, d):
        hint = (" For standard deviations (a scalar, one per component, or diagonal) pass stds= instead."
                if c.ndim < 3 else "")
        raise ValueError(f"covs must be full covariance matrices of shape ({k}, {d}, {d}), got shape "
                         f"{tuple(c.shape)}.{hint}")
    return c.clone()


class GaussianMixture:
    """``p(x) = sum_k w_k N(x; mu_k, Sigma_k)`` in any dimension, stored in float64.

    Give the spread of the components in exactly one of two ways, so that a number never
    means a variance in one place and a standard deviation in another:

    Args:
        means: (K, D) component means (or (K,) for K one-dimensional components).
        covs: (K, D, D) full covariance matrices (variances on the diagonal).
        weights: (K,) non-negative, summing to 1. Defaults to uniform.
        stds: standard deviations instead of ``covs``: a scalar (isotropic, all components),
            (K,) (isotropic, one per component) or (K, D) (diagonal). Default ``1.0`` when
            neither is given.
    """

    def __init__(self, means, covs=None, weights=None, *, stds=None):
        mu = _as64("means", means)
        if mu.ndim == 1:
            mu = mu[:, None]  # K one-dimensional components
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(mu.shape)}")
        k, d = mu.shape
        if k == 0 or d == 0:
            raise ValueError(f"a mixture needs at least one component in at least one dimension; means has shape "
                             f"{tuple(mu.shape)}")
        w = torch.full((k,), 1.0 / k, dtype=_F64) if weights is None else _as64("weights", weights)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means, got {tuple(w.shape)}")
        if (w < 0).any():
            raise ValueError(f"weights must be non-negative, got {w.tolist()}")
        if abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {float(w.sum()):.6g}")
        if covs is not None and stds is not None:
            raise ValueError("pass either covs= (full covariance matrices) or stds= (standard deviations), not both")
        cov = _parse_covs(covs, k, d) if covs is not None else _parse_stds(1.0 if stds is None else stds, k, d)
        if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-10, rtol=1e-8):
            raise ValueError("covariance matrices must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if (evals <= 0).any():
            bad = int((evals.min(dim=-1).values <= 0).nonzero()[0])
            raise ValueError(f"covariance of component {bad} is not positive definite "
                             f"(smallest eigenvalue {float(evals[bad].min()):.3g})")
        self.means = mu            # (K, D)
        self.covs = cov            # (K, D, D)
        self.weights = w           # (K,)
        self._evals = evals        # (K, D)
        self._evecs = evecs        # (K, D, D), columns are eigenvectors

    # ----- basic properties ---------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> "GaussianMixture":
        """A copy whose parameters live on ``device``."""
        new = object.__new__(type(self))
        for name in ("means", "covs", "weights", "_evals", "_evecs"):
            setattr(new, name, getattr(self, name).to(device, _work_dtype(device)))
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={self.n_components}, D={self.dim})"

    def _check_x(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        return check_finite("x", x)

    # ----- the one computation everything uses ------------------------------------------
    def _components(self, x: Tensor, a: Tensor | None = None, s2: Tensor | None = None):
        """Per-component log-densities and scores of ``sum_k w_k N(a mu_k, a^2 Sigma_k + s2 I)``.

        x: (B, D); a, s2: (B,) or None (meaning a=1, s2=0). Returns
        log_wN (B, K) = log w_k + log N_k(x) and comp_score (B, K, D), in float64 (float32 on Apple MPS, which has no float64).
        """
        dev = self._check_x(x).device
        work = _work_dtype(dev)
        x = x.to(work)
        mu, lam, u = (t.to(dev, work) for t in (self.means, self._evals, self._evecs))
        b = x.shape[0]
        a = torch.ones(b, dtype=work, device=dev) if a is None else a.to(dev, work)
        s2 = torch.zeros(b, dtype=work, device=dev) if s2 is None else s2.to(dev, work)
        diff = x[:, None, :] - a[:, None, None] * mu[None]                  # (B, K, D)
        y = torch.einsum("bke,ked->bkd", diff, u)                           # (B, K, D) eigen-coordinates
        var = a[:, None, None] ** 2 * lam[None] + s2[:, None, None]         # (B, K, D)
        log_n = -0.5 * ((y ** 2 / var) + torch.log(var)).sum(-1) - 0.5 * self.dim * LOG_2PI  # (B, K)
        log_wn = torch.log(self.weights.to(dev, work))[None] + log_n         # (B, K)
        comp_score = -torch.einsum("ked,bkd->bke", u, y / var)               # (B, K, D)
        return log_wn, comp_score

    def _log_prob_score(self, x: Tensor, a=None, s2=None) -> tuple[Tensor, Tensor]:
        log_wn, comp_score = self._components(x, a, s2)
        logp = torch.logsumexp(log_wn, dim=1)                                # (B,)
        resp = torch.softmax(log_wn, dim=1)                                  # (B, K)
        score = (resp[..., None] * comp_score).sum(1)                        # (B, D)
        return logp, score

    # ----- public API -----------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats; x (B, D) -> (B,), in x's dtype and device."""
        logp, _ = self._log_prob_score(x)
        return logp.to(x.dtype)

    def score(self, x: Tensor) -> Tensor:
        """Closed-form ``grad_x log p(x) = sum_k r_k(x) (-Sigma_k^{-1}(x - mu_k))``; (B, D)."""
        _, s = self._log_prob_score(x)
        return s.to(x.dtype)

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities ``r_k(x)``; (B, K)."""
        log_wn, _ = self._components(x)
        return torch.softmax(log_wn, dim=1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples; (n, D) float64 (float32 on MPS) on the generator's (or the mixture's) device."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        dev = generator.device if generator is not None else self.device
        work = _work_dtype(dev)
        mu, lam, u, w = (t.to(dev, work) for t in (self.means, self._evals, self._evecs, self.weights))
        k = torch.multinomial(w, n, replacement=True, generator=generator)          # (n,)
        z = torch.randn(n, self.dim, generator=generator, device=dev, dtype=work)    # (n, D)
        return mu[k] + torch.einsum("nde,ne->nd", u[k], lam[k].sqrt() * z)

    def perturb(self, sigma: float) -> "GaussianMixture":
        """The exact density of ``x + sigma z``, ``z ~ N(0, I)``: every covariance gains ``sigma^2 I``."""
        if not math.isfinite(float(sigma)) or float(sigma) < 0:
            raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
        cpu = self.to("cpu")
        eye = torch.eye(self.dim, dtype=_F64)
        return GaussianMixture(cpu.means, cpu.covs + float(sigma) ** 2 * eye, cpu.weights).to(self.device)

    def marginal(self, sde, t: float) -> "GaussianMixture":
        """The exact law at time ``t`` of the forward ``sde`` started from this mixture.

        ``x_t = a(t) x_0 + std(t) z`` maps each component to ``N(a mu_k, a^2 Sigma_k + std^2 I)``.
        """
        a = float(sde.mean_coef(float(t)))
        s = float(sde.marginal_std(float(t)))
        cpu = self.to("cpu")
        eye = torch.eye(self.dim, dtype=_F64)
        return GaussianMixture(a * cpu.means, a * a * cpu.covs + s * s * eye, cpu.weights).to(self.device)

    # per-sample versions used by the oracle
    def _perturbed_log_prob_score(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return self._log_prob_score(x, None, sigma.to(_work_dtype(sigma.device)) ** 2)

    def _marginal_log_prob_score(self, x: Tensor, sde, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.to(_work_dtype(t.device))
        return self._log_prob_score(x, sde.mean_coef(t), sde.marginal_std(t) ** 2)


class Gaussian(GaussianMixture):
    """``N(mean, cov)`` in any dimension.

    ``cov`` is the (D, D) covariance matrix; or give ``std=`` instead, a scalar (isotropic) or a
    (D,) vector (diagonal) of standard deviations. Default: ``std=1``.
    """

    def __init__(self, mean, cov=None, *, std=None):
        m = _as64("mean", mean).reshape(-1)
        if cov is not None and std is not None:
            raise ValueError("pass either cov= (a covariance matrix) or std= (standard deviations), not both")
        if cov is not None:
            c = _as64("cov", cov)
            if c.shape != (m.numel(), m.numel()):
                hint = " For a standard deviation (scalar or per coordinate) pass std= instead." if c.ndim < 2 else ""
                raise ValueError(f"cov must be a ({m.numel()}, {m.numel()}) covariance matrix, got shape "
                                 f"{tuple(c.shape)}.{hint}")
            super().__init__(m[None], c[None], torch.ones(1, dtype=_F64))
        else:
            sd = _as64("std", 1.0 if std is None else std)
            if sd.ndim > 1:
                raise ValueError(f"std must be a scalar or a ({m.numel()},) vector, got shape {tuple(sd.shape)}; "
                                 f"for a covariance matrix pass cov=")
            super().__init__(m[None], None, torch.ones(1, dtype=_F64), stds=sd[None] if sd.ndim == 1 else sd)

    @property
    def mean(self) -> Tensor:
        return self.means[0]

    @property
    def cov(self) -> Tensor:
        return self.covs[0]

    def entropy(self) -> float:
        """Differential entropy in nats: ``D/2 log(2 pi e) + 1/2 log det Sigma``."""
        return 0.5 * self.dim * (LOG_2PI + 1.0) + 0.5 * float(torch.log(self._evals[0]).sum())


def song_ermon_mixture() -> GaussianMixture:
    """``1/5 N((-5,-5), I) + 4/5 N((5,5), I)`` from Song & Ermon (2019), Appendix B."""
    return GaussianMixture([[-5.0, -5.0], [5.0, 5.0]], weights=[0.2, 0.8], stds=1.0)


def eight_gaussians_mixture(radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """Eight equal-weight isotropic Gaussians evenly spaced on a circle of ``radius``."""
    ang = torch.arange(8, dtype=_F64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return GaussianMixture(means, stds=std)


# ----- 2-D toy data sets ------------------------------------------------------------------
def _randn(n, g, *shape):
    return torch.randn(n, *shape, generator=g, dtype=_F64)


def _rand(n, g, *shape):
    return torch.rand(n, *shape, generator=g, dtype=_F64)


def _swiss_roll(n, g):
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5.0
    return x + 0.1 * _randn(n, g, 2)


def _moons(n, g):
    n1 = n // 2
    a = math.pi * _rand(n, g)
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where((torch.arange(n) < n1)[:, None], upper, lower)
    x = (x - torch.tensor([0.5, 0.25], dtype=_F64)) * 2.0
    return x + 0.1 * _randn(n, g, 2)


def _circles(n, g):
    a = 2 * math.pi * _rand(n, g)
    r = torch.where(torch.arange(n) < n // 2, 2.0, 1.0).to(_F64)
    x = r[:, None] * torch.stack([torch.cos(a), torch.sin(a)], 1)
    return x + 0.08 * _randn(n, g, 2)


def _checkerboard(n, g):
    x1 = 4 * _rand(n, g) - 2                                   # column in [-2, 2)
    col = torch.floor(x1).long() % 2                           # 0 or 1
    x2 = _rand(n, g) + 2 * torch.randint(0, 2, (n,), generator=g).to(_F64) - 2  # a cell in [-2,-1) or [0,1)
    x2 = x2 + col.to(_F64)                                     # shift alternate columns by one cell
    return torch.stack([x1, x2], 1)


def _pinwheel(n, g, n_arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    arm = torch.randint(0, n_arms, (n,), generator=g).to(_F64)
    feats = _randn(n, g, 2) * torch.tensor([radial_std, tangential_std], dtype=_F64)
    feats[:, 0] += 1.0
    ang = arm * 2 * math.pi / n_arms + rate * torch.exp(feats[:, 0])
    c, s = torch.cos(ang), torch.sin(ang)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (n, 2, 2)
    return 2.0 * torch.einsum("nij,nj->ni", rot, feats)


def _eight(n, g):
    return eight_gaussians_mixture().sample(n, generator=g)


def _song_ermon(n, g):
    return song_ermon_mixture().sample(n, generator=g)


_TOYS = {
    "swiss_roll": _swiss_roll,
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
    "song_ermon": _song_ermon,
}
TOY_NAMES: tuple[str, ...] = tuple(_TOYS)


def make_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points of the 2-D toy data set ``name`` (one of ``TOY_NAMES``); (n, 2) float64 on CPU."""
    if name not in _TOYS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("make_toy draws on the CPU: pass a CPU generator and move the result with .to(device)")
    return _TOYS[name](n, generator)


# ----- the oracle -------------------------------------------------------------------------
def oracle_score(dist: GaussianMixture, sde=None) -> ScoreFn:
    """The exact score of ``dist`` at every noise level, as a ``score(x, t)`` callable.

    * ``sde is None``: ``t`` is the noise std sigma; returns ``grad log (p * N(0, sigma^2 I))(x)``
      (``t = 0`` gives the clean score).
    * ``sde`` given: ``t`` is the SDE time; returns ``grad log p_t(x)`` of the forward marginal.

    ``t`` may differ per sample. The result has x's dtype and device.
    """
    if not isinstance(dist, GaussianMixture):
        raise TypeError(f"oracle_score needs a Gaussian or GaussianMixture, got {type(dist).__name__}")

    def score(x: Tensor, t: TimeLike) -> Tensor:
        tt = as_time(t, x)
        check_finite("the noise level or time t", tt)
        if sde is None:
            if (tt < 0).any():
                raise ValueError("the noise level sigma = t must be >= 0")
            _, s = dist._perturbed_log_prob_score(x, tt)
        else:
            _, s = dist._marginal_log_prob_score(x, sde, tt)
        return s.to(x.dtype)

    score.__doc__ = f"exact score of {dist!r}" + ("" if sde is None else f" under {sde!r}")
    return score


__all__ += ["conditional_mixture", "sample_labelled", "oracle_classifier", "posterior_mixture",
            "oracle_measurement_log_likelihood"]


# ----- conditioning: on a label, and on a noisy linear measurement ----------------------------
def _class_ids(mixture: GaussianMixture, classes) -> Tensor:
    """The class of each component as a (K,) int64 tensor; ``None`` means component k is class k."""
    k = mixture.n_components
    if classes is None:
        return torch.arange(k)
    c = torch.as_tensor(classes)
    if c.shape != (k,) or c.is_floating_point() or (c < 0).any():
        raise ValueError(f"classes must hold one non-negative integer class per component, shape ({k},); "
                         f"got {c.tolist() if c.ndim <= 1 else tuple(c.shape)}")
    c = c.to(torch.int64)
    missing = sorted(set(range(int(c.max()) + 1)) - set(c.tolist()))
    if missing:
        raise ValueError(f"classes must use every label 0..{int(c.max())}; no component has class {missing}")
    return c


def conditional_mixture(mixture: GaussianMixture, label: int, classes=None) -> GaussianMixture:
    """``p(x | y = label)``: the components of class ``label``, their weights renormalised.

    ``classes`` gives the class of each component, (K,) integers (default: component k is class k).
    Bayes' rule with ``p(y = c | k) = 1[c_k = c]``: ``p(x | c) = sum_{k: c_k = c} w_k N_k(x) / sum_{k: c_k = c} w_k``.
    """
    c = _class_ids(mixture, classes)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= int(c.max()):
        raise ValueError(f"label must be an integer class in 0..{int(c.max())}, got {label!r}")
    cpu = mixture.to("cpu")
    keep = c == label                                                           # (K,) bool
    w = cpu.weights[keep]
    if float(w.sum()) == 0.0:
        raise ValueError(f"class {label} has zero prior weight: p(x | y = {label}) is undefined")
    return GaussianMixture(cpu.means[keep], cpu.covs[keep], w / w.sum()).to(mixture.device)


def sample_labelled(mixture: GaussianMixture, n: int, generator: torch.Generator | None = None,
                    classes=None) -> tuple[Tensor, Tensor]:
    """``n`` draws ``(x, y)`` from the joint law: a component k ~ w, x ~ N_k, y = class of k.

    Returns x (n, D) float64 and y (n,) int64, on the generator's (or the mixture's) device.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    c = _class_ids(mixture, classes)
    dev = generator.device if generator is not None else mixture.device
    work = _work_dtype(dev)
    mu, lam, u, w = (t.to(dev, work) for t in (mixture.means, mixture._evals, mixture._evecs, mixture.weights))
    k = torch.multinomial(w, n, replacement=True, generator=generator)           # (n,) components
    z = torch.randn(n, mixture.dim, generator=generator, device=dev, dtype=work)   # (n, D)
    x = mu[k] + torch.einsum("nde,ne->nd", u[k], lam[k].sqrt() * z)
    return x, c.to(dev)[k]


def _marginal_coefs(x: Tensor, sde, t: TimeLike) -> tuple[Tensor, Tensor]:
    """Per-sample ``a`` and ``std^2`` of ``x_t = a x_0 + std z``: SDE time with an SDE, noise std otherwise."""
    tt = as_time(t, x)
    check_finite("the noise level or time t", tt)
    if sde is None:
        if (tt < 0).any():
            raise ValueError("the noise level sigma = t must be >= 0")
        return torch.ones_like(tt), tt ** 2
    return sde.mean_coef(tt).to(x.dtype), sde.marginal_std(tt).to(x.dtype) ** 2


def oracle_classifier(mixture: GaussianMixture, sde=None, classes=None):
    """The exact time-dependent classifier ``log p_t(y = c | x_t)`` of a labelled mixture, as ``f(x, t) -> (B, C)``.

    ``p_t(c | x) = sum_{k: c_k = c} r_k(x)``, with ``r_k`` the responsibilities of the mixture at
    time ``t`` (``t`` is the SDE time with ``sde``, the noise std sigma without). Differentiable in
    ``x``, so ``grad_x log p_t(c | x)`` is the exact likelihood score for guidance. Log-probabilities
    in nats, float64 (float32 on MPS), then cast to x's dtype.
    """
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"oracle_classifier needs a GaussianMixture, got {type(mixture).__name__}")
    c = _class_ids(mixture, classes)
    n_classes = int(c.max()) + 1

    def log_probs(x: Tensor, t: TimeLike) -> Tensor:
        a, s2 = _marginal_coefs(x.to(_work_dtype(x.device)), sde, t)
        log_wn, _ = mixture._components(x, a, s2)                                   # (B, K)
        log_r = torch.log_softmax(log_wn, dim=1)                                     # log r_k(x_t)
        onehot = torch.nn.functional.one_hot(c.to(x.device), n_classes).to(log_r.dtype)  # (K, C)
        # log sum_{k in c} r_k, computed stably as a logsumexp with -inf for components outside c
        masked = log_r[:, :, None] + torch.log(onehot)[None]                        # (B, K, C)
        return torch.logsumexp(masked, dim=1).to(x.dtype)                           # (B, C)

    log_probs.__doc__ = f"exact log p_t(y | x) of {mixture!r}" + ("" if sde is None else f" under {sde!r}")
    return log_probs


def _check_measurement(mixture: GaussianMixture, A, y, noise_std) -> tuple[Tensor, Tensor, float]:
    a = _as64("A", A)
    if a.ndim == 1:
        a = a[None]                                                                  # one measurement
    if a.ndim != 2 or a.shape[1] != mixture.dim or a.shape[0] < 1:
        raise ValueError(f"A must be an (M, {mixture.dim}) matrix, got shape {tuple(a.shape)}")
    yy = _as64("y", y).reshape(-1)
    if yy.shape != (a.shape[0],):
        raise ValueError(f"y must hold M = {a.shape[0]} measurements, got {yy.numel()}")
    if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not (
            math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std must be a finite number > 0 (with no noise the posterior is singular on "
                         f"the measured directions), got {noise_std!r}")
    return a, yy, float(noise_std)


def posterior_mixture(mixture: GaussianMixture, A, y, noise_std: float) -> GaussianMixture:
    """The exact posterior ``p(x | y)`` for ``y = A x + n``, ``n ~ N(0, noise_std^2 I)``: again a mixture.

    Per component (Bayes' rule for a linear-Gaussian model): ``S_k = A Sigma_k A^T + s^2 I``,
    gain ``G_k = Sigma_k A^T S_k^{-1}``, mean ``mu_k + G_k (y - A mu_k)``, covariance
    ``Sigma_k - G_k A Sigma_k``; weights ``proportional to w_k N(y; A mu_k, S_k)``. ``A`` is (M, D) (or (D,)
    for one measurement), ``y`` (M,).
    """
    a, yy, s = _check_measurement(mixture, A, y, noise_std)
    cpu = mixture.to("cpu")
    mu, cov, m = cpu.means, cpu.covs, a.shape[0]
    S = a @ cov @ a.T + s * s * torch.eye(m, dtype=_F64)                          # (K, M, M)
    G = torch.linalg.solve(S, a @ cov).transpose(-1, -2)                          # (K, D, M)  Sigma A^T S^-1
    resid = yy[None] - mu @ a.T                                                    # (K, M)
    post_mu = mu + torch.einsum("kdm,km->kd", G, resid)                            # (K, D)
    post_cov = cov - G @ a @ cov                                                   # (K, D, D)
    post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))                        # symmetric to rounding
    L = torch.linalg.cholesky(S)
    z = torch.linalg.solve_triangular(L, resid[..., None], upper=False)[..., 0]    # (K, M)  L^-1 r
    log_ev = (-0.5 * (z ** 2).sum(-1) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
              - 0.5 * m * LOG_2PI)                                                 # (K,) log N(y; A mu_k, S_k)
    w = torch.softmax(torch.log(cpu.weights) + log_ev, dim=0)
    return GaussianMixture(post_mu, post_cov, w).to(mixture.device)


def oracle_measurement_log_likelihood(mixture: GaussianMixture, A, y, noise_std: float, sde=None):
    """The exact ``log p_t(y | x_t)`` for ``y = A x_0 + n``, as ``f(x, t) -> (B,)`` in nats.

    ``x_t = a x_0 + std z`` (SDE time ``t`` with ``sde``, noise std ``t`` without). Given ``x_t`` and
    component k, ``x_0`` is Gaussian with mean ``m_k = mu_k + a Sigma_k (a^2 Sigma_k + std^2 I)^{-1}
    (x_t - a mu_k)`` and covariance ``C_k = std^2 Sigma_k (a^2 Sigma_k + std^2 I)^{-1}``, so
    ``p_t(y | x_t) = sum_k r_k(x_t) N(y; A m_k, A C_k A^T + s^2 I)``. Differentiable in ``x``.
    At ``t = 0`` it is ``N(y; A x, s^2 I)``.
    """
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"oracle_measurement_log_likelihood needs a GaussianMixture, got {type(mixture).__name__}")
    a_mat, yy, s = _check_measurement(mixture, A, y, noise_std)
    m = a_mat.shape[0]

    def log_lik(x: Tensor, t: TimeLike) -> Tensor:
        work = _work_dtype(x.device)
        a, s2 = _marginal_coefs(x.to(work), sde, t)                                 # (B,), (B,)
        log_wn, _ = mixture._components(x, a, s2)                                   # (B, K)
        log_r = torch.log_softmax(log_wn, dim=1)                                     # log r_k(x_t)
        mu, lam, u = (v.to(x.device, work) for v in (mixture.means, mixture._evals, mixture._evecs))
        am, yv = a_mat.to(x.device, work), yy.to(x.device, work)
        xe = x.to(work)
        an, s2n = a[:, None, None], s2[:, None, None]                               # (B, 1, 1)
        diff = torch.einsum("bke,ked->bkd", xe[:, None] - an * mu[None], u)          # (B, K, D) eigen-coords
        m_k = mu[None] + torch.einsum("ked,bkd->bke", u, an * lam[None] / (an ** 2 * lam[None] + s2n) * diff)
        c_eig = s2n * lam[None] / (an ** 2 * lam[None] + s2n)                        # (B, K, D) eigenvalues of C_k
        au = torch.einsum("md,kde->kme", am, u)                                      # (K, M, D)  A U_k
        cov_y = torch.einsum("kme,bke,kne->bkmn", au, c_eig, au) + s * s * torch.eye(m, dtype=work, device=x.device)
        resid = yv - torch.einsum("md,bkd->bkm", am, m_k)                            # (B, K, M)
        L = torch.linalg.cholesky(cov_y)                                             # (B, K, M, M)
        z = torch.linalg.solve_triangular(L, resid[..., None], upper=False)[..., 0]
        log_n = (-0.5 * (z ** 2).sum(-1) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
                 - 0.5 * m * LOG_2PI)                                                # (B, K)
        return torch.logsumexp(log_r + log_n, dim=1).to(x.dtype)                     # (B,)

    log_lik.__doc__ = f"exact log p_t(y | x_t) for {mixture!r}" + ("" if sde is None else f" under {sde!r}")
    return log_lik


__all__ += ["gaussian_cross_entropy", "mixture_entropy"]


# ----- entropies and cross-entropies ----------------------------------------------------------
def gaussian_cross_entropy(dist: GaussianMixture, mean=0.0, std: float = 1.0) -> float:
    """``E_p[-log N(x; mean, std^2 I)]`` in nats for ``p = dist``, in closed form.

    Only the first two moments of ``p`` enter: ``D/2 log(2 pi std^2) + E||x - mean||^2 / (2 std^2)``
    with ``E||x - mean||^2 = sum_k w_k (||mu_k - mean||^2 + tr Sigma_k)``. ``mean`` is a number or a (D,) vector.
    """
    if not isinstance(dist, GaussianMixture):
        raise TypeError(f"dist must be a Gaussian or GaussianMixture, got {type(dist).__name__}")
    check_positive("std", std)
    cpu = dist.to("cpu")
    m = _as64("mean", mean).reshape(-1)
    if m.numel() not in (1, dist.dim):
        raise ValueError(f"mean must be a number or a ({dist.dim},) vector, got {m.numel()} entries")
    sq = ((cpu.means - m) ** 2).sum(1) + torch.diagonal(cpu.covs, dim1=-2, dim2=-1).sum(-1)   # (K,)
    second = float((cpu.weights * sq).sum())                                                 # E||x - mean||^2
    return 0.5 * dist.dim * (LOG_2PI + 2.0 * math.log(std)) + second / (2.0 * std ** 2)


def mixture_entropy(dist: GaussianMixture, width: float = 10.0, points_per_std: float = 4.0,
                    max_points: int = 2001) -> float:
    """Differential entropy ``-int p log p`` in nats of a mixture in 1 or 2 dimensions, by quadrature.

    A mixture's entropy has no closed form (the log of a sum does not split). We integrate on a
    regular grid covering every component to ``width`` standard deviations, with ``points_per_std``
    points per smallest standard deviation, by the trapezoid rule. For Gaussian integrands that rule
    converges faster than any power of the spacing h (its error is of order ``exp(-2 pi^2 s^2 / h^2)``
    for a component of standard deviation s), and the mass outside the box is of order
    ``exp(-width^2 / 2)``; with the defaults both are far below 1e-12 relative.
    """
    if not isinstance(dist, GaussianMixture):
        raise TypeError(f"dist must be a Gaussian or GaussianMixture, got {type(dist).__name__}")
    if dist.dim not in (1, 2):
        raise ValueError(f"mixture_entropy integrates on a grid in 1 or 2 dimensions; dist has dim={dist.dim}")
    check_positive("width", width)
    check_positive("points_per_std", points_per_std)
    cpu = dist.to("cpu")
    sd_max = float(cpu._evals.max().sqrt())
    sd_min = float(cpu._evals.min().sqrt())
    lo = cpu.means.min(0).values - width * sd_max                                # (D,)
    hi = cpu.means.max(0).values + width * sd_max
    n = int(math.ceil(float((hi - lo).max()) / (sd_min / points_per_std))) + 1
    if n > max_points:
        raise ValueError(f"the grid needs {n} points per axis (> max_points={max_points}): the components are "
                         f"too narrow ({sd_min:.3g}) for the spread of the mixture ({float((hi - lo).max()):.3g})")
    axes = [torch.linspace(float(lo[i]), float(hi[i]), n, dtype=_F64) for i in range(dist.dim)]
    wts = [torch.full((n,), float(a[1] - a[0]), dtype=_F64) for a in axes]       # trapezoid weights per axis
    for w in wts:
        w[0] = w[-1] = 0.5 * w[1]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dist.dim)   # (n^D, D)
    weight = wts[0] if dist.dim == 1 else (wts[0][:, None] * wts[1][None, :]).reshape(-1)
    logp = cpu.log_prob(grid)                                                     # (n^D,)
    return float(-(weight * logp.exp() * logp).sum())
