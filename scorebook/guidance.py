"""Controllable generation: Bayes' rule for scores, guidance, and posterior sampling for inverse problems.

Everything here rests on one line. For any observation ``y`` (a class label, a measurement),
Bayes' rule ``p_t(x | y) = p_t(y | x) p_t(x) / p(y)`` gives, because ``p(y)`` does not depend on x,

    grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x).

The methods differ only in where the second term, the *likelihood score*, comes from:

* :func:`classifier_guidance`: a time-dependent classifier ``log p_t(y | x_t)`` (Dhariwal & Nichol 2021);
* :func:`classifier_free_guidance`: the difference of a conditional and an unconditional score from
  one network trained with label dropout (Ho & Salimans 2022);
* :func:`dps_likelihood_score`: ``log N(y; A E[x_0 | x_t], s^2 I)`` for a linear measurement
  ``y = A x_0 + n`` (diffusion posterior sampling, Chung et al. 2023);
* :func:`replacement_sampler` uses no likelihood score at all: it overwrites the measured part of
  ``x_t`` with a noised copy of ``y`` (Song et al. 2021, the imputation method).

One guidance scale ``w`` is used throughout: the guided score is ``s + w * (likelihood score)``, so
``w = 1`` is Bayes' rule and ``w = 0`` ignores ``y``. Ho & Salimans write the same combination with
``w_HS = w - 1``. The exact references these methods are measured against (conditional and posterior
mixtures, the exact classifier and the exact ``p_t(y | x_t)``) live in :mod:`scorebook.densities`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import ScoreFn, TimeLike, as_time, check_finite, evaluate_score
from .losses import sde_loss
from .nets import FourierEmbedding, ScoreMLP
from .samplers import euler_maruyama
from .sde import SDE, _bcast

__all__ = [
    "conditional_score",
    "likelihood_score",
    "classifier_guidance",
    "NoisyClassifier",
    "noisy_classifier_loss",
    "ConditionalScoreMLP",
    "cfg_loss",
    "classifier_free_guidance",
    "tweedie_denoiser",
    "dps_likelihood_score",
    "dps_sampler",
    "replacement_sampler",
]

#: a differentiable ``log p_t(y | x)``: ``(x (B, ...), t) -> (B,)`` in nats
LogLikelihood = Callable[[Tensor, TimeLike], Tensor]


def _check_scale(scale: float | Tensor) -> float | Tensor:
    """A guidance scale ``w >= 0``: a number, or a (B,) tensor of per-sample scales (one batch can sweep w)."""
    if isinstance(scale, Tensor):
        if scale.ndim != 1 or not torch.isfinite(scale).all() or (scale < 0).any():
            raise ValueError(f"scale (the guidance scale w) must be a number or a (B,) tensor of finite values >= 0, "
                             f"got shape {tuple(scale.shape)}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale (the guidance scale w) must be a finite number >= 0, got {scale!r}")
    return float(scale)


def _times(w: float | Tensor, v: Tensor) -> Tensor:
    """``w * v`` for a number or a per-sample (B,) scale."""
    if isinstance(w, float):
        return w * v
    if w.shape != (v.shape[0],):
        raise ValueError(f"a per-sample scale must have shape ({v.shape[0]},) to match x, got {tuple(w.shape)}")
    return _bcast(w.to(v.device, v.dtype), v) * v


# ----- Bayes' rule for scores -------------------------------------------------------------
def likelihood_score(log_likelihood: LogLikelihood) -> ScoreFn:
    """``grad_x log p_t(y | x)`` by automatic differentiation of a ``log_likelihood(x, t) -> (B,)``."""

    def score(x: Tensor, t: TimeLike) -> Tensor:
        with torch.enable_grad():                          # samplers may run under no_grad
            xg = x.detach().requires_grad_(True)
            ll = log_likelihood(xg, t)                     # (B,)
            if ll.shape != (x.shape[0],):
                raise ValueError(f"log_likelihood(x, t) must return shape ({x.shape[0]},), got {tuple(ll.shape)}")
            (grad,) = torch.autograd.grad(ll.sum(), xg)    # samples are independent: sum, then differentiate
        return grad.detach()

    return score


def conditional_score(score: ScoreFn, likelihood: ScoreFn, scale: float | Tensor = 1.0) -> ScoreFn:
    """Bayes' rule for scores, ``s(x, t) + w grad_x log p_t(y | x)`` (Song et al. 2021, eq. 14); ``w = 1`` is exact.

    ``scale`` is the guidance scale w, a number or a (B,) tensor of per-sample scales.
    """
    w = _check_scale(scale)

    def guided(x: Tensor, t: TimeLike) -> Tensor:
        return evaluate_score(score, x, t) + _times(w, evaluate_score(likelihood, x, t))

    return guided


def _labels(label: int | Tensor, x: Tensor) -> Tensor:
    """A class label per sample, (B,) int64 on x's device."""
    if isinstance(label, Tensor):
        y = label.to(x.device)
        if y.ndim == 0:
            y = y.expand(x.shape[0])
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"label must be an integer or an integer tensor of shape ({x.shape[0]},), "
                             f"got {y.dtype} {tuple(y.shape)}")
        return y.long()
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"label must be a non-negative integer or a (B,) tensor of them, got {label!r}")
    return torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)


