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

Checkpoints hold the model, the EMA, the optimiser, the step, the loss history and every
random state (torch CPU/CUDA, numpy, Python, and the data-order and augmentation generators of
every rank), so a resumed run continues exactly as the uninterrupted run would have. Nothing is
lost and nothing is read back wrong:

* **Atomic.** A checkpoint is written to a temporary file in the same folder (created with the
  user's usual file mode, ``0o666`` less the umask), fsynced, renamed over the old one with
  ``os.replace``, and the folder is fsynced. A failed write (a full disk, a kill) never replaces a
  good file; temporaries that a killed process left behind are removed when training next starts.
* **Checksummed.** The file is one header line, ``scorebook-checkpoint 2 sha256 <hex> <n>``,
  then the ``torch.save`` archive of ``n`` bytes whose SHA-256 the header holds.
  :func:`load_checkpoint` verifies the length and the digest before it unpickles anything (with
  ``weights_only=True``, so a file cannot run code), and refuses a file whose bytes changed.
  A bare ``torch.save`` archive with the scorebook tag (version 1, written before checksums, or a
  checkpoint re-saved by hand with ``torch.save``) is still read, with a warning that it cannot be
  verified; the next save adds the checksum. Corruption cannot turn a checksummed file into a bare
  archive: that would need its first bytes rewritten into a zip signature.
* **Earlier runs are kept.** Starting afresh (``resume=False``) over an existing checkpoint
  renames it to ``<name>.prev.1``, then ``.prev.2``, ...; no earlier run is ever overwritten.
* **Same run or refused.** Resuming compares the data and every setting that changes the
  trajectory (batch size, seed, lr, warm-up, Adam's betas and eps, gradient clipping, EMA decay,
  bf16) with the checkpoint's, and refuses a difference, naming each setting with its old and
  new value, unless ``allow_changed_settings=True``, which continues with the new optimisation
  settings and records the change in the checkpoint. ``steps`` may grow.
* **Ctrl-C saves.** With a checkpoint configured, SIGINT and SIGTERM make the loop finish the
  current step, write a checkpoint and raise :class:`TrainingInterrupted` (a
  ``KeyboardInterrupt``); a second signal stops at once, without saving. The handlers are
  installed only in the main thread and only while :func:`train` runs, then the previous ones
  are restored. Under torchrun the stop request travels with the loss all-reduce, so every rank
  stops after the same step and rank 0 writes the checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import math
import os
import random
import re
import secrets
import signal
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .contract import NonFiniteError, check_finite, default_device
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
    "TrainingInterrupted",
    "CHECKPOINT_FORMAT",
    "MAX_SEED",
]

CHECKPOINT_FORMAT = "scorebook-checkpoint"
CHECKPOINT_VERSION = 2
MAX_SEED = 2**63 - 1  #: seeds lie in [0, MAX_SEED]; rank and step offsets then stay inside torch's 64-bit range

