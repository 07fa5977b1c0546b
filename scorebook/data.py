"""Data: sklearn's bundled 8x8 digits, the 2-D toys, and images a user brings.

Nothing here downloads. Discrete images are kept as integers (``n_levels`` grey levels,
17 for the digits, 256 for 8-bit images) and turned into continuous training data per
batch by an :class:`ImageTransform`: uniform dequantization
``y = (x + u) / n_levels`` with ``u ~ U[0, 1)^D``, so ``y`` lies in ``[0, 1]``, followed by
an optional affine map to ``[-1, 1]``.

Why dequantize: a continuous density fitted to integers can put unbounded density on the
grid points. Adding uniform noise inside each grid cell makes the continuous log-likelihood
a lower bound on the discrete log-probability (Theis et al. 2016):
``log P(x) >= E_u[log p(y)] - D log n_levels`` for ``y`` in ``[0, 1]^D``.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .densities import make_toy
from .likelihood import dequantize

__all__ = [
    "DigitsSplit",
    "load_digits",
    "ImageTransform",
    "TensorData",
    "toy_data",
    "load_images",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_LEVELS = 17  # sklearn's digits take the integer values 0..16


def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    vr = tuple(float(v) for v in value_range)
    if vr not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")
    return vr  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageTransform:
    """Per-batch map from integer images to continuous training data.

    ``dequantize=True`` adds uniform noise (:func:`scorebook.likelihood.dequantize`); ``False`` maps the
    grid point itself, ``x / (n_levels - 1)``, into ``[0, 1]``. Then ``value_range`` (``(0, 1)`` or
    ``(-1, 1)``) and an optional random horizontal flip (CIFAR-10).
    """

    n_levels: int = 256
    value_range: tuple[float, float] = (0.0, 1.0)
    dequantize: bool = True
    hflip: bool = False

    def __post_init__(self) -> None:
        _check_range(self.value_range)
        if not isinstance(self.n_levels, int) or self.n_levels < 2:
            raise ValueError(f"n_levels must be an integer >= 2, got {self.n_levels!r}")

    def __call__(self, x_int: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.dequantize:
            y = dequantize(x_int, self.n_levels, generator).to(torch.float32)
        else:
            y = x_int.to(torch.float32) / (self.n_levels - 1)
        if self.value_range == (-1.0, 1.0):
            y = 2.0 * y - 1.0
        if self.hflip:
            gdev = generator.device if generator is not None else torch.device("cpu")
            flip = (torch.rand(y.shape[0], generator=generator, device=gdev) < 0.5).to(y.device)
            y = torch.where(flip.reshape(-1, *([1] * (y.ndim - 1))), y.flip(-1), y)
        return y

    def to_unit(self, y: Tensor) -> Tensor:
        """Invert the affine part: continuous data in ``value_range`` -> ``[0, 1]``."""
        return (y + 1.0) / 2.0 if self.value_range == (-1.0, 1.0) else y


@dataclass
class TensorData:
    """An in-memory data set for :func:`scorebook.train.train`.

    ``x`` holds all examples ``(N, *shape)``. ``transform(batch, generator)`` (optional) runs on
    each batch, e.g. an :class:`ImageTransform`; its randomness comes from ``generator`` so
    that training can be resumed exactly.
    """

    x: Tensor
    transform: Optional[Callable[[Tensor, Optional[torch.Generator]], Tensor]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.ndim < 2 or self.x.shape[0] < 1:
            shape = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise ValueError(f"TensorData.x must be a tensor of shape (N, ...) with N >= 1, got {shape}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b = self.x[idx.to(self.x.device)]
        return b if self.transform is None else self.transform(b, generator)


# ----- digits -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsSplit:
    """sklearn's 8x8 digits as integer images (N, 1, 8, 8) with values 0..16, and labels (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    n_levels: int = DIGITS_LEVELS


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The 1797 bundled digits, split into train and test by a permutation drawn with ``seed``.

    Integer images (N, 1, 8, 8) int64 in {0..16}; labels (N,) int64. No download.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.int64).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return DigitsSplit(x[tr], y[tr], x[te], y[te])


# ----- 2-D toys ---------------------------------------------------------------------------
def toy_data(name: str, n: int, seed: int = 0) -> Tensor:
    """``n`` points of a 2-D toy (see :func:`scorebook.densities.make_toy`) as float32 (n, 2)."""
    return make_toy(name, n, generator=torch.Generator().manual_seed(seed)).to(torch.float32)


# ----- images a user brings -----------------------------------------------------------------
def _as_nchw(arr: np.ndarray, source: str) -> Tensor:
    if arr.ndim == 3:  # (N, H, W): grey
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3, 4):
        raise ValueError(f"{source}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                         f"C in {{1, 3, 4}}, got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{source}: holds no images")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{source}: images must be integers in [0, 255] (uint8), got dtype {arr.dtype}"
                             + (f" with values in [{arr.min()}, {arr.max()}]" if arr.size else ""))
        arr = arr.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_images(path: str | Path, key: str | None = None) -> Tensor:
    """Load a user's 8-bit images as a uint8 tensor (N, C, H, W).

    ``path`` is one of:

    * a ``.npz`` file: the array under ``key`` (default: ``"x"``, ``"images"``, ``"arr_0"``, or
      the only array in the file);
    * a ``.npy`` file;
    * a folder of image files (``IMAGE_SUFFIXES``), read with PIL in sorted name order; all must
      share one size. Grey images stay one channel, everything else becomes RGB.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for unusable contents.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        return _load_folder(p)
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{p} is not a readable .npz file: {e}") from e
        if key is None:
            key = next((k for k in ("x", "images", "arr_0") if k in arrays), None)
            if key is None and len(arrays) == 1:
                key = next(iter(arrays))
        if key is None or key not in arrays:
            raise ValueError(f"{p}: no array {key!r}; it holds {sorted(arrays)} (pass the key explicitly)")
        return _as_nchw(arrays[key], str(p))
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"{p} is not a readable .npy file: {e}") from e
        return _as_nchw(arr, str(p))
    raise ValueError(f"data path {str(p)!r} must be a .npz or .npy file or a folder of images")


def _load_folder(folder: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L") if im.mode in ("L", "1", "I;16", "I", "F") else im.convert("RGB")
                a = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from e
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"all images must share one size and mode; {f.name} is {a.shape}, "
                             f"{files[0].name} is {arrays[0].shape}")
        arrays.append(a)
    return _as_nchw(np.stack(arrays), str(folder))