# ----- classifier guidance ------------------------------------------------------------------
def classifier_guidance(score: ScoreFn, classifier: Callable[[Tensor, TimeLike], Tensor], label: int | Tensor,
                        scale: float | Tensor = 1.0) -> ScoreFn:
    """Classifier guidance, Algorithm 1 of Dhariwal & Nichol (2021): ``s + w grad_x log p_t(y | x_t)``.

    ``classifier(x, t)`` returns (B, C) logits (or log-probabilities) of a *time-dependent*
    classifier, trained on noisy ``x_t``; ``label`` is the class asked for (an int or (B,)).
    """
    def log_lik(x: Tensor, t: TimeLike) -> Tensor:
        logits = classifier(x, t)                                            # (B, C)
        y = _labels(label, x)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0] or int(y.max()) >= logits.shape[1]:
            raise ValueError(f"classifier(x, t) must return (B, C) logits with C > label; got {tuple(logits.shape)}")
        return torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]  # (B,) log p_t(y | x)

    return conditional_score(score, likelihood_score(log_lik), scale)


class NoisyClassifier(nn.Module):
    """A time-dependent classifier ``(x (B, D), t) -> (B, C)`` logits: an MLP on ``x`` and a Fourier embedding of t."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 128, n_layers: int = 2, embed_dim: int = 32):
        super().__init__()
        for name, v in (("dim", dim), ("n_classes", n_classes), ("hidden", hidden), ("n_layers", n_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.dim, self.n_classes = dim, n_classes
        self.embed = FourierEmbedding(embed_dim)
        layers: list[nn.Module] = [nn.Linear(dim + embed_dim, hidden), nn.SiLU()]
        for _ in range(n_layers - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor, t: TimeLike) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"NoisyClassifier expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return self.net(torch.cat([x, self.embed(as_time(t, x))], dim=1))   # (B, C)


def noisy_classifier_loss(classifier: nn.Module, batch: Tensor, sde: SDE, eps: float = 1e-5,
                          generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy of ``classifier(x_t, t)`` against the labels, ``t ~ U(eps, T)``, ``x_t ~ p_t(. | x_0)``.

    ``batch`` is (B, D + 1): the clean point and its integer label in the last column.
    """
    x0, y = _split_labelled(batch)
    sde.check_eps(eps)
    t = eps + (sde.T - eps) * torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = sde.perturb(x0, t, z)                                               # (B, D) noisy input
    return F.cross_entropy(classifier(x_t, t), y)