LossFn = Callable[[Callable, Tensor], Tensor]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, foreign, does not fit the model or the run,
    or cannot be written."""


class TrainingDivergedError(FloatingPointError):
    """The loss, the score or the weights became NaN or infinite; the message names the step."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`train` after a step; ``checkpoint`` holds that ``step``."""

    def __init__(self, step: int, checkpoint: str, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        try:
            self.signal_name = signal.Signals(signum).name
        except ValueError:
            self.signal_name = f"signal {signum}"
        super().__init__(f"training interrupted by {self.signal_name} after step {step}; checkpoint "
                         f"{checkpoint!r} holds step {step}")


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
        resume: when ``checkpoint`` exists, continue from it instead of starting afresh (an existing
            file is then kept as ``<checkpoint>.prev.N``).
        progress: show a tqdm bar with the running loss (rank 0 only).
        allow_changed_settings: resume even if lr, warm-up, Adam's betas/eps, clipping, EMA decay or
            bf16 differ from the checkpoint's; the change is recorded in it and a warning says so.
            (Other data, batch size or seed are a different run and are always refused.)
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
    allow_changed_settings: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"TrainConfig.seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
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
        for name in ("bf16", "compile", "resume", "progress", "allow_changed_settings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-step loss history (all steps, including those before
    a resume), the trained model, its EMA copy (use this one for sampling), the final step and
    the step this call started from (``start_step == step``: there was nothing left to train)."""

    losses: list[float]
    model: nn.Module
    ema_model: nn.Module
    step: int
    start_step: int = 0


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
_MAGIC = b"scorebook-checkpoint"


def _header(digest: str, n: int) -> bytes:
    """The fixed-length first line of a version-2 checkpoint."""
    return b"%s %d sha256 %s %016d\n" % (_MAGIC, CHECKPOINT_VERSION, digest.encode("ascii"), n)


_HEADER_LEN = len(_header("0" * 64, 0))


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it (``torch.save`` streams into it)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


class _Payload(io.RawIOBase):
    """The part of an open checkpoint after its header, as a seekable file for ``torch.load``."""

    def __init__(self, f, offset: int):
        self.f, self.offset = f, offset
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos + self.offset if whence == 0 else pos, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def readinto(self, b) -> int:
        return self.f.readinto(b)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically and with a SHA-256 checksum (see the module docstring).

    The temporary file ``.<name>.<random>.tmp`` in the same folder is created with mode ``0o666``
    less the umask, written, fsynced and renamed over ``path``; then the folder is fsynced. If
    anything fails the temporary file is removed, an existing ``path`` is left untouched, and the
    error (an ``OSError`` such as a full disk) propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header("0" * 64, 0))               # placeholder, rewritten once the digest is known
            sink = _HashingWriter(f)
            torch.save(payload, sink)
            f.seek(0)
            f.write(_header(sink.sha.hexdigest(), sink.n))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _verify(f, path: Path) -> None:
    """Check a version-2 header and the payload's length and SHA-256; ``f`` is at offset 0."""
    head = f.read(_HEADER_LEN)
    parts = head.split(b" ")
    if len(head) < _HEADER_LEN or len(parts) != 5 or parts[2] != b"sha256" or not head.endswith(b"\n"):
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt: its header line is damaged")
    if parts[1] != str(CHECKPOINT_VERSION).encode():
        raise CheckpointError(f"checkpoint {str(path)!r} has version {parts[1].decode(errors='replace')!r}; "
                              f"this scorebook reads versions 1 and {CHECKPOINT_VERSION}")
    try:
        digest, n = parts[3].decode("ascii"), int(parts[4])
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its header line is damaged") from None
    have = os.fstat(f.fileno()).st_size - _HEADER_LEN
    if have != n:
        raise CheckpointError(f"checkpoint {str(path)!r} is {'truncated' if have < n else 'corrupt'}: its header "
                              f"announces {n} bytes of data, the file holds {have}")
    sha = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha.update(chunk)
    if sha.hexdigest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: the SHA-256 of its data does not match the "
                              "checksum in its header (its bytes changed after it was written); "
                              "use an earlier checkpoint or start afresh")


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, after verifying its checksum.

    Raises :class:`CheckpointError` (a ``ValueError``) naming the file when it is missing,
    unreadable, truncated, corrupt (its SHA-256 differs from the one in its header), or not a
    scorebook checkpoint. Unpickles with ``weights_only=True``. A file without the checksum header
    (version 1, or re-saved with ``torch.save``) is read with a warning that it is unverified.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            start = f.read(len(_MAGIC) + 1)
            f.seek(0)
            verified = start == _MAGIC + b" "
            if verified:
                _verify(f, path)
                obj = _torch_load(_Payload(f, _HEADER_LEN), map_location, path)
            elif start.startswith(b"PK\x03\x04"):  # a bare torch.save archive: version 1, re-saved by hand, or not ours
                obj = _torch_load(f, map_location, path)
            else:
                raise CheckpointError(f"checkpoint {str(path)!r} is truncated, corrupt or not a scorebook checkpoint: "
                                      "it starts with neither the scorebook header nor a torch archive")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from e
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a scorebook checkpoint (no format={CHECKPOINT_FORMAT!r} tag)")
    if obj.get("version") not in (1, CHECKPOINT_VERSION) or (verified and obj.get("version") != CHECKPOINT_VERSION):
        raise CheckpointError(f"checkpoint {str(path)!r} has version {obj.get('version')!r}; "
                              f"this scorebook reads versions 1 and {CHECKPOINT_VERSION}")
    if not verified:
        warnings.warn(f"checkpoint {str(path)!r} has no checksum (written by an older scorebook, or re-saved with "
                      "torch.save), so its contents cannot be verified; it is still read safely, with "
                      "weights_only=True, and the next save adds a checksum", stacklevel=2)
    missing = [k for k in ("model", "ema", "optimizer", "step", "losses", "rng") if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}")
    return obj


def _torch_load(f, map_location, path: Path) -> Any:
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled foreign objects...
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated, corrupt or not a torch file: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _check_finite_state(state: dict, what: str, path: str | Path) -> None:
    """Refuse a state dict holding NaN or infinite values, naming the first such entry."""
    for k, v in state.items():
        if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"the {what} in checkpoint {str(path)!r} holds NaN or infinite values "
                                  f"(first in {k!r}); it comes from a diverged or damaged run")


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
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {e.strerror or e}") from e


