"""Score-matching objectives. Each takes a score callable and a batch and returns a scalar.

Conventions (all losses): a per-sample quantity is *summed* over the data dimensions and
*averaged* over the batch, so with ``x ~ p`` each loss is a Monte Carlo estimate of an
expectation under ``p``. With ``p`` the data density and ``s`` the model score:

* explicit SM   ``J_ESM(s) = 1/2 E ||s(x) - grad log p(x)||^2``   (Fisher divergence / 2);
* implicit SM   ``J_ISM(s) = E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ]``  (Hyvarinen 2005);
  ``J_ESM = J_ISM + 1/2 E ||grad log p||^2``, a constant that does not depend on ``s``;
* sliced SM     ``E_v E[ v^T grad_x s(x) v + 1/2 (v^T s(x))^2 ]``  (Song et al. 2019);
* denoising SM  ``1/2 E || s(x + sigma z, sigma) + z / sigma ||^2``  (Vincent 2011).

For an exponential family the implicit loss is quadratic in the parameters and
:func:`exponential_family_score_matching` minimises it in closed form.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import ScoreFn, TimeLike, as_time, check_finite, evaluate_score
from .sde import SDE, _bcast, check_sigmas

__all__ = [
    "explicit_score_matching",
    "implicit_score_matching",
    "jacobian_trace",
    "sliced_score_matching",
    "denoising_score_matching",
    "ncsn_loss",
    "sde_loss",
    "exponential_family_score_matching",
]


def _check_batch(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch shaped (B, ...), got {tuple(x.shape)}")
    return check_finite("x", x)


def _sq(v: Tensor) -> Tensor:
    """Per-sample squared norm over all non-batch dims; (B,)."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def explicit_score_matching(score: ScoreFn, x: Tensor, true_score: ScoreFn | Tensor, t: TimeLike = 0.0) -> Tensor:
    """``1/2 E ||s(x,t) - true(x)||^2``: the Fisher divergence (halved). Needs the true score, so it is for checks.

    ``true_score`` is a score callable (called with the same ``t``) or a tensor shaped like ``x``.
    """
    x = _check_batch(x)
    s = evaluate_score(score, x, t)                                         # (B, ...)
    target = true_score if isinstance(true_score, Tensor) else evaluate_score(true_score, x, t)
    if target.shape != x.shape:
        raise ValueError(f"true_score must be shaped like x {tuple(x.shape)}, got {tuple(target.shape)}")
    return 0.5 * _sq(s - target.to(s.dtype)).mean()


