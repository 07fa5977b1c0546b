"""Command line: ``python -m scorebook train|sample|nll``.

A *preset* is a small dataclass bundle (data, network, SDE, training config) so that a run
is one line::

    python -m scorebook train --preset 2d --out runs/2d                 # CPU, seconds
    python -m scorebook train --preset digits --out runs/digits         # CPU, minutes
    python -m scorebook train --preset mnist --data mnist_train.npz     # GPU
    torchrun --nproc_per_node=4 -m scorebook train --preset cifar10 --data cifar_train.npz
    python -m scorebook sample --checkpoint runs/digits/checkpoint.pt --n 64
    python -m scorebook nll --checkpoint runs/digits/checkpoint.pt

The checkpoint stores the preset's specs, so ``sample`` and ``nll`` rebuild the model from it.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .contract import default_device
from .data import ImageTransform, TensorData, load_digits, load_images, toy_data
from .densities import TOY_NAMES
from .nets import ScoreMLP, ScoreUNet
from .sde import SDE, SubVPSDE, VESDE, VPSDE
from .train import CheckpointError, TrainConfig, load_checkpoint, train

__all__ = ["NetSpec", "SDESpec", "DataSpec", "Preset", "PRESETS", "build_net", "build_sde", "main"]


# ----- specs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetSpec:
    """A ScoreMLP (``kind="mlp"``) or ScoreUNet (``kind="unet"``); output divided by the SDE's std."""

    kind: str = "mlp"
    dim: int = 2                      # mlp: data dimension
    hidden: int = 128                 # mlp
    n_layers: int = 3                 # mlp
    in_channels: int = 1              # unet (taken from the data at train time)
    channels: int = 64                # unet
    channel_mults: tuple[int, ...] = (1, 2, 2)  # unet
    n_res_blocks: int = 2             # unet
    dropout: float = 0.0              # unet
    embed: str = "fourier"


@dataclass(frozen=True)
class SDESpec:
    kind: str = "vp"                  # "vp", "subvp" or "ve"
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma_min: float = 0.01
    sigma_max: float = 50.0


@dataclass(frozen=True)
class DataSpec:
    """``source``: "toy" (2-D, ``toy`` names it), "digits" (sklearn, bundled) or "images" (``--data``)."""

    source: str = "toy"
    toy: str = "song_ermon"
    n_toy: int = 50_000
    value_range: tuple[float, float] = (-1.0, 1.0)
    hflip: bool = False
    split_seed: int = 0


@dataclass(frozen=True)
class Preset:
    description: str
    data: DataSpec
    net: NetSpec
    sde: SDESpec
    train: TrainConfig
    sample_steps: int = 500
    likelihood_weighting: bool = False


PRESETS: dict[str, Preset] = {
    "2d": Preset(
        "2-D toy (default: the Song & Ermon mixture) with a ScoreMLP; CPU, about a minute",
        DataSpec("toy"), NetSpec("mlp", dim=2, hidden=128, n_layers=3), SDESpec("vp"),
        TrainConfig(steps=5000, batch_size=512, lr=2e-3, warmup_steps=100, ema_decay=0.999), sample_steps=500),
    "digits": Preset(
        "sklearn's 8x8 digits (17 grey levels) with a small U-Net; CPU, minutes",
        DataSpec("digits", value_range=(-1.0, 1.0)),
        NetSpec("unet", in_channels=1, channels=32, channel_mults=(1, 2), n_res_blocks=1), SDESpec("vp"),
        TrainConfig(steps=3000, batch_size=128, lr=1e-3, warmup_steps=100, ema_decay=0.999), sample_steps=500),
    "mnist": Preset(
        "MNIST-like 28x28 grey images from --data (.npz/.npy/folder); GPU, a small DDPM++-sized U-Net",
        DataSpec("images", value_range=(-1.0, 1.0)),
        NetSpec("unet", channels=64, channel_mults=(1, 2, 2), n_res_blocks=2, dropout=0.1), SDESpec("vp"),
        TrainConfig(steps=100_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, bf16=True,
                    checkpoint_every=5000), sample_steps=1000),
    "cifar10": Preset(
        "CIFAR-10-like 32x32 RGB images from --data; GPU, a small DDPM++/NCSN++-sized U-Net (128 channels)",
        DataSpec("images", value_range=(-1.0, 1.0), hflip=True),
        NetSpec("unet", channels=128, channel_mults=(1, 2, 2, 2), n_res_blocks=2, dropout=0.1), SDESpec("vp"),
        TrainConfig(steps=400_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999, bf16=True,
                    checkpoint_every=10_000), sample_steps=1000),
}

_SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def build_sde(spec: SDESpec) -> SDE:
    if spec.kind not in _SDES:
        raise ValueError(f"SDE kind must be one of {sorted(_SDES)}, got {spec.kind!r}")
    if spec.kind == "ve":
        return VESDE(spec.sigma_min, spec.sigma_max)
    return _SDES[spec.kind](spec.beta_min, spec.beta_max)


def build_net(spec: NetSpec, sde: SDE) -> torch.nn.Module:
    if spec.kind == "mlp":
        return ScoreMLP(spec.dim, spec.hidden, spec.n_layers, embed=spec.embed, scale=sde)
    if spec.kind == "unet":
        return ScoreUNet(spec.in_channels, spec.channels, tuple(spec.channel_mults), spec.n_res_blocks,
                         embed=spec.embed, dropout=spec.dropout, scale=sde)
    raise ValueError(f"net kind must be 'mlp' or 'unet', got {spec.kind!r}")


def _from_dict(cls, d: dict):
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**fields)


# ----- data --------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    train: TensorData
    test: Optional[torch.Tensor]          # integer images, or continuous toy points
    transform: Optional[ImageTransform]
    n_levels: Optional[int]


def _load(spec: DataSpec, data_path: str | None, seed: int, parser: argparse.ArgumentParser) -> _Loaded:
    if spec.source == "toy":
        x = toy_data(spec.toy, spec.n_toy, seed=seed)
        return _Loaded(TensorData(x), toy_data(spec.toy, 2000, seed=seed + 10_000), None, None)
    if spec.source == "digits":
        d = load_digits(seed=spec.split_seed)
        tf = ImageTransform(d.n_levels, spec.value_range, dequantize=True, hflip=spec.hflip)
        return _Loaded(TensorData(d.train_x, tf), d.test_x, tf, d.n_levels)
    if data_path is None:
        parser.error("this preset trains on your own images: pass --data PATH (.npz, .npy or a folder of images)")
    try:
        x = load_images(data_path)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--data: {e}")
    tf = ImageTransform(256, spec.value_range, dequantize=True, hflip=spec.hflip)
    return _Loaded(TensorData(x, tf), x, tf, 256)


# ----- argument types ------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _device(s: str) -> str:
    try:
        torch.device(s)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda, cuda:1 or mps, got {s!r}") from None
    return s


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scorebook", description="Train, sample and evaluate score-based models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,nll}")

    tr = sub.add_parser("train", help="train a preset (runs under torchrun too)",
                        description="Train a score model. Presets: " +
                        "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    tr.add_argument("--preset", required=True, choices=sorted(PRESETS))
    tr.add_argument("--data", help="images for the mnist/cifar10 presets: .npz (array 'x'), .npy or a folder")
    tr.add_argument("--toy", choices=TOY_NAMES, help="2-D data set for the 2d preset (default song_ermon)")
    tr.add_argument("--out", type=Path, help="run folder (default runs/<preset>); holds checkpoint.pt")
    tr.add_argument("--steps", type=_positive_int)
    tr.add_argument("--batch-size", type=_positive_int, help="per process (effective = this x processes)")
    tr.add_argument("--lr", type=_positive_float)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", type=_device, help="default: cuda, then mps, then cpu")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CUDA)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--checkpoint-every", type=_positive_int)
    tr.add_argument("--no-resume", action="store_true", help="start afresh even if the checkpoint exists")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--threads", type=_positive_int, help="torch CPU threads")

    sa = sub.add_parser("sample", help="draw samples; writes a PNG and an .npz")
    sa.add_argument("--checkpoint", required=True, type=Path)
    sa.add_argument("--n", type=_positive_int, default=64, help="number of samples")
    sa.add_argument("--sampler", choices=("pc", "em", "ode"), default="pc",
                    help="predictor-corrector, Euler-Maruyama, or the probability-flow ODE (adaptive)")
    sa.add_argument("--steps", type=_positive_int, help="steps of the pc/em samplers (default: the preset's)")
    sa.add_argument("--snr", type=_positive_float, default=0.16)
    sa.add_argument("--out", type=Path, help="PNG path (default: samples.png next to the checkpoint)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--device", type=_device)
    sa.add_argument("--threads", type=_positive_int)

    nl = sub.add_parser("nll", help="negative log-likelihood (bits/dim) on a test set by the probability-flow ODE")
    nl.add_argument("--checkpoint", required=True, type=Path)
    nl.add_argument("--data", help="test images for image presets (default for digits: the held-out split)")
    nl.add_argument("--n", type=_positive_int, help="number of test examples (default: all)")
    nl.add_argument("--trace", choices=("exact", "hutchinson"), default="hutchinson")
    nl.add_argument("--batch-size", type=_positive_int, default=500)
    nl.add_argument("--tol", type=_positive_float, default=1e-5, help="ODE rtol = atol")
    nl.add_argument("--seed", type=int, default=0)
    nl.add_argument("--device", type=_device)
    nl.add_argument("--threads", type=_positive_int)
    return p


