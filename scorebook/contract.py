"""The one contract of the package, written once.

A *score* is any callable ``score(x, t)`` that returns a tensor shaped like ``x``:

* ``x`` has shape ``(B, *shape)``: a batch of points (``(B, D)`` for vectors,
  ``(B, C, H, W)`` for images);
* ``t`` is a Python float or a tensor of shape ``(B,)``. With a forward SDE it is
  the *time* in ``[0, T]``; in the discrete noise-scale world of NCSN it is the
  *noise standard deviation* ``sigma``; for clean data it is ``0``.

Learned networks (:mod:`scorebook.nets`) and exact oracles
(:func:`scorebook.densities.oracle_score`) both fulfil it, so every loss and every
sampler accepts either. That is what lets the book separate model error from
sampler error.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Union[float, Tensor]], Tensor]
TimeLike = Union[float, int, Tensor]

__all__ = [
    "ScoreFn",
    "TimeLike",
    "as_time",
    "evaluate_score",
    "default_device",
    "check_finite",
    "check_positive",
]


def as_time(t: TimeLike, x: Tensor) -> Tensor:
    """Broadcast ``t`` to a tensor of shape ``(B,)`` on ``x``'s device and dtype.

    Accepts a Python number, a 0-d tensor, or a tensor of shape ``(B,)``.
    """
    batch = x.shape[0]
    if isinstance(t, Tensor):
        t = t.to(device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(
                f"t must be a number or a tensor of shape ({batch},) to match x; got shape {tuple(t.shape)}"
            )
        return t
    if not isinstance(t, (int, float)):
        raise TypeError(f"t must be a number or a tensor, got {type(t).__name__}")
    return torch.full((batch,), float(t), device=x.device, dtype=x.dtype)


def check_finite(name: str, x: Tensor) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds a NaN or an infinity."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {n_inf} infinite values")
    return x


def check_positive(name: str, value: float | Tensor) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite and > 0."""
    # checked on the CPU in float64 (MPS has no float64); numbers are parsed straight into float64
    v = value.detach().cpu().to(torch.float64) if isinstance(value, torch.Tensor) else torch.as_tensor(
        value, dtype=torch.float64)
    if not torch.isfinite(v).all() or (v <= 0).any():
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def evaluate_score(score: ScoreFn, x: Tensor, t: TimeLike) -> Tensor:
    """Call ``score(x, t)`` and enforce the contract.

    Raises ``ValueError`` if the output is not a tensor shaped like ``x`` or holds
    NaN/inf, so a broken model fails at the call that broke it.
    """
    out = score(x, t)
    if not isinstance(out, Tensor):
        raise TypeError(f"score(x, t) must return a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(
            f"score(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    return check_finite("score(x, t)", out)


def default_device(prefer: str | torch.device | None = None) -> torch.device:
    """Pick the device: ``prefer`` if given, else CUDA, then Apple MPS, then CPU."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


LOG_2PI = math.log(2.0 * math.pi)