def jacobian_trace(score: ScoreFn, x: Tensor, t: TimeLike = 0.0, create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """Exact ``tr(grad_x s(x, t))`` per sample by one backward pass per dimension.

    Returns ``(trace (B,), s (B, ...))``. Costs D backward passes: the reason exact ISM
    stops at image scale.
    """
    x = _check_batch(x)
    x = x.detach().requires_grad_(True)
    s = evaluate_score(score, x, t)                                         # (B, ...)
    s_flat, x_flat_dim = s.reshape(s.shape[0], -1), s[0].numel()
    trace = torch.zeros(x.shape[0], dtype=s.dtype, device=x.device)         # (B,)
    for i in range(x_flat_dim):
        # d s_i / d x_i for every sample at once (samples are independent)
        (grad,) = torch.autograd.grad(s_flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        trace = trace + grad.reshape(x.shape[0], -1)[:, i]
    return trace, s


def implicit_score_matching(score: ScoreFn, x: Tensor, t: TimeLike = 0.0) -> Tensor:
    """Hyvarinen's objective ``E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ]`` with the exact Jacobian trace."""
    trace, s = jacobian_trace(score, x, t)
    return (trace + 0.5 * _sq(s)).mean()


def sliced_score_matching(score: ScoreFn, x: Tensor, n_projections: int = 1, variance_reduction: bool = True,
                          t: TimeLike = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Sliced score matching with Gaussian projections ``v ~ N(0, I)`` (Song et al. 2019).

    ``v^T grad_x s v`` costs one extra backward pass per projection. With
    ``variance_reduction`` the term ``1/2 (v^T s)^2`` is replaced by its expectation
    over ``v``, ``1/2 ||s||^2`` (SSM-VR). Both equal the implicit SM loss in expectation.
    """
    if not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be a positive integer, got {n_projections!r}")
    x = _check_batch(x).detach().requires_grad_(True)
    s = evaluate_score(score, x, t)                                         # (B, ...)
    b = x.shape[0]
    v = torch.randn((n_projections, *x.shape), generator=generator, device=x.device, dtype=x.dtype)  # (M, B, ...)
    total = torch.zeros(b, dtype=s.dtype, device=x.device)
    for m in range(n_projections):
        vs = (v[m] * s).reshape(b, -1).sum(1)                                # (B,)  v^T s
        (grad_vs,) = torch.autograd.grad(vs.sum(), x, create_graph=True)     # (B, ...)  grad_x (v^T s)
        vjv = (grad_vs * v[m]).reshape(b, -1).sum(1)                         # (B,)  v^T (grad s) v
        second = 0.5 * _sq(s) if variance_reduction else 0.5 * vs ** 2
        total = total + vjv + second
    return (total / n_projections).mean()


def _sigma_per_sample(sigma: float | Tensor, x: Tensor) -> Tensor:
    sig = as_time(sigma, x)
    if not torch.isfinite(sig).all() or (sig <= 0).any():
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    return sig


def denoising_score_matching(score: ScoreFn, x: Tensor, sigma: float | Tensor,
                             generator: torch.Generator | None = None) -> Tensor:
    """``1/2 E || s(x~, sigma) + z/sigma ||^2`` with ``x~ = x + sigma z`` (Vincent 2011).

    Its minimiser over all functions is the score of the perturbed density ``p * N(0, sigma^2 I)``.
    ``sigma`` is a number or a (B,) tensor; the score is called with ``t = sigma``.
    """
    x = _check_batch(x)
    sig = _sigma_per_sample(sigma, x)                                        # (B,)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_noisy = x + _bcast(sig, x) * z
    s = evaluate_score(score, x_noisy, sig)
    return 0.5 * _sq(s + z / _bcast(sig, x)).mean()


def ncsn_loss(score: ScoreFn, x: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Multi-scale DSM of Song & Ermon (2019), eq. (6), with ``lambda(sigma) = sigma^2``.

    Each sample gets a noise level drawn uniformly from ``sigmas``;
    the per-sample loss is ``1/2 || sigma s(x~, sigma) + z ||^2``.
    """
    x = _check_batch(x)
    sig_all = check_sigmas(torch.as_tensor(sigmas)).to(device=x.device, dtype=x.dtype)
    idx = torch.randint(0, sig_all.numel(), (x.shape[0],), generator=generator, device=x.device)
    sig = sig_all[idx]                                                       # (B,)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    s = evaluate_score(score, x + _bcast(sig, x) * z, sig)
    return 0.5 * _sq(_bcast(sig, x) * s + z).mean()


def sde_loss(score: ScoreFn, x: Tensor, sde: SDE, likelihood_weighting: bool = False, eps: float = 1e-5,
             generator: torch.Generator | None = None) -> Tensor:
    """Continuous-time DSM of Song et al. (2021), eq. (7), with ``t ~ U(eps, T)``.

    ``x_t = a(t) x + std(t) z``; with ``lambda(t) = std(t)^2`` the per-sample loss is
    ``1/2 ||std s(x_t, t) + z||^2``. With ``likelihood_weighting`` it is ``lambda(t) = g(t)^2``,
    i.e. ``1/2 g^2/std^2 ||std s + z||^2``, whose integral bounds the negative log-likelihood
    (Song et al. 2021b).
    """
    x = _check_batch(x)
    sde.check_eps(eps)
    b = x.shape[0]
    t = eps + (sde.T - eps) * torch.rand(b, generator=generator, device=x.device, dtype=x.dtype)  # (B,)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    mean, std = sde.marginal(x, t)
    x_t = mean + _bcast(std, x) * z
    s = evaluate_score(score, x_t, t)
    per_sample = 0.5 * _sq(_bcast(std, x) * s + z)                            # (B,)
    if likelihood_weighting:
        per_sample = per_sample * sde._diffusion(t) ** 2 / std ** 2
    return per_sample.mean()


def exponential_family_score_matching(grad_t: Tensor, lap_t: Tensor) -> Tensor:
    """Implicit score matching in closed form for an exponential family ``f_theta(x) = theta^T T(x)``.

    The model score ``s_theta(x) = grad_x f_theta(x) = J_T(x)^T theta`` is linear in ``theta``, so
    ``J_ISM(theta) = theta^T b + 1/2 theta^T A theta`` with ``A = E[J_T J_T^T]`` and
    ``b = E[lap T]``, and the minimiser is ``theta_hat = -A^{-1} b`` (Hyvarinen 2007, section 2).
    The expectations are averages over the batch.

    ``grad_t``: (N, P, D), the x-gradients ``grad_x T_k(x_i)`` of the P features at N points;
    ``lap_t``: (N, P), their Laplacians ``sum_d d^2 T_k / dx_d^2 (x_i)``. Returns ``theta_hat`` (P,).
    Raises ``ValueError`` for mismatched shapes or a singular ``A`` (features whose gradients are
    linearly dependent on the data).
    """
    if not isinstance(grad_t, Tensor) or not isinstance(lap_t, Tensor):
        raise TypeError("grad_t and lap_t must be tensors")
    if grad_t.ndim != 3 or grad_t.shape[0] == 0:
        raise ValueError(f"grad_t must be shaped (N, P, D) with N >= 1, got {tuple(grad_t.shape)}")
    if lap_t.shape != grad_t.shape[:2]:
        raise ValueError(f"lap_t must be shaped (N, P) = {tuple(grad_t.shape[:2])}, got {tuple(lap_t.shape)}")
    check_finite("grad_t", grad_t)
    check_finite("lap_t", lap_t)
    a = torch.einsum("npd,nqd->pq", grad_t, grad_t) / grad_t.shape[0]       # (P, P)  E[J_T J_T^T]
    b = lap_t.mean(0)                                                        # (P,)    E[lap T]
    try:
        return -torch.linalg.solve(a, b)                                     # (P,)
    except RuntimeError as err:  # torch raises on an exactly singular matrix
        raise ValueError("E[J_T J_T^T] is singular: the feature gradients are linearly dependent on this "
                         "data, so the score-matching estimate is not unique") from err