# ----- classifier-free guidance ---------------------------------------------------------------
def _split_labelled(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(B, D + 1) -> x (B, D) and integer labels (B,) from the last column."""
    if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.shape[1] < 2:
        raise ValueError(f"a labelled batch is (B, D + 1) with the label in the last column, got "
                         f"{tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__}")
    y = batch[:, -1]
    if not torch.equal(y, y.round()) or (y < 0).any():
        raise ValueError("the last column of a labelled batch must hold non-negative integer labels")
    return batch[:, :-1], y.long()


class ConditionalScoreMLP(ScoreMLP):
    """:class:`~scorebook.nets.ScoreMLP` with a class label: ``forward(x, t, y=None)``.

    A learned embedding of the label is added to the time embedding, so every residual block
    sees both. Label ``n_classes`` is the null label: ``y=None`` means "no label", the
    unconditional score (Ho & Salimans 2022 train both in one network by label dropout).

    ``data_var=v`` (needs ``scale=sde``) adds the exact score of ``N(0, v I)`` data under the SDE,
    ``-x / (a(t)^2 v + std(t)^2)``, so the network learns only the correction, in the spirit of the
    skip connection of Karras et al. (2022). Near ``t = T`` that term is almost the whole score,
    which keeps Tweedie's ``E[x_0 | x_t]`` (a division by the tiny ``a(T)``) and its Jacobian sane.
    """

    def __init__(self, dim: int, n_classes: int, data_var: float | None = None, **kwargs):
        super().__init__(dim, **kwargs)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
        if data_var is not None:
            if not (isinstance(data_var, (int, float)) and math.isfinite(data_var) and data_var > 0):
                raise ValueError(f"data_var must be None or a finite number > 0, got {data_var!r}")
            if not isinstance(self.scale, SDE):
                raise ValueError("data_var needs scale=<an SDE>: the Gaussian term uses a(t) and std(t)")
        self.n_classes = n_classes
        self.data_var = None if data_var is None else float(data_var)
        hidden = self.t_mlp[-1].out_features
        self.label_embed = nn.Embedding(n_classes + 1, hidden)             # row n_classes: the null label
        nn.init.zeros_(self.label_embed.weight)                              # start as the unconditional net

    @property
    def null_label(self) -> int:
        return self.n_classes

    def forward(self, x: Tensor, t: TimeLike, y: int | Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ConditionalScoreMLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        yy = _labels(self.null_label if y is None else y, x)                 # (B,)
        if int(yy.max()) > self.n_classes:
            raise ValueError(f"labels must lie in 0..{self.n_classes} ({self.n_classes} = null), got {int(yy.max())}")
        emb = self.t_mlp(self.embed(self._time_input(t, x))) + self.label_embed(yy)  # (B, H)
        h = self.inp(x)                                                      # (B, H)
        for blk in self.blocks:
            u = blk["fc1"](F.silu(blk["norm"](h))) + blk["temb"](F.silu(emb))
            h = h + blk["fc2"](F.silu(u))
        out = self.out(h)                                                    # (B, D)
        div = self._divisor(t, x)
        out = out if div is None else out / div
        if self.data_var is not None:                                        # + exact score of N(0, v I) at t
            tt = as_time(t, x)
            a, std = self.scale.mean_coef(tt).to(x.dtype), self.scale.marginal_std(tt).to(x.dtype)
            out = out - x / _bcast(a ** 2 * self.data_var + std ** 2, x)
        return out


def cfg_loss(model: ConditionalScoreMLP, batch: Tensor, sde: SDE, p_uncond: float = 0.1, eps: float = 1e-5,
             generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching with label dropout, Algorithm 1 of Ho & Salimans (2022).

    ``batch`` is (B, D + 1), the label in the last column. With probability ``p_uncond`` a
    label is replaced by the null label, so one network learns ``s(x, t, y)`` and ``s(x, t, null)``.
    The loss is :func:`scorebook.losses.sde_loss` (Song et al. 2021, eq. 7).
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond!r}")
    x0, y = _split_labelled(batch)
    null = getattr(model, "null_label", None)
    if null is None:  # a DDP-wrapped or compiled model
        null = model.module.null_label
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    y = torch.where(drop, torch.full_like(y, null), y)                       # label dropout
    return sde_loss(lambda x, t: model(x, t, y), x0, sde, eps=eps, generator=generator)


def classifier_free_guidance(model: Callable[..., Tensor], label: int | Tensor, scale: float | Tensor = 1.0) -> ScoreFn:
    """Classifier-free guidance, eq. (6) of Ho & Salimans (2022): ``s(x,t,null) + w [s(x,t,y) - s(x,t,null)]``.

    ``w = 1`` is the conditional score, ``w = 0`` the unconditional one; Ho & Salimans' ``w`` is ``w - 1``.
    ``model(x, t, y)`` is a conditional score with ``y=None`` meaning the null label; ``scale`` is a
    number or a (B,) tensor of per-sample scales.
    """
    w = _check_scale(scale)

    def guided(x: Tensor, t: TimeLike) -> Tensor:
        s_uncond = model(x, t, None)                                          # s(x, t, null)
        s_cond = model(x, t, _labels(label, x))                               # s(x, t, y)
        return s_uncond + _times(w, s_cond - s_uncond)

    return guided


# ----- linear inverse problems y = A x_0 + n ----------------------------------------------------
def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _check_operator(A: Tensor, y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(A, Tensor) or A.ndim != 2:
        raise ValueError(f"A must be an (M, D) matrix tensor, got "
                         f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
    d = x[0].numel()
    if A.shape[1] != d:
        raise ValueError(f"A must have D = {d} columns to act on x of shape {tuple(x.shape)}, got {tuple(A.shape)}")
    yy = torch.as_tensor(y)
    if yy.ndim == 1:
        yy = yy.expand(x.shape[0], -1)
    if yy.shape != (x.shape[0], A.shape[0]):
        raise ValueError(f"y must be (M,) = ({A.shape[0]},) or (B, M) = ({x.shape[0]}, {A.shape[0]}), "
                         f"got {tuple(yy.shape)}")
    return A.to(x.device, x.dtype), check_finite("y", yy.to(x.device, x.dtype))


def tweedie_denoiser(sde: SDE, score: ScoreFn) -> Callable[[Tensor, TimeLike], Tensor]:
    """``E[x_0 | x_t] = (x_t + std(t)^2 s(x_t, t)) / a(t)``: Tweedie's formula (Efron 2011) under the SDE kernel."""

    def denoise(x: Tensor, t: TimeLike) -> Tensor:
        tt = as_time(t, x)
        a, std = _bcast(sde.mean_coef(tt).to(x.dtype), x), _bcast(sde.marginal_std(tt).to(x.dtype), x)
        return (x + std ** 2 * evaluate_score(score, x, tt)) / a

    return denoise


def dps_likelihood_score(sde: SDE, score: ScoreFn, A: Tensor, y: Tensor, noise_std: float,
                         clip: tuple[float, float] | None = None) -> ScoreFn:
    """DPS's likelihood score (Chung et al. 2023, Section 3): ``grad_x log N(y; A x0_hat(x_t), s^2 I)``.

    It replaces the exact ``p_t(y | x_t) = int p(y | x_0) p(x_0 | x_t) dx_0`` by the likelihood at
    the posterior mean ``x0_hat = E[x_0 | x_t]`` (:func:`tweedie_denoiser`), dropping the spread of
    ``p(x_0 | x_t)``. The gradient goes through the score network (one backward pass per call).
    ``clip=(lo, hi)`` clamps ``x0_hat`` to the data range, as DPS's reference code does for images:
    near ``t = T`` Tweedie divides by a tiny ``a(t)`` and magnifies a learned score's error.
    """
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"noise_std must be a finite number > 0, got {noise_std!r}")
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip must be None or a pair (lo, hi) with lo < hi, got {clip!r}")
    denoise = tweedie_denoiser(sde, score)

    def log_lik(x: Tensor, t: TimeLike) -> Tensor:
        a_mat, yy = _check_operator(A, y, x)
        x0_hat = denoise(x, t)                                                 # (B, ...) E[x_0 | x_t]
        if clip is not None:
            x0_hat = x0_hat.clamp(*clip)
        resid = yy - _flat(x0_hat) @ a_mat.T                                   # (B, M)  y - A x0_hat
        return -0.5 * (resid ** 2).sum(1) / noise_std ** 2                    # (B,) up to a constant

    return likelihood_score(log_lik)


