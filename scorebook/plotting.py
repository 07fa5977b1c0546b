"""Figures shared across the book: one colour map, densities, score fields, samples, image grids.

Every function draws into a matplotlib ``Axes`` the caller owns, so chapters compose them
freely. Densities are drawn with :data:`CMAP`; score fields as arrows over the density.
"""
from __future__ import annotations

import io
import re
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .energy import box_2d

__all__ = [
    "animation_html",
    "CMAP",
    "SAMPLE_COLOR",
    "FIELD_COLOR",
    "setup_style",
    "grid_2d",
    "plot_density",
    "plot_score_field",
    "plot_samples",
    "image_grid",
    "show_images",
    "explorer",
    "render_png",
]

CMAP = "viridis"          #: the one colour map used for every density in the book
SAMPLE_COLOR = "#d62728"  #: samples drawn on top of a density
FIELD_COLOR = "white"     #: score arrows drawn on top of a density

Lim = tuple[float, float] | tuple[tuple[float, float], tuple[float, float]] | float


def setup_style() -> None:
    """Readable defaults for a laptop screen (call once per chapter)."""
    plt.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 110,
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 10,
        "image.cmap": CMAP,
        "axes.grid": False,
    })


def _evaluate(fn: Callable, pts: Tensor, *args) -> np.ndarray:
    """Call a density or score on float64 CPU grid points, moving them to a network's device and
    dtype when ``fn`` is a module (a trained model), and return a float64 numpy array."""
    if isinstance(fn, torch.nn.Module):
        p = next(fn.parameters(), None)
        if p is not None:
            pts = pts.to(p.device, p.dtype)
    with torch.no_grad():
        return fn(pts, *args).detach().cpu().double().numpy()


def grid_2d(lim: Lim, n: int = 100) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """A regular ``n x n`` grid: returns ``X, Y`` (n, n) arrays and the points (n*n, 2) as float64 tensor."""
    (x0, x1), (y0, y1) = box_2d(lim)
    xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
    X, Y = np.meshgrid(xs, ys)
    pts = torch.from_numpy(np.stack([X.ravel(), Y.ravel()], axis=1))
    return X, Y, pts


def plot_density(ax, log_prob: Callable[[Tensor], Tensor], lim: Lim = 3.0, n: int = 150,
                 log_scale: bool = False, levels: int = 30, colorbar: bool = False):
    """Filled contours of ``exp(log_prob)`` (or of ``log_prob`` with ``log_scale``) on a 2-D grid.

    ``log_prob`` maps (N, 2) float64 points to (N,) log-densities.
    """
    X, Y, pts = grid_2d(lim, n)
    lp = _evaluate(log_prob, pts).reshape(X.shape)
    Z = lp if log_scale else np.exp(lp)
    cs = ax.contourf(X, Y, Z, levels=levels, cmap=CMAP)
    if colorbar:
        plt.colorbar(cs, ax=ax, label="log density" if log_scale else "density")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")
    return cs


def plot_score_field(ax, score: Callable[[Tensor, object], Tensor], lim: Lim = 3.0, n: int = 20,
                     t: float = 0.0, normalize: bool = True, color: str = FIELD_COLOR, scale: float | None = None):
    """Arrows of the score ``score(x, t)`` on an ``n x n`` grid.

    With ``normalize`` every arrow has the same length (direction only), and the arrow
    colour is left fixed; long arrows far from the data otherwise swamp the picture.
    """
    X, Y, pts = grid_2d(lim, n)
    s = _evaluate(score, pts, t)
    if normalize:
        s = s / (np.linalg.norm(s, axis=1, keepdims=True) + 1e-12)
    q = ax.quiver(X, Y, s[:, 0].reshape(X.shape), s[:, 1].reshape(X.shape), color=color,
                  angles="xy", scale=scale, width=0.004)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")
    return q


def plot_samples(ax, x: Tensor | np.ndarray, lim: Lim | None = None, color: str = SAMPLE_COLOR,
                 s: float = 3.0, alpha: float = 0.5, label: str | None = None):
    """Scatter 2-D samples ``x`` (N, 2)."""
    xx = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if xx.ndim != 2 or xx.shape[1] != 2:
        raise ValueError(f"plot_samples needs points of shape (N, 2), got {xx.shape}")
    ax.scatter(xx[:, 0], xx[:, 1], s=s, alpha=alpha, color=color, label=label, linewidths=0)
    if lim is not None:
        (x0, x1), (y0, y1) = box_2d(lim)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")


