"""One training loop for every loss, on one device or many.

``train(model, loss_fn, data, config)`` minimises any ``loss_fn(score, batch) -> scalar``
(for instance ``functools.partial(losses.sde_loss, sde=VPSDE())``) with Adam, a linear
learning-rate warm-up, gradient clipping and an exponential moving average (EMA) of the
weights. The same call runs

* on one device, chosen automatically (CUDA, then MPS, then CPU) unless ``config.device``
  says otherwise;
* under ``torchrun --nproc_per_node=N`` with DistributedDataParallel (NCCL on GPUs, gloo on
  CPU): every rank sees a disjoint shard of each epoch's permutation, gradients are averaged,
  so the effective batch is ``config.batch_size * N``; only rank 0 shows progress and writes
  checkpoints.

Checkpoints are written atomically (a temporary file in the same folder, then
``os.replace``), so a failed write never replaces a good file. They hold the model, the EMA,
the optimiser, the step, the loss history and every random state (torch CPU/CUDA, numpy,
Python, and the data-order and augmentation generators of every rank), so a resumed run
continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .contract import default_device
from .data import TensorData

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EMA",
    "DistInfo",
    "init_distributed",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "TrainingDivergedError",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "scorebook-checkpoint"
CHECKPOINT_VERSION = 1

LossFn = Callable[[Callable, Tensor], Tensor]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, foreign, or does not fit the model."""


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite."""


def _is_number(v: Any) -> bool:
    """A real number that is not a bool (``True`` is an int in Python, but never a learning rate)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the loss and the data.

    Attributes:
        steps: total number of optimiser steps (a resumed run continues up to this number).
        batch_size: examples per step *per process* (effective batch = batch_size x world size).
        lr: peak Adam learning rate; reached linearly over ``warmup_steps``.
        grad_clip: max global gradient norm (``None`` or 0 disables clipping).
        ema_decay: EMA decay (the effective decay ramps up as ``min(decay, (1+k)/(10+k))``).
        seed: seeds torch, numpy, Python and the data order (rank r adds r to the noise seed).
        device: ``None`` for automatic (CUDA, MPS, CPU) or a device string such as ``"cpu"``.
        bf16: bfloat16 autocast for the forward pass and loss (CUDA only; ignored elsewhere).
        compile: wrap the model with ``torch.compile``.
        checkpoint: file to write checkpoints to (``None``: no checkpoints).
        checkpoint_every: write a checkpoint every this many steps (and always at the end).
        resume: when ``checkpoint`` exists, continue from it instead of starting afresh.
        progress: show a tqdm bar with the running loss (rank 0 only).
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 100
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    device: Optional[str] = None
    bf16: bool = False
    compile: bool = False
    checkpoint: Optional[str] = None
    checkpoint_every: int = 1000
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and math.isfinite(self.grad_clip)
                                               and self.grad_clip >= 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or a finite number >= 0, got {self.grad_clip!r}")
        if not (_is_number(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"TrainConfig.ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
        if not (len(self.adam_betas) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in self.adam_betas)):
            raise ValueError(f"TrainConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not (_is_number(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"TrainConfig.adam_eps must be a number > 0, got {self.adam_eps!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"TrainConfig.device must be a torch device string like 'cpu' or 'cuda:0', "
                                 f"got {self.device!r}") from e


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-step loss history (all steps, including those before
    a resume), the trained model, its EMA copy (use this one for sampling) and the final step."""

    losses: list[float]
    model: nn.Module
    ema_model: nn.Module
    step: int


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.n_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.n_updates) / (10 + self.n_updates))
        for pe, pm in zip(self.module.parameters(), model.parameters()):
            pe.lerp_(pm.detach(), 1.0 - d)
        for be, bm in zip(self.module.buffers(), model.buffers()):
            be.copy_(bm)
        self.n_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "n_updates": self.n_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.n_updates = int(state["n_updates"])


# ----- distributed ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Without ``WORLD_SIZE > 1`` this is a single process on :func:`default_device`. Under
    torchrun it uses NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available
    and no other device is forced, and gloo on CPU otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistInfo(0, 1, default_device(device), False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = default_device(device)
    if dev.type == "cuda":  # one GPU per process, whatever index was asked for
        if dev.index not in (None, local_rank):
            warnings.warn(f"under torchrun each process uses cuda:LOCAL_RANK; ignoring {device!r} "
                          f"for cuda:{local_rank}", stacklevel=2)
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {dev.type!r}; "
                         "pass device='cpu' (--device cpu) or run a single process")
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev, created)


# ----- data order ----------------------------------------------------------------------------
class _BatchStream:
    """Epoch-wise shuffled, sharded batches with a resumable state.

    Each epoch draws one permutation from the data-order generator (the same on every rank);
    rank r takes positions r, r+W, r+2W, ... so the union of the ranks' k-th batches is the
    k-th block of ``batch_size * W`` positions. Incomplete batches at the end are dropped.
    """

    def __init__(self, data: TensorData, batch_size: int, seed: int, info: DistInfo):
        self.data, self.batch_size, self.info = data, batch_size, info
        n_shard = len(data) // info.world_size
        if n_shard < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {n_shard} examples each of the "
                             f"{info.world_size} process(es) gets from a data set of {len(data)}")
        self.steps_per_epoch = n_shard // batch_size
        self.order = torch.Generator().manual_seed(seed)
        self.aug = torch.Generator().manual_seed(seed + 7919 * (info.rank + 1))
        self.perm: Tensor | None = None
        self.pos = 0
        self.epoch = 0

    def next(self) -> Tensor:
        if self.perm is None or self.pos >= self.steps_per_epoch:
            n = len(self.data) - len(self.data) % self.info.world_size
            self.perm = torch.randperm(len(self.data), generator=self.order)[:n][self.info.rank::self.info.world_size]
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return self.data.batch(idx, self.aug)

    def state_dict(self) -> dict:
        return {"order": self.order.get_state(), "aug": self.aug.get_state(), "perm": self.perm,
                "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, s: dict) -> None:
        self.order.set_state(s["order"])
        self.aug.set_state(s["aug"])
        self.perm, self.pos, self.epoch = s["perm"], int(s["pos"]), int(s["epoch"])


def _rng_state(stream: _BatchStream) -> dict:
    npst = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": npst[0], "key": torch.from_numpy(npst[1].astype(np.int64)), "pos": int(npst[2]),
                  "has_gauss": int(npst[3]), "gauss": float(npst[4])},
        "python": random.getstate(),
        "stream": stream.state_dict(),
    }


def _set_rng_state(s: dict, stream: _BatchStream) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_tuplify(s["python"]))
    stream.load_state_dict(s["stream"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----- checkpoints ---------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    If anything fails the temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` (a ``ValueError``) naming the file when it is missing,
    truncated/corrupt, or not a scorebook checkpoint. Loads with ``weights_only=True``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled foreign objects...
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated, corrupt or not a torch file: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a scorebook checkpoint (no format={CHECKPOINT_FORMAT!r} tag)")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {obj.get('version')!r}; "
                              f"this scorebook reads version {CHECKPOINT_VERSION}")
    missing = [k for k in ("model", "ema", "optimizer", "step", "losses", "rng") if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}")
    return obj


def _check_checkpoint_path(path: Path, info: DistInfo) -> None:
    """Fail before training, not after it, when the checkpoint cannot be written."""
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; give a file path such as "
                              f"{str(path / 'checkpoint.pt')!r}")
    if not info.is_main:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e


_RUN_FIELDS = {"n_data": "number of training examples", "shape": "example shape", "data_sum": "training data",
               "batch_size": "batch_size", "seed": "seed", "meta": "run description (meta)"}


def _check_same_run(saved: dict | None, now: dict, path: Path) -> None:
    """Resuming continues the *same* run: refuse when the data or the settings that fix the
    trajectory differ from the checkpoint's (an old checkpoint without this record is accepted)."""
    if saved is None:
        return
    diff = [label for key, label in _RUN_FIELDS.items()
            if key in saved and not (math.isclose(saved[key], now[key], rel_tol=1e-9, abs_tol=1e-9)
                                     if key == "data_sum" else saved[key] == now[key])]
    if diff:
        raise CheckpointError(f"checkpoint {str(path)!r} belongs to a different run: the {', '.join(diff)} "
                              "differ(s). Resume with the same data and settings, or start afresh "
                              "(resume=False / --no-resume; the old checkpoint is kept as .prev)")


def _load_model_state(module: nn.Module, state: dict, what: str, path: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the {what} in checkpoint {path!r} does not fit this model: "
                              f"{str(e).splitlines()[0]}") from e


# ----- the loop ------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(model: nn.Module, loss_fn: LossFn, data: TensorData | Tensor, config: TrainConfig | None = None,
          *, meta: dict | None = None,
          callback: Callable[[int, float], Optional[bool]] | None = None) -> TrainResult:
    """Minimise ``loss_fn(score, batch)`` over ``model``'s parameters; see the module docstring.

    Args:
        model: a score network (``forward(x, t)`` shaped like x); moved to the chosen device.
        loss_fn: ``(score, batch) -> scalar tensor``; ``score`` is the (possibly DDP-wrapped or
            compiled) model, ``batch`` a tensor ``(batch_size, *shape)`` on the device.
        data: a :class:`~scorebook.data.TensorData` or a tensor ``(N, *shape)``.
        config: a :class:`TrainConfig`.
        meta: plain data stored in the checkpoint under ``"meta"`` (e.g. how to rebuild the model).
        callback: called as ``callback(step, loss)`` after each step (1-based step) on every rank;
            returning True stops training there (a checkpoint is written first, if configured).
            Under DDP the callback must decide the same on every rank.

    Returns:
        :class:`TrainResult` with the loss history (the mean over ranks of each step's loss).

    Raises:
        TrainingDivergedError: the loss is NaN or infinite; the message names the step.
        CheckpointError: ``config.resume`` and the checkpoint is unusable.
    """
    config = config or TrainConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (score, batch) -> scalar, got {type(loss_fn).__name__}")
    if isinstance(data, Tensor):
        data = TensorData(data)
    if not isinstance(data, TensorData):
        raise TypeError(f"data must be a TensorData or a tensor (N, ...), got {type(data).__name__}")

    info = init_distributed(config.device)
    try:
        return _train(model, loss_fn, data, config, info, meta or {}, callback)
    finally:
        if info.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(model, loss_fn, data, config, info, meta, callback) -> TrainResult:
    from tqdm import tqdm

    device = info.device
    _seed_all(config.seed + info.rank)
    use_bf16 = config.bf16 and device.type == "cuda"
    if config.bf16 and not use_bf16 and info.is_main:
        warnings.warn(f"bf16 autocast is only used on CUDA; training in float32 on {device}", stacklevel=3)

    model.to(device)
    data = TensorData(data.x.to(device), data.transform)
    stream = _BatchStream(data, config.batch_size, config.seed, info)
    net: nn.Module = model
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's weights; grads as bucket views avoid a copy (and a stride warning)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    ema = EMA(model, config.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    step, losses = 0, []

    ckpt = Path(config.checkpoint) if config.checkpoint else None
    run = {"n_data": len(data), "shape": list(data.x.shape[1:]), "data_sum": float(data.x.double().sum()),
           "batch_size": config.batch_size, "seed": config.seed, "meta": _plain(meta)}
    if ckpt is not None:
        _check_checkpoint_path(ckpt, info)
        if not config.resume and ckpt.exists() and info.is_main:
            kept = ckpt.with_name(ckpt.name + ".prev")
            os.replace(ckpt, kept)  # starting afresh must not silently discard a good checkpoint
            warnings.warn(f"resume=False: the existing checkpoint was moved to {str(kept)!r}", stacklevel=3)
        if info.world_size > 1:
            dist.barrier()
    if ckpt is not None and config.resume and ckpt.exists():
        state = load_checkpoint(ckpt, map_location="cpu")  # RNG states must stay on the CPU
        _check_same_run(state.get("run"), run, ckpt)
        _load_model_state(model, state["model"], "model", str(ckpt))
        _load_model_state(ema.module, state["ema"]["module"], "EMA model", str(ckpt))
        ema.n_updates = int(state["ema"]["n_updates"])
        opt.load_state_dict(state["optimizer"])
        step, losses = int(state["step"]), list(state["losses"])
        rng = state["rng"]
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank], stream)
        else:
            warnings.warn(f"checkpoint was written by {len(rng)} process(es), now {info.world_size}: "
                          "the data order and noise are re-seeded, so the run is not bit-identical", stacklevel=3)
            _seed_all(config.seed + info.rank + 104729 * step)
        if info.is_main and step >= config.steps:
            warnings.warn(f"checkpoint {str(ckpt)!r} is already at step {step} >= steps={config.steps}; "
                          "nothing to train", stacklevel=3)

    fwd = torch.compile(net) if config.compile else net
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())

    def write_checkpoint() -> None:
        rngs = [_rng_state(stream)]
        if info.world_size > 1:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, _rng_state(stream))
        if info.is_main:
            save_checkpoint(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "step": step, "losses": losses,
                                   "rng": rngs, "config": _plain(asdict(config)), "meta": meta, "run": run})

    bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and info.is_main),
               dynamic_ncols=True, leave=False)
    running = None
    model.train()
    try:
        while step < config.steps:
            for g in opt.param_groups:  # linear warm-up
                g["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            batch = stream.next()
            with autocast:
                loss = loss_fn(fwd, batch)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            value = loss.detach().float()
            if info.world_size > 1:  # the loss of the effective batch, identical on every rank
                value = value.clone()
                dist.all_reduce(value)
                value /= info.world_size
            value = value.item()
            if not math.isfinite(value):
                raise TrainingDivergedError(f"the loss is {value} at step {step + 1} (of {config.steps}); "
                                            f"try a smaller lr (now {config.lr:g}) or check the data and the loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            ema.update(model)
            step += 1
            losses.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            if info.is_main and (step % 10 == 0 or step == config.steps):
                bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            bar.update(1)
            stop = bool(callback(step, value)) if callback is not None else False
            if ckpt is not None and (stop or step % config.checkpoint_every == 0 or step == config.steps):
                write_checkpoint()
            if stop:
                break
    finally:
        bar.close()
    model.eval()
    return TrainResult(losses, model, ema.module, step)


def _plain(x: Any) -> Any:
    """Config values as plain types (tuples -> lists) so ``weights_only`` loading accepts them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