def _remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries that a killed save (``kill -9``, power loss) left next to ``path``."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[^.]+\.(tmp|probe)")
    stale = [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def _keep_previous(path: Path) -> Path:
    """Rename an existing checkpoint to ``<name>.prev.N`` with N one more than any kept so far."""
    pattern = re.compile(re.escape(f"{path.name}.prev.") + r"(\d+)")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    n = max(taken, default=0) + 1
    while (kept := path.with_name(f"{path.name}.prev.{n}")).exists():
        n += 1
    os.rename(path, kept)
    _fsync_dir(path.parent)
    return kept


_RUN_FIELDS = {"n_data": "number of training examples", "shape": "example shape", "data_sum": "training data",
               "batch_size": "batch_size", "seed": "seed", "meta": "run description (meta)"}
#: optimisation settings that change the trajectory (compared on resume; ``allow_changed_settings`` accepts changes)
_SETTINGS = ("lr", "warmup_steps", "adam_betas", "adam_eps", "grad_clip", "ema_decay", "bf16")


def _settings(config: TrainConfig, use_bf16: bool) -> dict:
    return {"lr": float(config.lr), "warmup_steps": config.warmup_steps, "adam_betas": [float(b) for b in config.adam_betas],
            "adam_eps": float(config.adam_eps), "grad_clip": float(config.grad_clip or 0.0),
            "ema_decay": float(config.ema_decay), "bf16": use_bf16}


def _saved_settings(state: dict) -> dict:
    """The settings a checkpoint was trained with (older checkpoints: from their stored config)."""
    run = state.get("run") or {}
    if isinstance(run.get("settings"), dict):
        return run["settings"]
    cfg = state.get("config") or {}
    old = {k: cfg[k] for k in _SETTINGS if k in cfg and k != "bf16"}  # bf16 there was the flag, not its effect
    if "grad_clip" in old:
        old["grad_clip"] = float(old["grad_clip"] or 0.0)
    return old


def _check_same_run(state: dict, now: dict, path: Path, config: TrainConfig) -> list[dict]:
    """Resuming continues the *same* run.

    Refuse when the data, the batch size, the seed or the description differ from the checkpoint's
    (an old checkpoint without this record is accepted). Refuse when an optimisation setting
    differs, unless ``config.allow_changed_settings``; then return the changes, one ``{name: [old, new]}``.
    """
    saved = state.get("run")
    if saved is not None:
        diff = [label for key, label in _RUN_FIELDS.items()
                if key in saved and not (math.isclose(saved[key], now[key], rel_tol=1e-9, abs_tol=1e-9)
                                         if key == "data_sum" else saved[key] == now[key])]
        if diff:
            raise CheckpointError(f"checkpoint {str(path)!r} belongs to a different run: the {', '.join(diff)} "
                                  "differ(s). Resume with the same data and settings, or start afresh "
                                  "(resume=False / --no-resume; the old checkpoint is kept as .prev.N)")
    old = _saved_settings(state)
    changed = {k: [old[k], now["settings"][k]] for k in _SETTINGS if k in old and old[k] != now["settings"][k]}
    if changed and not config.allow_changed_settings:
        listing = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(f"checkpoint {str(path)!r} was trained with other settings: {listing}. Resuming "
                              "with them would change the run's trajectory. Use the checkpoint's settings, or "
                              "continue with the new ones and record the change (allow_changed_settings=True / "
                              "--allow-changed-settings), or start afresh (resume=False / --no-resume; the old "
                              "checkpoint is kept as .prev.N)")
    return [changed] if changed else []


def _load_model_state(module: nn.Module, state: dict, what: str, path: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:3] if line.strip())
        raise CheckpointError(f"the {what} in checkpoint {path!r} does not fit this model: "
                              f"{detail[:400]}") from e
    _check_finite_state(state, what, path)