def image_grid(x: Tensor | np.ndarray, nrow: int | None = None, value_range: Sequence[float] = (0.0, 1.0),
               pad: int = 1) -> np.ndarray:
    """Tile images ``x`` (N, C, H, W) or (N, H, W) into one array (rows*H', cols*W'[, C]) in [0, 1]."""
    xx = x.detach().cpu().float().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    if xx.ndim == 3:
        xx = xx[:, None]
    if xx.ndim != 4:
        raise ValueError(f"image_grid needs images shaped (N, C, H, W) or (N, H, W), got {xx.shape}")
    lo, hi = value_range
    xx = np.clip((xx - lo) / (hi - lo), 0.0, 1.0)
    n, c, h, w = xx.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    out = np.ones((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = xx[i]
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def show_images(ax, x: Tensor | np.ndarray, nrow: int | None = None, value_range: Sequence[float] = (0.0, 1.0),
                title: str | None = None) -> None:
    """Draw an image grid into ``ax`` (grey scale for one channel), without axis ticks."""
    grid = image_grid(x, nrow, value_range)
    ax.imshow(grid, cmap="gray_r" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)


# ----- animations ----------------------------------------------------------------------------
_FONT_AWESOME = re.compile(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">')
# the player's buttons as plain characters, so the page needs no icon font from a CDN
_BUTTON_GLYPHS = """<style>
.animation .fa { font-style: normal; font-family: system-ui, sans-serif; }
.animation .fa-minus::before { content: "\\2212"; }
.animation .fa-plus::before { content: "+"; }
.animation .fa-play::before { content: "\\25B6"; }
.animation .fa-pause::before { content: "\\2016"; }
.animation .fa-fast-backward::before { content: "\\23EE"; }
.animation .fa-fast-forward::before { content: "\\23ED"; }
.animation .fa-step-backward::before { content: "\\25C0\\2502"; }
.animation .fa-step-forward::before { content: "\\2502\\25B6"; }
.animation .fa-flip-horizontal { display: inline-block; transform: scaleX(-1); }
</style>
"""


def animation_html(anim, **kwargs: Any) -> str:
    """``anim.to_jshtml(**kwargs)`` that works offline: the player's icon font (a CDN link) is replaced by
    inline CSS that draws its buttons as characters, so the page makes no network request."""
    html = anim.to_jshtml(**kwargs)
    html, n = _FONT_AWESOME.subn("", html)
    return _BUTTON_GLYPHS + html if n else html


# ----- interactive explorers ----------------------------------------------------------------
def render_png(fig, dpi: float | None = None) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (so it is not shown a second time)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def explorer(draw: Callable[..., Any], **controls: Any):
    """An ipywidgets explorer for Jupyter: ``draw(**values)`` is redrawn whenever a control moves.

    ``draw`` takes one keyword argument per control and returns a matplotlib ``Figure``; each
    control is an ipywidgets value widget (``FloatSlider``, ``IntSlider``, ``Dropdown``, ...)
    named like the argument it sets. Returns the widget (a ``VBox``: the controls, then the picture);
    make it the last expression of a cell to display it.

    The picture is an ``ipywidgets.Image`` holding the figure rendered to PNG, not an ``Output``
    widget. That matters when a notebook is executed headless (the book build, nbval): for an
    ``Output`` widget, nbclient imitates a front end and sends ``comm_msg`` updates to the kernel
    through jupyter_client's ``Session.send``, which writes to a synchronous *shadow* of the
    asyncio shell socket. That write can consume the ZMQ file descriptor's edge-triggered
    notification of the cell's ``execute_reply`` behind pyzmq's back, so nbclient's pending poll is
    never woken and the cell "hangs" for the whole execution timeout, then succeeds. With an
    ``Image`` the client never writes to the kernel during a cell, so that race cannot occur.
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise TypeError(f"draw must be a callable returning a matplotlib Figure, got {type(draw).__name__}")
    if not controls:
        raise ValueError("explorer needs at least one control, e.g. sigma=widgets.FloatSlider(...)")
    for name, w in controls.items():
        if not isinstance(w, widgets.ValueWidget):
            raise TypeError(f"control {name!r} must be an ipywidgets value widget (FloatSlider, IntSlider, "
                            f"Dropdown, ...), got {type(w).__name__}")
        if not w.description:
            w.description = name
        w.style.description_width = "initial"
    image = widgets.Image(format="png")

    def redraw(*_: Any) -> None:
        fig = draw(**{name: w.value for name, w in controls.items()})
        if fig is None or not hasattr(fig, "savefig"):
            raise TypeError(f"draw must return a matplotlib Figure, got {type(fig).__name__}")
        image.value = render_png(fig)

    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")), image])
