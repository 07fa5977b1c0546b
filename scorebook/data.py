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

import math
import warnings
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
    "LAYOUTS",
    "MAX_IMAGE_PIXELS",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LAYOUTS = ("nchw", "nhwc")  #: how a 4-D array of images is laid out (channels first or last)
MAX_IMAGE_PIXELS = 4096 * 4096  #: larger images are refused before decoding
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
_CHANNELS = (1, 3, 4)


class _Refused(ValueError):
    """Our own message about a data file, which already names the file."""


def _as_nchw(arr: np.ndarray, source: str, layout: str | None = None) -> Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) integers -> uint8 (N, C, H, W); see :func:`load_images`."""
    if arr.ndim == 3:  # (N, H, W): grey
        arr = arr[:, None]
    elif arr.ndim == 4:
        if layout is None:
            nchw, nhwc = arr.shape[1] in _CHANNELS, arr.shape[3] in _CHANNELS
            if nchw and nhwc:
                n, a, b, c = arr.shape
                raise ValueError(f"{source}: the layout of an array shaped {arr.shape} is ambiguous: NCHW means "
                                 f"{a} channel(s) of {b}x{c} pixels, NHWC means {c} channel(s) of {a}x{b} pixels; "
                                 "say which with layout='nchw' or 'nhwc' (on the command line: --layout)")
            layout = "nhwc" if nhwc else "nchw"
        if layout == "nhwc":
            arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if arr.ndim != 4 or arr.shape[1] not in _CHANNELS:
        how = f" read as {layout.upper()}" if layout and arr.ndim == 4 else ""
        raise ValueError(f"{source}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                         f"C in {{1, 3, 4}}, got {arr.shape}{how}")
    if arr.shape[0] == 0:
        raise ValueError(f"{source}: holds no images")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{source}: images must be integers in [0, 255] (uint8), got dtype {arr.dtype}"
                             + (f" with values in [{arr.min()}, {arr.max()}]" if arr.size else ""))
        arr = arr.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _size(n: int) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} bytes"


def _read_npy(fp, available: int, source: str) -> np.ndarray:
    """Read one .npy array from ``fp`` after checking that its header fits the ``available`` bytes.

    A header can claim any shape; numpy would allocate that much before reading, so a crafted or
    truncated file claiming terabytes fails here instead, with the sizes in the message.
    """
    fmt = np.lib.format
    start = fp.tell()
    version = fmt.read_magic(fp)
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0  # 3.0 = 2.0 in UTF-8
    shape, fortran, dtype = read_header(fp)
    if dtype.hasobject:
        raise _Refused(f"{source}: holds Python objects (dtype {dtype}); images must be integers")
    need = math.prod(shape) * dtype.itemsize
    have = available - (fp.tell() - start)
    if need > have:
        raise _Refused(f"{source}: its header claims an array of shape {shape} and dtype {dtype} ({_size(need)}), "
                       f"but the file holds only {_size(max(have, 0))} of data: it is truncated or not a real array")
    fp.seek(start)
    try:
        return fmt.read_array(fp, allow_pickle=False)
    except MemoryError:
        raise _Refused(f"{source}: the array of shape {shape} ({_size(need)}) does not fit in memory") from None


def load_images(path: str | Path, key: str | None = None, layout: str | None = None) -> Tensor:
    """Load a user's 8-bit images as a uint8 tensor (N, C, H, W).

    ``path`` is one of:

    * a ``.npz`` file: the array under ``key`` (default: ``"x"``, ``"images"``, ``"arr_0"``, or
      the only array in the file);
    * a ``.npy`` file;
    * a folder of image files (``IMAGE_SUFFIXES``), read with PIL in sorted name order; all must
      share one size. Grey images stay one channel, everything else becomes RGB. 16-bit images
      (PIL modes ``I;16``/``I``, values 0..65535) are scaled to 8 bits by ``round(v / 257)``, which
      maps 0..65535 onto 0..255 exactly; floating-point images are refused. Images larger than
      ``MAX_IMAGE_PIXELS`` are refused from their header, before they are decoded.

    Arrays may be (N, H, W) grey, (N, C, H, W) or (N, H, W, C) with C in {1, 3, 4}. The rule for
    4-D arrays: when exactly one of axes 1 and 3 has a channel count, that axis holds the channels;
    when both do (for example (N, 4, 4, 3)), the array is refused unless ``layout`` (``"nchw"`` or
    ``"nhwc"``) says which. An array header that claims more data than the file holds is refused
    before anything is allocated.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for unusable contents.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        return _load_folder(p)
    if p.suffix == ".npz":
        try:
            with zipfile.ZipFile(p) as z:
                names = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
                if key is None:
                    key = next((k for k in ("x", "images", "arr_0") if k in names), None)
                    if key is None and len(names) == 1:
                        key = next(iter(names))
                    if key is None:
                        raise _Refused(f"{p}: holds the arrays {sorted(names)} and none is called 'x', 'images' or "
                                       "'arr_0'; choose one with key=NAME (on the command line: --data-key NAME)")
                if key not in names:
                    raise _Refused(f"{p}: no array {key!r}; it holds {sorted(names)}")
                info = z.getinfo(names[key])
                with z.open(info) as fp:
                    arr = _read_npy(fp, info.file_size, f"{p} (array {key!r})")
        except _Refused:
            raise
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{p} is not a readable .npz file: {e}") from e
        return _as_nchw(arr, str(p), layout)
    if p.suffix == ".npy":
        try:
            with open(p, "rb") as fp:
                arr = _read_npy(fp, p.stat().st_size, str(p))
        except _Refused:
            raise
        except (OSError, EOFError, ValueError) as e:
            raise ValueError(f"{p} is not a readable .npy file: {e}") from e
        return _as_nchw(arr, str(p), layout)
    raise ValueError(f"data path {str(p)!r} must be a .npz or .npy file or a folder of images")


def _read_image(f: Path) -> np.ndarray:
    """One image file as uint8 (H, W) grey or (H, W, 3) RGB; see :func:`load_images` for the rules."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
        with Image.open(f) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {str(f)!r} is {w}x{h} pixels; images larger than {MAX_IMAGE_PIXELS} pixels "
                                 "are refused (the header may be crafted, and score models here train on small images)")
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey: 0..65535 -> 0..255
                a = np.asarray(im)
                if a.size and (a.min() < 0 or a.max() > 65535):
                    raise ValueError(f"image {str(f)!r} (mode {im.mode}) has values in [{a.min()}, {a.max()}], "
                                     "outside the 16-bit range 0..65535")
                return ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
            if im.mode == "F":
                raise ValueError(f"image {str(f)!r} holds floating-point pixels (mode F), which have no fixed "
                                 "scale; convert it to 8- or 16-bit integers")
            return np.asarray(im.convert("L") if im.mode in ("L", "1") else im.convert("RGB"))


def _load_folder(folder: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        try:
            a = _read_image(f)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
            raise ValueError(f"cannot read image {str(f)!r}: {e}") from e
        if arrays and a.shape != arrays[0].shape:
            raise ValueError(f"all images must share one size and mode; {f.name} is {a.shape}, "
                             f"{files[0].name} is {arrays[0].shape}")
        arrays.append(a)
    return _as_nchw(np.stack(arrays), str(folder))
