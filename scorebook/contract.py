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
    "NonFiniteError",
]


class NonFiniteError(ValueError):
    """A tensor holds NaN or infinite values (raised by :func:`check_finite`; a ``ValueError``)."""


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
    """Raise :class:`NonFiniteError` (a ``ValueError``) naming ``name`` if ``x`` holds a NaN or an infinity."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(f"{name} contains {n_nan} NaN and {n_inf} infinite values")
    return x


def check_positive(name: str, value: float | Tensor) -> None:
    """Raise ``ValueError`` unless ``value`` is a number (or numbers) and every entry is finite and > 0."""
    # checked on the CPU in float64 (MPS has no float64); numbers are parsed straight into float64
    if value is None or isinstance(value, (str, bytes, bool)):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}, which is not a number")
    try:
        v = value.detach().cpu().to(torch.float64) if isinstance(value, torch.Tensor) else torch.as_tensor(
            value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}, which is not a number") from None
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


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def default_device(prefer: str | torch.device | None = None) -> torch.device:
    """Pick the device: ``prefer`` if given, else CUDA, then Apple MPS, then CPU.

    A preferred CUDA or MPS device that this machine does not have raises ``ValueError`` naming it,
    rather than failing later inside torch.
    """
    if prefer is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(prefer)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda', 'cuda:1' or 'mps', "
                         f"got {prefer!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {str(prefer)!r} is not available: this machine has no CUDA GPU "
                             f"(or torch {torch.__version__} was built without CUDA); use 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(prefer)!r} is not available: this machine has {n} CUDA GPU(s), "
                             f"cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(f"device {str(prefer)!r} is not available: Apple MPS needs a Mac with Apple silicon "
                         "and a torch built with MPS; use 'cpu'")
    return dev


LOG_2PI = math.log(2.0 * math.pi)