def dps_sampler(sde: SDE, score: ScoreFn, x_T: Tensor, A: Tensor, y: Tensor, noise_std: float, n_steps: int,
                scale: float | Tensor = 1.0, clip: tuple[float, float] | None = None, eps: float = 1e-3,
                generator: torch.Generator | None = None) -> Tensor:
    """Diffusion posterior sampling (Chung et al. 2023, Algorithm 1) as Euler--Maruyama on the reverse SDE.

    Each step uses ``s + w grad log N(y; A x0_hat, s^2 I)``; the paper's step on ``||y - A x0_hat||^2``,
    ``zeta_i``, is ``w g(t)^2 dt / (2 s^2)`` here (the paper retunes it as ``zeta' / ||y - A x0_hat||``).
    Costs ``n_steps`` score evaluations, each with one backward pass.
    """
    guided = conditional_score(score, dps_likelihood_score(sde, score, A, y, noise_std, clip), scale)
    with torch.no_grad():                      # the likelihood score turns gradients back on for itself
        return euler_maruyama(sde, guided, x_T, n_steps, eps=eps, generator=generator)


def replacement_sampler(sde: SDE, score: ScoreFn, x_T: Tensor, A: Tensor, y: Tensor, n_steps: int,
                        eps: float = 1e-3, generator: torch.Generator | None = None) -> Tensor:
    """Imputation by replacement (Song et al. 2021, Appendix I.2), for a measurement ``y = A x_0``.

    After each reverse-SDE step to time ``t``, the measured part of ``x_t`` is overwritten by a draw
    of ``A x_t | y``, ``a(t) y + std(t) A z``: ``x <- x + A^+ (y_t - A x)``. For a coordinate mask
    (rows of the identity) ``A^+ = A^T`` and this replaces the observed pixels. It treats ``y`` as
    noise-free, whatever the noise in the measurement. Costs ``n_steps`` score evaluations.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    sde.check_eps(eps)
    x = check_finite("x_T", x_T).clone()
    a_mat, yy = _check_operator(A, y, x)
    pinv = torch.linalg.pinv(a_mat)                                            # (D, M)
    ts = torch.linspace(sde.T, eps, n_steps + 1, dtype=x.dtype, device=x.device)
    for i in range(n_steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t                                                        # < 0: time runs backwards
        # predictor: one Euler--Maruyama step of the unconditional reverse SDE
        x = x + sde.reverse_drift(score, x, t) * dt
        if i < n_steps - 1:
            g = _bcast(sde.diffusion(t).to(x.dtype), x)
            x = x + g * torch.sqrt(-dt) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # replacement: y_t ~ p_t(A x_t | y) = N(a y, std^2 A A^T), written into the measured directions
        a_t = float(sde.mean_coef(float(t_next)))
        std_t = float(sde.marginal_std(float(t_next)))
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        y_t = a_t * yy + std_t * (_flat(z) @ a_mat.T)                           # (B, M)
        x = x + ((y_t - _flat(x) @ a_mat.T) @ pinv.T).reshape(x.shape)
    return x
