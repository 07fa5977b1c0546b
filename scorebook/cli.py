"""Command line: ``python -m scorebook train|sample|nll``.

A *preset* is a small dataclass bundle (data, network, SDE, training config) so that a run
is one line::

    python -m scorebook train --preset 2d --out runs/2d                 # CPU, seconds
    python -m scorebook train --preset digits --out runs/digits         # CPU, minutes
    python -m scorebook train --preset mnist --data mnist_train.npz     # GPU
    torchrun --nproc_per_node=4 -m scorebook train --preset cifar10 --data cifar_train.npz
    python -m scorebook sample --checkpoint runs/digits/checkpoint.pt --n 64
    python -m scorebook sample --checkpoint runs/2d/checkpoint.pt --sampler dpmpp_2m --nfe 10
    python -m scorebook nll --checkpoint runs/digits/checkpoint.pt

The checkpoint stores the preset's specs, so ``sample`` and ``nll`` rebuild the model from it,
after checking them: a checkpoint with a malformed description, weights of the wrong shape, NaN
weights, or a network above ``MAX_NET_PARAMETERS`` is refused with one message, before anything
large is allocated.

Errors: a wrong option or file is a usage error (``python -m scorebook: error: ...``, exit 2); a
failure while training (divergence, a full disk) prints ``scorebook train: error: ...`` and exits
with 1. No error prints a Python traceback. Ctrl-C (SIGINT) or SIGTERM during training writes a
checkpoint at the current step and prints one line with the command that resumes (exit 130 or 143).

Threads: ``--threads`` sets torch's CPU threads. Without it the CLI uses one thread for the MLP
(the 2d preset), whose layers are too small to gain from more: on a shared 2-core machine two
threads made it more than ten times slower (measured in the README). The U-Nets get torch's
default, capped at the cores not already busy (the usable CPUs less the 1-minute load average,
at least one): threads that wait for a busy core stall every step.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .contract import default_device
from .data import LAYOUTS, ImageTransform, TensorData, load_digits, load_images, toy_data
from .densities import TOY_NAMES
from .nets import ScoreMLP, ScoreUNet, count_parameters
from .sde import SDE, SubVPSDE, VESDE, VPSDE
from .solvers import SAMPLERS, NFECounter
from .train import (MAX_SEED, CheckpointError, TrainConfig, TrainingInterrupted, _load_model_state,
                    load_checkpoint, train)

__all__ = ["NetSpec", "SDESpec", "DataSpec", "Preset", "PRESETS", "build_net", "build_sde", "net_parameters",
           "MAX_NET_PARAMETERS", "main"]

#: ``sample``/``nll`` refuse to build a network larger than this from a checkpoint (4 GB of float32 weights)
MAX_NET_PARAMETERS = 1_000_000_000
MAX_IMAGE_SIDE = 4096  #: largest image height/width a checkpoint may ask ``sample`` for


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


#: loop counts checked before a network is even described on the meta device (a crafted count could hang it)
_STRUCTURE_CAPS = {"n_layers": 1000, "n_res_blocks": 100, "channel_mults": 10}


def net_parameters(spec: NetSpec, sde: SDE) -> int:
    """The parameter count of ``build_net(spec, sde)``, found without allocating any weights.

    The network is built on PyTorch's ``meta`` device (shapes only) and counted; its loop counts
    are first checked against small caps so that a crafted spec cannot make even that slow.
    Raises ``ValueError`` for a spec that cannot be built.
    """
    for name, cap in _STRUCTURE_CAPS.items():
        v = getattr(spec, name)
        if (len(v) if isinstance(v, tuple) else v) > cap:
            raise ValueError(f"NetSpec.{name} = {v!r} exceeds the sane limit of {cap}")
    try:
        with torch.device("meta"):
            return count_parameters(build_net(spec, sde))
    except (RuntimeError, OverflowError) as e:  # e.g. "Storage size calculation overflowed"
        raise ValueError(f"the network {spec} cannot be built: {str(e).splitlines()[0]}") from e


def _from_dict(cls, d: dict, what: str = "spec"):
    """A spec dataclass from a checkpoint's plain dict, checking every field's type (missing fields
    take their defaults; unknown fields are refused)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a dict, got {type(d).__name__}")
    known = {f.name: f.default for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}; {cls.__name__} has {sorted(known)}")
    values = {}
    for name, v in d.items():
        default = known[name]
        if isinstance(default, bool):
            ok, want = isinstance(v, bool), "True or False"
        elif isinstance(default, int):
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif isinstance(default, float):
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"
        elif isinstance(default, str):
            ok, want = isinstance(v, str), "a string"
        else:  # tuples of numbers, stored as lists
            ok, want = (isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                                             for e in v)), "a list of numbers"
            v = tuple(v) if ok else v
        if not ok:
            raise ValueError(f"{what}[{name!r}] must be {want}, got {v!r}")
        values[name] = v
    return cls(**values)


