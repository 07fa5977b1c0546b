"""Score networks: a residual MLP for low-dimensional data and a U-Net for images.

Both are ``nn.Module``s whose ``forward(x, t)`` returns a tensor shaped like ``x``, so a
network *is* a score callable in the sense of :mod:`scorebook.contract` and plugs into
every loss and sampler.

Conditioning on the noise level. ``t`` (the SDE time, or the noise std ``sigma`` in the
discrete NCSN world) enters through an embedding:

* ``"fourier"``: random Fourier features ``[sin 2 pi W t, cos 2 pi W t]`` with fixed
  ``W ~ N(0, scale^2)`` (Tancik et al. 2020; used by NCSN++, Song et al. 2021);
* ``"sinusoidal"``: the transformer position embedding of ``1000 t`` (used by DDPM).

With ``log_time=True`` the embedding sees ``log t`` instead of ``t``; use it when ``t`` is a
noise std spanning several orders of magnitude.

Output scaling. With ``scale=sde`` the network output is divided by the SDE's marginal std
``std(t)``, and with ``scale=sigma_scale`` by ``t`` itself (``t`` is sigma). The raw network
then only has to predict ``-z`` (unit scale) rather than ``-z / std``, which spans orders of
magnitude (Song & Ermon 2020, "technique 3").
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import TimeLike, as_time
from .sde import SDE

__all__ = [
    "FourierEmbedding",
    "SinusoidalEmbedding",
    "ScoreMLP",
    "ScoreUNet",
    "sigma_scale",
    "count_parameters",
]

#: anything that turns per-sample times ``(B,)`` into per-sample output divisors ``(B,)``
ScaleLike = Union[SDE, Callable[[Tensor], Tensor], None]

_STD_FLOOR = 1e-5  # std(t) is 0 at t = 0 for VE/VP; never divide by less than this


def sigma_scale(t: Tensor) -> Tensor:
    """Output scale for the NCSN world, where ``t`` is the noise std sigma: divide by ``t``."""
    return t


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar: ``(B,) -> (B, dim)``; ``W`` is fixed, not trained."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2 or dim < 2:
            raise ValueError(f"embedding dim must be an even integer >= 2, got {dim}")
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: Tensor) -> Tensor:
        proj = 2 * math.pi * t[:, None] * self.W[None, :]  # (B, dim/2)
        return torch.cat([proj.sin(), proj.cos()], dim=1)


class SinusoidalEmbedding(nn.Module):
    """Transformer position embedding of ``1000 t`` (Vaswani et al. 2017; DDPM): ``(B,) -> (B, dim)``."""

    def __init__(self, dim: int, max_period: float = 10000.0, t_multiplier: float = 1000.0):
        super().__init__()
        if dim % 2 or dim < 2:
            raise ValueError(f"embedding dim must be an even integer >= 2, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs)
        self.t_multiplier = t_multiplier

    def forward(self, t: Tensor) -> Tensor:
        arg = self.t_multiplier * t[:, None] * self.freqs[None, :]  # (B, dim/2)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


_EMBEDDINGS = {"fourier": FourierEmbedding, "sinusoidal": SinusoidalEmbedding}


def _make_embedding(kind: str, dim: int) -> nn.Module:
    if kind not in _EMBEDDINGS:
        raise ValueError(f"embed must be one of {sorted(_EMBEDDINGS)}, got {kind!r}")
    return _EMBEDDINGS[kind](dim)


class _Conditioned(nn.Module):
    """Shared plumbing: time handling (``as_time``, optional log) and output scaling."""

    def _setup_time(self, scale: ScaleLike, log_time: bool) -> None:
        if scale is not None and not (isinstance(scale, SDE) or callable(scale)):
            raise TypeError(f"scale must be None, an SDE or a callable t -> std, got {type(scale).__name__}")
        self.scale = scale
        self.log_time = bool(log_time)

    def _time_input(self, t: TimeLike, x: Tensor) -> Tensor:
        tt = as_time(t, x)  # (B,)
        if self.log_time:
            if (tt <= 0).any():
                raise ValueError("log_time=True needs t > 0 (t is a noise std)")
            return tt.log()
        return tt

    def _check_dtype(self, x: Tensor) -> None:
        """``x`` must have the parameters' dtype (under autocast torch mixes dtypes itself)."""
        p = next(self.parameters(), None)
        if p is not None and x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            name = type(self).__name__
            raise ValueError(f"{name} expects x of dtype {p.dtype} (the dtype of its parameters), got {x.dtype}; "
                             f"convert the input (x.to({p.dtype})) or the model ({name}(...).to({x.dtype}))")

    def _divisor(self, t: TimeLike, x: Tensor) -> Tensor | None:
        if self.scale is None:
            return None
        tt = as_time(t, x)
        std = self.scale.marginal_std(tt) if isinstance(self.scale, SDE) else self.scale(tt)
        std = std.to(device=x.device, dtype=x.dtype).clamp_min(_STD_FLOOR)
        return std.reshape(-1, *([1] * (x.ndim - 1)))