# ----- commands ----------------------------------------------------------------------------------
def _cmd_train(args, parser) -> int:
    from .losses import sde_loss

    preset = PRESETS[args.preset]
    if args.toy and preset.data.source != "toy":
        parser.error(f"--toy only applies to the 2d preset, not {args.preset!r}")
    if args.data and preset.data.source != "images":
        parser.error(f"--data only applies to the image presets (mnist, cifar10), not {args.preset!r}")
    spec = replace(preset.data, toy=args.toy) if args.toy else preset.data
    data = _load(spec, args.data, args.seed, parser)
    net_spec = preset.net
    if net_spec.kind == "unet":
        net_spec = replace(net_spec, in_channels=int(data.train.x.shape[1]))
    out = args.out or Path("runs") / args.preset
    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       checkpoint_every=args.checkpoint_every, device=args.device,
                                       bf16=args.bf16).items() if v is not None}
    try:
        cfg = replace(preset.train, seed=args.seed, compile=args.compile, resume=not args.no_resume,
                      progress=not args.no_progress, checkpoint=str(out / "checkpoint.pt"), **overrides)
    except ValueError as e:
        parser.error(str(e))
    sde = build_sde(preset.sde)
    torch.manual_seed(args.seed)
    model = build_net(net_spec, sde)
    meta = {"preset": args.preset, "net": asdict(net_spec), "sde": asdict(preset.sde), "data": asdict(spec),
            "data_path": args.data, "seed": args.seed,
            "image_hw": list(data.train.x.shape[-2:]) if net_spec.kind == "unet" else None}
    loss = functools.partial(sde_loss, sde=sde, likelihood_weighting=preset.likelihood_weighting)
    t0 = time.perf_counter()
    try:
        res = train(model, loss, data.train, cfg, meta=meta)
    except CheckpointError as e:
        parser.error(f"cannot resume: {e} (pass --no-resume to start afresh)")
    except (ValueError, FloatingPointError) as e:  # raised while training: not a usage error
        print(f"scorebook train: error: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    tail = res.losses[-100:]
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(f"trained {args.preset} to step {res.step} in {wall:.1f} s; mean loss of the last {len(tail)} steps "
              f"{sum(tail) / max(len(tail), 1):.4f}; checkpoint {cfg.checkpoint}")
    return 0


def _restore(path: Path, device: str | None, parser):
    try:
        ck = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        parser.error(str(e))
    meta = ck.get("meta") or {}
    if "net" not in meta or "sde" not in meta:
        parser.error(f"checkpoint {str(path)!r} was not written by `scorebook train` (it has no model description)")
    sde = build_sde(_from_dict(SDESpec, meta["sde"]))
    model = build_net(_from_dict(NetSpec, meta["net"]), sde)
    model.load_state_dict(ck["ema"]["module"])
    dev = default_device(device)
    return model.to(dev).eval(), sde, meta, dev


def _cmd_sample(args, parser) -> int:
    from .samplers import euler_maruyama, predictor_corrector, probability_flow

    model, sde, meta, dev = _restore(args.checkpoint, args.device, parser)
    spec = _from_dict(DataSpec, meta["data"])
    net = _from_dict(NetSpec, meta["net"])
    shape = (args.n, net.dim) if net.kind == "mlp" else (args.n, net.in_channels, *_image_hw(meta, spec))
    steps = args.steps or PRESETS[meta["preset"]].sample_steps
    g = torch.Generator(device=dev).manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        x_T = sde.prior_sample(shape, generator=g, device=dev)
        if args.sampler == "pc":
            x = predictor_corrector(sde, model, x_T, steps, snr=args.snr, generator=g)
        elif args.sampler == "em":
            x = euler_maruyama(sde, model, x_T, steps, generator=g)
        else:  # adaptive solver: the number of steps is the solver's choice
            if args.steps:
                print("note: --steps does not apply to --sampler ode (an adaptive solver picks its steps)",
                      file=sys.stderr)
            x, nfe = probability_flow(sde, model, x_T, return_nfe=True)
            print(f"probability flow: {nfe} score evaluations")
    wall = time.perf_counter() - t0
    out = args.out or args.checkpoint.with_name("samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    x = x.float().cpu()
    if net.kind == "mlp":
        _scatter_png(x, out)
        np.savez(out.with_suffix(".npz"), x=x.numpy())
    else:
        unit = ImageTransform(2, spec.value_range).to_unit(x).clamp(0, 1)  # (N, C, H, W) in [0, 1]
        _grid_png(unit, out)
        np.savez(out.with_suffix(".npz"), x=x.numpy(), images=(unit * 255).round().to(torch.uint8).numpy())
    print(f"{args.n} samples ({args.sampler}, {wall:.1f} s, {args.n / wall:.1f} samples/s) -> {out} and "
          f"{out.with_suffix('.npz')}")
    return 0


def _image_hw(meta: dict, spec: DataSpec) -> tuple[int, int]:
    if spec.source == "digits":
        return (8, 8)
    hw = meta.get("image_hw")
    if hw is None:  # read the data once to learn the size
        return tuple(load_images(meta["data_path"]).shape[-2:])
    return tuple(hw)


def _grid_png(x01: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from .plotting import image_grid

    grid = (image_grid(x01) * 255).round().astype(np.uint8)
    zoom = max(1, 512 // max(grid.shape[:2]))  # enlarge small images so they can be seen
    img = Image.fromarray(grid)
    img.resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def _scatter_png(x: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_nll(args, parser) -> int:
    from .likelihood import discrete_bpd, log_likelihood

    model, sde, meta, dev = _restore(args.checkpoint, args.device, parser)
    spec = _from_dict(DataSpec, meta["data"])
    if spec.source == "images":
        path = args.data or meta.get("data_path")
        if args.data is None:
            print("warning: no --data given; evaluating on the training images", file=sys.stderr)
        try:
            test = load_images(path)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--data: {e}")
        tf, n_levels = ImageTransform(256, spec.value_range), 256
    elif spec.source == "digits":
        if args.data:
            parser.error("--data does not apply to the digits preset (it uses its held-out split)")
        d = load_digits(seed=spec.split_seed)
        test, tf, n_levels = d.test_x, ImageTransform(d.n_levels, spec.value_range), d.n_levels
    else:
        # fresh points: a seed the training data (seeded with the training seed) never used
        test_seed = int(meta.get("seed", 0)) + 10_000
        test, tf, n_levels = toy_data(spec.toy, args.n or 2000, seed=test_seed), None, None
    if args.n:
        test = test[: args.n]
    g = torch.Generator().manual_seed(args.seed)
    nats, nfes, t0 = [], [], time.perf_counter()
    for i in range(0, test.shape[0], args.batch_size):
        xb = test[i:i + args.batch_size]
        y = (tf(xb, g) if tf is not None else xb).to(dev)
        res = log_likelihood(sde, model, y, trace=args.trace, rtol=args.tol, atol=args.tol,
                             generator=torch.Generator(device=dev).manual_seed(args.seed + i))
        nats.append(res.nats.cpu().double())
        nfes.append(res.nfe)
    nats_t = torch.cat(nats)
    dim = test[0].numel()
    if n_levels is None:
        per = -nats_t / (dim * math.log(2.0))
        label = "bits/dim (continuous density)"
        print(f"NLL: {-nats_t.mean():.4f} nats per sample")
    else:
        scale = 2.0 if tuple(spec.value_range) == (-1.0, 1.0) else 1.0
        per = discrete_bpd(nats_t, dim, n_levels, scale=scale)
        label = f"bits/dim ({n_levels} levels, uniform dequantization)"
    se = per.std().item() / math.sqrt(per.numel()) if per.numel() > 1 else float("nan")
    print(f"{label}: {per.mean():.4f} +- {se:.4f} on {per.numel()} test examples "
          f"({args.trace} trace, NFE {sum(nfes) / len(nfes):.0f} per batch, {time.perf_counter() - t0:.1f} s)")
    return 0


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "nll": _cmd_nll}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return _COMMANDS[args.command](args, parser)