# ----- data --------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    train: TensorData
    test: Optional[torch.Tensor]          # integer images, or continuous toy points
    transform: Optional[ImageTransform]
    n_levels: Optional[int]


def _load(spec: DataSpec, data_path: str | None, seed: int, parser: argparse.ArgumentParser,
          key: str | None = None, layout: str | None = None) -> _Loaded:
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
        x = load_images(data_path, key=key, layout=layout)
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


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {s!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {s!r}")
    return v


def _device(s: str) -> str:
    try:
        torch.device(s)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda, cuda:1 or mps, got {s!r}") from None
    try:
        default_device(s)  # checks that this machine has the device
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


#: the fixed-budget samplers of scorebook.solvers offered by `sample --sampler NAME --nfe N`; pc and em keep
#: their --steps interface (the number of reverse-time steps), and ode is the adaptive solver
_FAST = tuple(k for k in SAMPLERS if k not in ("pc", "em"))
_MIN_NFE = {"ode_heun": 2}  # Heun spends 2 evaluations per step; every other fixed-budget sampler runs on 1
_NFE_DEFAULT = 35


def _samplers_epilog() -> str:
    """One line per sampler for `sample --help`, taken from the first line of each sampler's docstring."""
    lines = ["samplers:",
             "  pc        predictor-corrector (Song et al. 2021), --steps reverse-time steps (2 NFE per step)",
             "  em        Euler-Maruyama on the reverse SDE (Song et al. 2021), --steps steps",
             "  ode       probability-flow ODE, adaptive dopri5 (tolerance 1e-5): the solver picks its steps"]
    lines += [f"  {k:<9} {(SAMPLERS[k].__doc__ or '').strip().splitlines()[0].rstrip('.')}" for k in _FAST]
    lines += ["", f"The fixed-budget samplers ({', '.join(_FAST)})",
              f"take --nfe, a budget of score evaluations (default {_NFE_DEFAULT}); they use at most that many",
              "and print how many they used. Chapter 14 of the book measures their error against NFE."]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scorebook", description="Train, sample and evaluate score-based models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,nll}")
    threads = ("torch CPU threads (default: 1 for the 2d preset's MLP, which is too small to gain from more; "
               "for the U-Nets torch's default, capped at the cores the load average leaves free)")
    device = "cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)"

    tr = sub.add_parser("train", help="train a preset (runs under torchrun too)",
                        description="Train a score model. Presets: " +
                        "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()) +
                        ". Ctrl-C saves a checkpoint at the current step and prints the command that resumes.")
    tr.add_argument("--preset", required=True, choices=sorted(PRESETS), help="what to train (see above)")
    tr.add_argument("--data", help="images for the mnist/cifar10 presets: .npz, .npy or a folder of images")
    tr.add_argument("--data-key", help="the array to read from a --data .npz holding several "
                                       "(default: 'x', 'images', 'arr_0' or the only one)")
    tr.add_argument("--layout", choices=LAYOUTS, help="the axes of a 4-D --data array, channels first (nchw) or "
                                                      "last (nhwc); needed only when its shape leaves it ambiguous")
    tr.add_argument("--toy", choices=TOY_NAMES, help="2-D data set for the 2d preset (default song_ermon)")
    tr.add_argument("--out", type=Path, help="run folder (default runs/<preset>); holds checkpoint.pt")
    tr.add_argument("--steps", type=_positive_int, help="total optimiser steps, counting those of a resumed run "
                                                        "(default: the preset's)")
    tr.add_argument("--batch-size", type=_positive_int, help="examples per step and process "
                                                             "(effective = this x processes; default: the preset's)")
    tr.add_argument("--lr", type=_positive_float, help="peak Adam learning rate, reached after the warm-up "
                                                       "(default: the preset's)")
    tr.add_argument("--seed", type=_seed, default=0, help="seeds the weights, the data order and the noise "
                                                          "(an integer in [0, 2**63 - 1]; default 0)")
    tr.add_argument("--device", type=_device, help=device)
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bfloat16 autocast, used on CUDA only (default: the preset's)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default: the preset's; "
                                                                   "one is always written at the end and on Ctrl-C)")
    tr.add_argument("--no-resume", action="store_true", help="start afresh even if the checkpoint exists; the "
                                                             "existing one is kept as checkpoint.pt.prev.N")
    tr.add_argument("--allow-changed-settings", action="store_true",
                    help="resume even though --lr or another optimisation setting differs from the checkpoint's; "
                         "the change is recorded in it")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--threads", type=_positive_int, help=threads)

    sa = sub.add_parser("sample", help="draw samples; writes a PNG and an .npz",
                        description="Draw samples from a trained checkpoint (its EMA weights).",
                        epilog=_samplers_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sa.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint.pt written by `train`")
    sa.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    sa.add_argument("--sampler", choices=("pc", "em", "ode") + _FAST, default="pc", metavar="NAME",
                    help="one of " + ", ".join(("pc", "em", "ode") + _FAST) + " (default pc; listed below)")
    sa.add_argument("--steps", type=_positive_int, help="reverse-time steps of --sampler pc or em (default: the preset's)")
    sa.add_argument("--nfe", type=_positive_int,
                    help=f"budget of score evaluations for the fixed-budget samplers (default {_NFE_DEFAULT})")
    sa.add_argument("--snr", type=_positive_float, default=0.16,
                    help="signal-to-noise ratio that sets the pc corrector's Langevin step (default 0.16)")
    sa.add_argument("--out", type=Path, help="a .png path, or an existing folder to write samples.png into "
                                             "(default: samples.png next to the checkpoint); the samples also go "
                                             "to the same name with .npz")
    sa.add_argument("--seed", type=_seed, default=0, help="seeds the prior draw and the sampler's noise (default 0)")
    sa.add_argument("--device", type=_device, help=device)
    sa.add_argument("--threads", type=_positive_int, help=threads)

    nl = sub.add_parser("nll", help="negative log-likelihood (bits/dim) on a test set by the probability-flow ODE",
                        description="Negative log-likelihood of test data under a trained checkpoint (its EMA "
                                    "weights), by the probability-flow ODE.")
    nl.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint.pt written by `train`")
    nl.add_argument("--data", help="test images for the mnist/cifar10 presets (default: the training images); "
                                   "refused for 2d (fresh toy points) and digits (the held-out split)")
    nl.add_argument("--data-key", help="the array to read from a --data .npz holding several")
    nl.add_argument("--layout", choices=LAYOUTS, help="the axes of a 4-D --data array when its shape is ambiguous")
    nl.add_argument("--n", type=_positive_int, help="number of test examples (default: all; 2000 for 2d)")
    nl.add_argument("--trace", choices=("exact", "hutchinson"), default="hutchinson",
                    help="divergence of the ODE's field: exact (D backward passes) or Hutchinson's estimate")
    nl.add_argument("--batch-size", type=_positive_int, default=500, help="test examples per ODE solve (default 500)")
    nl.add_argument("--tol", type=_positive_float, default=1e-5, help="ODE rtol = atol (default 1e-5)")
    nl.add_argument("--seed", type=_seed, default=0, help="seeds the dequantization noise and Hutchinson's probes")
    nl.add_argument("--device", type=_device, help=device)
    nl.add_argument("--threads", type=_positive_int, help=threads)
    for sp in (tr, sa, nl):  # usage errors then name the subcommand and show its usage
        sp.set_defaults(_parser=sp)
    return p


def _default_threads(kind: str) -> int:
    """One thread for the MLP; for the U-Nets torch's default, but no more than the cores not already
    busy (the CPUs this process may use, less the 1-minute load average; at least one)."""
    if kind == "mlp":
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        busy = 0.0
    return max(1, min(torch.get_num_threads(), cpus - round(busy)))


def _set_threads(requested: int | None, kind: str) -> None:
    """``--threads`` if given, else :func:`_default_threads` (see the module docstring)."""
    torch.set_num_threads(requested if requested is not None else _default_threads(kind))


def _check_writable(folder: Path, option: str, parser) -> None:
    """Fail at once, not after the work, when nothing can be written into ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".scorebook-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        parser.error(f"{option}: cannot write to {str(folder)!r}: {e.strerror or e}")


def _tty() -> bool:
    return sys.stderr.isatty()


class _Ticking:
    """The model as a score callable that ticks a progress bar at every evaluation."""

    def __init__(self, model: torch.nn.Module, bar):
        self.model, self.bar = model, bar

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.bar.update(1)
        return self.model(x, t)


# ----- commands ----------------------------------------------------------------------------------
def _resume_command(argv: Sequence[str]) -> str:
    """The command that continues this run: the same arguments without --no-resume."""
    args = [a for a in argv if a != "--no-resume"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = (["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}", "-m", "scorebook"]
            if world > 1 else ["python", "-m", "scorebook"])
    return shlex.join(head + args)


def _cmd_train(args, parser, argv) -> int:
    from .losses import sde_loss

    preset = PRESETS[args.preset]
    if args.toy and preset.data.source != "toy":
        parser.error(f"--toy only applies to the 2d preset, not {args.preset!r}")
    for flag, value in (("--data", args.data), ("--data-key", args.data_key), ("--layout", args.layout)):
        if value and preset.data.source != "images":
            parser.error(f"{flag} only applies to the image presets (mnist, cifar10), not {args.preset!r}")
    if preset.data.source == "images" and args.data is None:
        parser.error("this preset trains on your own images: pass --data PATH (.npz, .npy or a folder of images)")
    out = args.out or Path("runs") / args.preset
    if (out / "checkpoint.pt").is_dir():
        parser.error(f"--out: {str(out / 'checkpoint.pt')!r} is a folder; choose another --out")
    _check_writable(out, "--out", parser)
    spec = replace(preset.data, toy=args.toy) if args.toy else preset.data
    data = _load(spec, args.data, args.seed, parser, key=args.data_key, layout=args.layout)
    net_spec = preset.net
    if net_spec.kind == "unet":
        net_spec = replace(net_spec, in_channels=int(data.train.x.shape[1]))
    _set_threads(args.threads, net_spec.kind)
    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       checkpoint_every=args.checkpoint_every, device=args.device,
                                       bf16=args.bf16).items() if v is not None}
    try:
        cfg = replace(preset.train, seed=args.seed, compile=args.compile, resume=not args.no_resume,
                      progress=not args.no_progress, checkpoint=str(out / "checkpoint.pt"),
                      allow_changed_settings=args.allow_changed_settings, **overrides)
    except ValueError as e:
        parser.error(str(e))
    sde = build_sde(preset.sde)
    torch.manual_seed(args.seed)
    model = build_net(net_spec, sde)
    meta = {"preset": args.preset, "net": asdict(net_spec), "sde": asdict(preset.sde), "data": asdict(spec),
            "data_path": args.data, "seed": args.seed,
            "image_hw": list(data.train.x.shape[-2:]) if net_spec.kind == "unet" else None}
    meta.update({k: v for k, v in (("data_key", args.data_key), ("layout", args.layout)) if v})  # only when used
    loss = functools.partial(sde_loss, sde=sde, likelihood_weighting=preset.likelihood_weighting)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", message=".*nothing to train")  # said below, in the CLI's words
    try:
        res = train(model, loss, data.train, cfg, meta=meta)
    except TrainingInterrupted as e:
        if main_rank:
            print(f"scorebook train: interrupted by {e.signal_name} at step {e.step} of {cfg.steps}; checkpoint "
                  f"{e.checkpoint} holds it; resume with: {_resume_command(argv)}", file=sys.stderr)
        return 128 + int(e.signum)
    except (ValueError, FloatingPointError, OSError) as e:  # raised while training: not a usage error
        print(f"scorebook train: error: {e}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - t0
    if not main_rank:
        return 0
    if res.step == res.start_step:
        print(f"nothing to train: {cfg.checkpoint} is already at step {res.step} (--steps {cfg.steps}); "
              "pass a larger --steps to train further, or --no-resume to start afresh")
        return 0
    tail = res.losses[-100:]
    resumed = f" (resumed from step {res.start_step})" if res.start_step else ""
    print(f"trained {args.preset} to step {res.step}{resumed} in {wall:.1f} s; mean loss of the last {len(tail)} "
          f"steps {sum(tail) / max(len(tail), 1):.4f}; checkpoint {cfg.checkpoint}")
    return 0


@dataclass
class _Restored:
    model: torch.nn.Module
    sde: SDE
    meta: dict
    net: NetSpec
    data: DataSpec
    image_hw: Optional[tuple[int, int]]
    device: torch.device


def _restore(path: Path, device: str | None, parser) -> _Restored:
    """The EMA model of a checkpoint written by `train`, after checking everything it says."""
    try:
        ck = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        parser.error(f"--checkpoint: {e}")
    meta = ck.get("meta")
    if not isinstance(meta, dict) or "net" not in meta or "sde" not in meta:
        parser.error(f"--checkpoint: {str(path)!r} was not written by `scorebook train` (it has no model description)")
    try:
        if meta.get("preset") not in PRESETS:
            raise ValueError(f"meta['preset'] must be one of {sorted(PRESETS)}, got {meta.get('preset')!r}")
        net = _from_dict(NetSpec, meta["net"], "meta['net']")
        sde = build_sde(_from_dict(SDESpec, meta["sde"], "meta['sde']"))
        data = _from_dict(DataSpec, meta.get("data", {}), "meta['data']")
        if data.source not in ("toy", "digits", "images") or data.toy not in TOY_NAMES:
            raise ValueError(f"meta['data'] names an unknown source {data.source!r} or toy {data.toy!r}")
        ImageTransform(2, data.value_range)  # checks the value range
        n = net_parameters(net, sde)
        if n > MAX_NET_PARAMETERS:
            parser.error(f"--checkpoint: {str(path)!r} asks for a network of {n:,} parameters ({4 * n / 1e9:,.1f} GB "
                         f"in float32); scorebook builds at most {MAX_NET_PARAMETERS:,} from a checkpoint, so the file "
                         "is crafted or damaged")
        image_hw = _image_hw(meta, data) if net.kind == "unet" else None
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(f"--checkpoint: {str(path)!r} holds a malformed model description: {e}")
    model = build_net(net, sde)
    ema = ck["ema"]
    try:
        if not isinstance(ema, dict) or not isinstance(ema.get("module"), dict):
            raise CheckpointError(f"checkpoint {str(path)!r} has no EMA weights (ema['module'])")
        _load_model_state(model, ema["module"], "EMA model", str(path))
    except CheckpointError as e:
        parser.error(f"--checkpoint: {e}")
    dev = default_device(device)
    return _Restored(model.to(dev).eval(), sde, meta, net, data, image_hw, dev)


def _image_hw(meta: dict, spec: DataSpec) -> tuple[int, int]:
    if spec.source == "digits":
        return (8, 8)
    hw = meta.get("image_hw")
    if hw is None and not isinstance(meta.get("data_path"), str):
        raise ValueError("meta['image_hw'] is missing, and there is no data_path to learn the image size from")
    if hw is None:  # an older checkpoint: read the data once to learn the size
        hw = list(load_images(meta["data_path"], key=meta.get("data_key"), layout=meta.get("layout")).shape[-2:])
    if not (isinstance(hw, (list, tuple)) and len(hw) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE for v in hw)):
        raise ValueError(f"meta['image_hw'] must be two integers in [1, {MAX_IMAGE_SIDE}], got {hw!r}")
    return tuple(hw)


def _sample_paths(args, parser) -> tuple[Path, Path]:
    """Where ``sample`` writes, checked before it samples: a .png (or an existing folder) and the .npz."""
    out = args.out or args.checkpoint.with_name("samples.png")
    if out.is_dir():
        out = out / "samples.png"
    if out.suffix.lower() != ".png":
        parser.error(f"--out must be a .png path or an existing folder, got {str(out)!r} "
                     "(the samples also go to the same name with .npz)")
    npz = out.with_suffix(".npz")
    for p in (out, npz):
        if p.is_dir():
            parser.error(f"--out: {str(p)!r} is a folder, so the samples cannot be written there")
        if p.exists() and not os.access(p, os.W_OK):
            parser.error(f"--out: {str(p)!r} exists and is not writable")
    _check_writable(out.parent, "--out", parser)
    return out, npz


def _cmd_sample(args, parser, argv) -> int:
    from tqdm import tqdm

    from .samplers import euler_maruyama, predictor_corrector, probability_flow

    fixed_budget = args.sampler in _FAST
    if fixed_budget and args.steps is not None:
        parser.error(f"--steps is for --sampler pc or em; --sampler {args.sampler} takes a budget of score "
                     f"evaluations: use --nfe")
    if not fixed_budget and args.nfe is not None:
        parser.error(f"--nfe is for the fixed-budget samplers ({', '.join(_FAST)}); "
                     + ("--sampler ode is adaptive and picks its own steps" if args.sampler == "ode"
                        else f"--sampler {args.sampler} takes --steps"))
    nfe = _NFE_DEFAULT if args.nfe is None else args.nfe
    if fixed_budget and nfe < _MIN_NFE.get(args.sampler, 1):
        parser.error(f"--nfe: --sampler {args.sampler} needs at least {_MIN_NFE[args.sampler]} score evaluations, "
                     f"got {nfe}")
    r = _restore(args.checkpoint, args.device, parser)
    png, npz = _sample_paths(args, parser)
    _set_threads(args.threads, r.net.kind)
    shape = (args.n, r.net.dim) if r.net.kind == "mlp" else (args.n, r.net.in_channels, *r.image_hw)
    steps = args.steps or PRESETS[r.meta["preset"]].sample_steps
    g = torch.Generator(device=r.device).manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        x_T = r.sde.prior_sample(shape, generator=g, device=r.device)
        if args.sampler == "pc":
            x = predictor_corrector(r.sde, r.model, x_T, steps, snr=args.snr, generator=g, progress=_tty())
        elif args.sampler == "em":
            x = euler_maruyama(r.sde, r.model, x_T, steps, generator=g, progress=_tty())
        elif fixed_budget:  # scorebook.solvers: at most nfe score evaluations, counted
            counter = NFECounter(r.model)
            x = SAMPLERS[args.sampler](r.sde, counter, x_T, nfe, generator=g)
            print(f"{args.sampler}: {counter.nfe} score evaluations (budget {nfe})")
        else:  # adaptive solver: the number of steps is the solver's choice
            if args.steps:
                print("note: --steps does not apply to --sampler ode (an adaptive solver picks its steps)",
                      file=sys.stderr)
            with tqdm(desc="probability flow", unit=" score evals", disable=not _tty(), leave=False) as bar:
                x, nfe = probability_flow(r.sde, _Ticking(r.model, bar), x_T, return_nfe=True)
            print(f"probability flow: {nfe} score evaluations")
    wall = time.perf_counter() - t0
    x = x.float().cpu()
    if r.net.kind == "mlp":
        _scatter_png(x, png)
        np.savez(npz, x=x.numpy())
    else:
        unit = ImageTransform(2, r.data.value_range).to_unit(x).clamp(0, 1)  # (N, C, H, W) in [0, 1]
        _grid_png(unit, png)
        np.savez(npz, x=x.numpy(), images=(unit * 255).round().to(torch.uint8).numpy())
    print(f"{args.n} samples ({args.sampler}, {wall:.1f} s, {args.n / wall:.1f} samples/s) -> {png} and {npz}")
    return 0


def _grid_png(x01: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from .plotting import image_grid

    grid = (image_grid(x01) * 255).round().astype(np.uint8)
    zoom = max(1, 512 // max(grid.shape[:2]))  # enlarge small images so they can be seen
    img = Image.fromarray(grid)
    img.resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path, format="PNG")


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
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _cmd_nll(args, parser, argv) -> int:
    from tqdm import tqdm

    from .likelihood import discrete_bpd, log_likelihood

    r = _restore(args.checkpoint, args.device, parser)
    _set_threads(args.threads, r.net.kind)
    spec = r.data
    if spec.source != "images":
        for flag, value in (("--data", args.data), ("--data-key", args.data_key), ("--layout", args.layout)):
            if value:
                parser.error(f"{flag} does not apply to the {r.meta['preset']} preset: it is evaluated on "
                             + ("the held-out split of the digits" if spec.source == "digits"
                                else "fresh points drawn from its toy distribution"))
    if spec.source == "images":
        if args.data is None:
            print("warning: no --data given; evaluating on the training images", file=sys.stderr)
            path, key, layout = r.meta.get("data_path"), r.meta.get("data_key"), r.meta.get("layout")
        else:
            path, key, layout = args.data, args.data_key, args.layout
        try:
            test = load_images(path, key=key, layout=layout)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"--data: {e}")
        want = (r.net.in_channels, *r.image_hw)
        if tuple(test.shape[1:]) != want:
            parser.error("--data: the images are {}x{}x{} (channels x height x width), but the model was trained on "
                         "{}x{}x{}".format(*test.shape[1:], *want))
        tf, n_levels = ImageTransform(256, spec.value_range), 256
    elif spec.source == "digits":
        d = load_digits(seed=spec.split_seed)
        test, tf, n_levels = d.test_x, ImageTransform(d.n_levels, spec.value_range), d.n_levels
    else:
        # fresh points: a seed the training data (seeded with the training seed) never used
        seed = r.meta.get("seed", 0)
        test_seed = (seed if isinstance(seed, int) and 0 <= seed <= MAX_SEED else 0) + 10_000
        test, tf, n_levels = toy_data(spec.toy, args.n or 2000, seed=test_seed), None, None
    if args.n:
        test = test[: args.n]
    g = torch.Generator().manual_seed(args.seed)
    nats, nfes, t0 = [], [], time.perf_counter()
    n_batches = math.ceil(test.shape[0] / args.batch_size)
    with tqdm(unit=" score evals", disable=not _tty(), leave=False) as bar:
        for b, i in enumerate(range(0, test.shape[0], args.batch_size)):
            bar.set_description(f"nll batch {b + 1}/{n_batches}")
            xb = test[i:i + args.batch_size]
            y = (tf(xb, g) if tf is not None else xb).to(r.device)
            res = log_likelihood(r.sde, _Ticking(r.model, bar), y, trace=args.trace, rtol=args.tol, atol=args.tol,
                                 generator=torch.Generator(device=r.device).manual_seed(args.seed + i))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # one line, no source location
        print(f"scorebook {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        return _COMMANDS[args.command](args, args._parser, argv)