class ScoreMLP(_Conditioned):
    """Residual MLP score model for vectors: ``forward(x (B, dim), t) -> (B, dim)``.

    Args:
        dim: data dimension D.
        hidden: width of the hidden layers.
        n_layers: number of residual blocks.
        embed: ``"fourier"`` or ``"sinusoidal"`` time embedding.
        embed_dim: size of the time embedding.
        scale: ``None``, an :class:`~scorebook.sde.SDE` (divide the output by ``std(t)``), or a
            callable ``t -> std`` such as :func:`sigma_scale`.
        log_time: embed ``log t`` (for ``t`` = sigma) instead of ``t``.
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, embed: str = "fourier",
                 embed_dim: int = 64, scale: ScaleLike = None, log_time: bool = False):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("n_layers", n_layers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.dim = dim
        self._setup_time(scale, log_time)
        self.embed = _make_embedding(embed, embed_dim)
        self.t_mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(hidden), "fc1": nn.Linear(hidden, hidden),
                           "temb": nn.Linear(hidden, hidden), "fc2": nn.Linear(hidden, hidden)})
            for _ in range(n_layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: TimeLike) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ScoreMLP expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        self._check_dtype(x)
        emb = self.t_mlp(self.embed(self._time_input(t, x)))  # (B, H)
        h = self.inp(x)  # (B, H)
        for blk in self.blocks:
            u = blk["fc1"](F.silu(blk["norm"](h))) + blk["temb"](F.silu(emb))
            h = h + blk["fc2"](F.silu(u))
        out = self.out(h)  # (B, D)
        div = self._divisor(t, x)
        return out if div is None else out / div


# ----- U-Net -------------------------------------------------------------------------------
def _groups(ch: int) -> int:
    """Largest group count <= 32 that divides ``ch`` with at least 4 channels per group."""
    for g in (32, 16, 8, 4, 2):
        if ch % g == 0 and ch // g >= 4:
            return g
    return 1


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a skip connection and optional attention.

    The time embedding enters as a per-channel scale and shift after the second GroupNorm
    (FiLM, as in improved DDPM); an additive per-channel bias *before* a norm would be
    removed by the norm's mean subtraction.
    """

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float = 0.0, attn: bool = False):
        super().__init__()
        self.attn = AttnBlock(c_out) if attn else None
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.temb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        h = (self.skip(x) + h) / math.sqrt(2.0)
        return h if self.attn is None else self.attn(h)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        a = a.transpose(-1, -2).reshape(b, c, h, w).contiguous()  # contiguous: keeps weight grads in the usual layout
        return (x + self.proj(a)) / math.sqrt(2.0)


class ScoreUNet(_Conditioned):
    """U-Net score model for images: ``forward(x (B, C, H, W), t) -> (B, C, H, W)``.

    A DDPM/NCSN++-style U-Net (Ho et al. 2020; Song et al. 2021): residual blocks with
    GroupNorm and the time embedding, strided-conv down-sampling and nearest-neighbour
    up-sampling, self-attention at the lowest resolution (and in the middle).

    ``channel_mults`` sets the number of resolutions; ``H`` and ``W`` need not be divisible by
    ``2**(len(channel_mults)-1)``: inputs are zero-padded up to the next multiple and the output
    is cropped back (so 28x28 MNIST works with three levels by padding to 32x32).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, channel_mults: tuple[int, ...] = (1, 2, 2),
                 n_res_blocks: int = 2, embed: str = "fourier", dropout: float = 0.0,
                 scale: ScaleLike = None, log_time: bool = False):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if len(channel_mults) < 1 or any((not isinstance(m, int)) or m < 1 for m in channel_mults):
            raise ValueError(f"channel_mults must be a non-empty tuple of positive integers, got {channel_mults!r}")
        if not isinstance(n_res_blocks, int) or n_res_blocks < 1:
            raise ValueError(f"n_res_blocks must be a positive integer, got {n_res_blocks!r}")
        self._setup_time(scale, log_time)
        self.in_channels = in_channels
        self.multiple = 2 ** (len(channel_mults) - 1)
        t_dim = 4 * channels
        self.embed = _make_embedding(embed, channels)
        self.t_mlp = nn.Sequential(nn.Linear(channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        n_levels = len(channel_mults)
        self.down = nn.ModuleList()
        skip_ch = [channels]
        ch = channels
        for i, mult in enumerate(channel_mults):
            for _ in range(n_res_blocks):
                self.down.append(ResBlock(ch, channels * mult, t_dim, dropout, attn=i == n_levels - 1))
                ch = channels * mult
                skip_ch.append(ch)
            if i < n_levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_ch.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim, dropout, attn=True), ResBlock(ch, ch, t_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(n_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), channels * mult, t_dim, dropout,
                                        attn=i == n_levels - 1))
                ch = channels * mult
            if i > 0:
                self.up.append(_Upsample(ch))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: TimeLike) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ScoreUNet expects x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_dtype(x)
        H, W = x.shape[-2:]
        ph, pw = (-H) % self.multiple, (-W) % self.multiple
        xin = F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x  # (B, C, H', W')
        emb = self.t_mlp(self.embed(self._time_input(t, x)))  # (B, 4ch)

        h = self.conv_in(xin)
        hs = [h]
        for layer in self.down:  # ResBlocks, then a strided conv between levels
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        out = self.out(h)[..., :H, :W]  # crop the padding away
        div = self._divisor(t, x)
        return out if div is None else out / div


class _Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