# ----- stopping on a signal --------------------------------------------------------------------
class _StopOnSignal:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step (see the module docstring)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        if self.enabled:
            for name in ("SIGINT", "SIGTERM"):
                sig = getattr(signal, name, None)
                if sig is not None:
                    with contextlib.suppress(ValueError, OSError):
                        self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, without a final checkpoint
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a final checkpoint")
        self.signum = signum

    def _restore(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()


# ----- the loop ------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _check_data(model: nn.Module, data: TensorData) -> None:
    """Fail before training when batches will not suit the model: they must be floating point, of the
    dtype of the model's parameters, and finite (checked on the data, or on one transformed example)."""
    if data.transform is None:
        probe = data.x[:1]
    else:
        probe = data.batch(torch.arange(1), torch.Generator(device=data.x.device).manual_seed(0))
    if not isinstance(probe, Tensor):
        raise TypeError(f"data.transform must return a tensor, got {type(probe).__name__}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    hint = ("integer images need a transform, e.g. TensorData(x, ImageTransform(n_levels)); other data "
            "x.float()" if not data.x.is_floating_point() and data.transform is None else
            f"convert the data (x.to({dtype})) or the model (model.to({probe.dtype}))")
    if not probe.is_floating_point():
        raise ValueError(f"data: training batches must be floating point, got {probe.dtype}; {hint}")
    if dtype is not None and probe.dtype != dtype:
        raise ValueError(f"data: training batches are {probe.dtype} but the model's parameters are {dtype}; {hint}")
    check_finite("data", data.x if data.transform is None else probe)


def train(model: nn.Module, loss_fn: LossFn, data: TensorData | Tensor, config: TrainConfig | None = None,
          *, meta: dict | None = None,
          callback: Callable[[int, float], Optional[bool]] | None = None) -> TrainResult:
    """Minimise ``loss_fn(score, batch)`` over ``model``'s parameters; see the module docstring.

    Args:
        model: a score network (``forward(x, t)`` shaped like x); moved to the chosen device.
        loss_fn: ``(score, batch) -> scalar tensor``; ``score`` is the (possibly DDP-wrapped or
            compiled) model, ``batch`` a tensor ``(batch_size, *shape)`` on the device.
        data: a :class:`~scorebook.data.TensorData` or a tensor ``(N, *shape)``; its batches (after
            the transform) must be floating point of the model's dtype, and finite.
        config: a :class:`TrainConfig`.
        meta: plain data stored in the checkpoint under ``"meta"`` (e.g. how to rebuild the model).
        callback: called as ``callback(step, loss)`` after each step (1-based step) on every rank;
            returning True stops training there (a checkpoint is written first, if configured).
            Under DDP the callback must decide the same on every rank.

    Returns:
        :class:`TrainResult` with the loss history (the mean over ranks of each step's loss).

    Raises:
        TrainingDivergedError: the loss, the score or an optimizer step is NaN or infinite; the
            message names the step and the last finite loss. No checkpoint is written then, so the
            last one on disk is from before the divergence.
        TrainingInterrupted: SIGINT/SIGTERM with a checkpoint configured; the checkpoint holds the step.
        CheckpointError: the checkpoint cannot be resumed from (corrupt, another run, other settings)
            or cannot be written (the message says which; the previous checkpoint is then intact).
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (score, batch) -> scalar, got {type(loss_fn).__name__}")
    if isinstance(data, Tensor):
        data = TensorData(data)
    if not isinstance(data, TensorData):
        raise TypeError(f"data must be a TensorData or a tensor (N, ...), got {type(data).__name__}")
    _check_data(model, data)

    info = init_distributed(config.device)
    try:
        with _StopOnSignal(enabled=config.checkpoint is not None) as stop:
            return _train(model, loss_fn, data, config, info, meta or {}, callback, stop)
    finally:
        if info.created_group and dist.is_initialized():
            dist.destroy_process_group()


def _diverged(step: int, what: str, losses: list[float], config: TrainConfig) -> TrainingDivergedError:
    last = next(((k, v) for k, v in zip(range(len(losses), 0, -1), reversed(losses)) if math.isfinite(v)), None)
    before = (f"the last finite loss was {last[1]:.6g} at step {last[0]}" if last else "no earlier step had a finite loss")
    return TrainingDivergedError(f"training diverged at step {step} (of {config.steps}): {what}; {before}. "
                                 f"Try a smaller lr (now {config.lr:g}) or check the data and the loss")


def _train(model, loss_fn, data, config, info, meta, callback, stop: _StopOnSignal) -> TrainResult:
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
           "batch_size": config.batch_size, "seed": config.seed, "meta": _plain(meta),
           "settings": _settings(config, use_bf16), "changes": []}
    if ckpt is not None:
        _check_checkpoint_path(ckpt, info)
        if info.is_main:
            stale = _remove_stale_temporaries(ckpt)
            if stale:
                warnings.warn(f"removed {len(stale)} temporary file(s) that an interrupted save left next to "
                              f"{str(ckpt)!r}", stacklevel=3)
            if not config.resume and ckpt.exists():
                kept = _keep_previous(ckpt)  # starting afresh never discards an earlier run
                warnings.warn(f"resume=False: the existing checkpoint was kept as {str(kept)!r}", stacklevel=3)
        if info.world_size > 1:
            dist.barrier()
    if ckpt is not None and config.resume and ckpt.exists():
        state = load_checkpoint(ckpt, map_location="cpu")  # RNG states must stay on the CPU
        changes = _check_same_run(state, run, ckpt, config)
        run["changes"] = list((state.get("run") or {}).get("changes", []))
        try:
            _load_model_state(model, state["model"], "model", str(ckpt))
            _load_model_state(ema.module, state["ema"]["module"], "EMA model", str(ckpt))
            ema.n_updates = int(state["ema"]["n_updates"])
            opt.load_state_dict(state["optimizer"])
            for g in opt.param_groups:  # the optimiser's stored hyper-parameters give way to this run's
                g.update(betas=config.adam_betas, eps=config.adam_eps)
            step, losses = int(state["step"]), [float(v) for v in state["losses"]]
            rng = state["rng"]
            if len(rng) == info.world_size:
                _set_rng_state(rng[info.rank], stream)
            else:
                warnings.warn(f"checkpoint was written by {len(rng)} process(es), now {info.world_size}: "
                              "the data order and noise are re-seeded, so the run is not bit-identical", stacklevel=3)
                _seed_all(config.seed + info.rank + 104729 * step)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is malformed (hand-edited or from another program): "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        for c in changes:
            run["changes"].append({"step": step, **c})
            if info.is_main:
                warnings.warn(f"resuming {str(ckpt)!r} at step {step} with changed settings: "
                              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c.items())
                              + "; the change is recorded in the checkpoint (run['changes'])", stacklevel=3)
        if info.is_main and step >= config.steps:
            warnings.warn(f"checkpoint {str(ckpt)!r} is already at step {step} >= steps={config.steps}; "
                          "nothing to train", stacklevel=3)
    start_step = step

    fwd = torch.compile(net) if config.compile else net
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())
    param_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def write_checkpoint() -> None:
        rngs = [_rng_state(stream)]
        if info.world_size > 1:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, _rng_state(stream))
        if info.is_main:
            try:
                save_checkpoint(ckpt, {"model": model.state_dict(), "ema": ema.state_dict(),
                                       "optimizer": opt.state_dict(), "step": step, "losses": losses,
                                       "rng": rngs, "config": _plain(asdict(config)), "meta": meta, "run": run})
            except OSError as e:
                raise CheckpointError(f"cannot write checkpoint {str(ckpt)!r} at step {step}: {e.strerror or e}; "
                                      "the checkpoint already on disk (if any) is intact") from e

    bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and info.is_main),
               dynamic_ncols=True, leave=False)
    running = None
    model.train()
    try:
        while step < config.steps:
            for g in opt.param_groups:  # linear warm-up
                g["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            batch = stream.next()
            try:
                with autocast:
                    loss = loss_fn(fwd, batch)
            except NonFiniteError as e:  # the network's output went NaN/inf: the weights have diverged
                if step == 0:
                    raise
                raise _diverged(step + 1, str(e), losses, config) from e
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            value = loss.detach().float()
            signalled = stop.signum is not None
            if info.world_size > 1:  # the loss of the effective batch, and any rank's stop request
                packed = torch.stack([value, value.new_tensor(float(signalled))])
                dist.all_reduce(packed)
                value, signalled = packed[0] / info.world_size, bool(packed[1].item() > 0)
            value = value.item()
            if not math.isfinite(value):
                raise _diverged(step + 1, f"the loss is {value}", losses, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            try:
                opt.step()
            except RuntimeError as e:
                if "overflow" not in str(e):
                    raise
                raise _diverged(step + 1, f"the optimizer step overflowed the model's {param_dtype} weights "
                                f"({str(e).splitlines()[0]})", losses, config) from e
            ema.update(model)
            step += 1
            losses.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            if info.is_main and (step % 10 == 0 or step == config.steps):
                bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            bar.update(1)
            stop_now = bool(callback(step, value)) if callback is not None else False
            if info.world_size == 1:
                signalled = stop.signum is not None
            if ckpt is not None and (stop_now or signalled or step % config.checkpoint_every == 0
                                     or step == config.steps):
                write_checkpoint()
            if signalled:
                raise TrainingInterrupted(step, str(ckpt), stop.signum or signal.SIGTERM)
            if stop_now:
                break
    finally:
        bar.close()
    model.eval()
    return TrainResult(losses, model, ema.module, step, start_step)


def _plain(x: Any) -> Any:
    """Config values as plain types (tuples -> lists) so ``weights_only`` loading accepts them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
