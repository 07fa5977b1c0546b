"""Small trained models that ship with the book: how they are made from a run, and how to load them.

A training checkpoint (``python -m scorebook train ...``) holds everything needed to *resume*:
the weights, their EMA, Adam's two moment estimates, the loss history and every random state.
Sampling needs only the EMA weights and the description of the network and the SDE. A *model
file* keeps exactly that, so that it is small enough to commit:

* ``meta``: the model description ``scorebook train`` records (network spec, SDE spec, data spec);
* ``ema``: the EMA weights, floating-point parameters stored in ``float16`` when ``half=True``
  (halving the file; every buffer, such as the fixed random Fourier frequencies, stays ``float32``);
* ``command``: the command that produced the training run, so the file can always be regenerated;
* ``step``, ``losses`` and ``train_config``: where the run stopped, its loss at every step, and how it
  was configured.

The command is the source of truth, not the bytes: a regenerated file has the same *quality*
(see ``tests/test_digits_checkpoint.py``), not the same bits.

    from scorebook.pretrained import load_model
    model, sde, meta = load_model("data/digits_unet.pt")      # a ScoreUNet in eval mode, and its VP SDE
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .sde import SDE

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "export_model", "load_model", "image_shape"]

MODEL_FORMAT = "scorebook-model"
MODEL_VERSION = 1


def export_model(checkpoint: str | Path, out: str | Path, command: str, half: bool = True) -> Path:
    """Write the EMA weights and model description of a training ``checkpoint`` to ``out``.

    ``command`` is recorded verbatim (the command line that made the run). With ``half`` the
    floating-point parameters are stored as float16 (buffers stay float32). The file is written
    atomically (a temporary file, then ``os.replace``). Returns ``out`` as a ``Path``.
    """
    from .train import load_checkpoint

    if not isinstance(command, str) or not command.strip():
        raise ValueError("command must name the command line that produced the checkpoint")
    ck = load_checkpoint(checkpoint, map_location="cpu")
    meta = ck.get("meta") or {}
    if "net" not in meta or "sde" not in meta:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no model description (meta['net'], meta['sde']); "
                         "was it written by `python -m scorebook train`?")
    state = ck["ema"]["module"]
    param_names = {k for k, _ in _build(meta)[0].named_parameters()}
    ema = {k: (v.half() if (half and k in param_names and v.is_floating_point()) else v.clone())
           for k, v in state.items()}
    payload = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": meta, "ema": ema, "command": command,
               "step": int(ck["step"]), "losses": torch.tensor(ck["losses"], dtype=torch.float32),
               "train_config": ck.get("config", {})}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _build(meta: dict) -> tuple[nn.Module, SDE]:
    from .cli import NetSpec, SDESpec, _from_dict, build_net, build_sde

    sde = build_sde(_from_dict(SDESpec, meta["sde"]))
    return build_net(_from_dict(NetSpec, meta["net"]), sde), sde


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, SDE, dict]:
    """Load a model file written by :func:`export_model`.

    Returns ``(model, sde, meta)``: the score network in float32 and eval mode on ``device`` (a
    score callable ``model(x, t)``, see :mod:`scorebook.contract`), the forward SDE it was trained
    with, and the model description (``meta["command"]`` is the command that made it, ``meta["losses"]``
    the training loss at every step). Raises
    ``ValueError`` naming the file when it is missing or not a model file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    from .train import _MAGIC

    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) == _MAGIC:
            raise ValueError(f"{str(path)!r} is a training checkpoint, not a scorebook model file; a training "
                             "checkpoint is turned into one by scorebook.pretrained.export_model")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled foreign objects
        raise ValueError(f"model file {str(path)!r} is truncated, corrupt or not a torch file: "
                         f"{type(e).__name__}") from e
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ValueError(f"{str(path)!r} is not a scorebook model file (no format={MODEL_FORMAT!r} tag); "
                         "a training checkpoint is turned into one by scorebook.pretrained.export_model")
    if obj.get("version") != MODEL_VERSION:
        raise ValueError(f"model file {str(path)!r} has version {obj.get('version')!r}; this scorebook reads "
                         f"version {MODEL_VERSION}")
    model, sde = _build(obj["meta"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in obj["ema"].items()})
    for p in model.parameters():
        p.requires_grad_(False)
    meta = {**obj["meta"], "command": obj["command"], "step": obj["step"], "losses": obj["losses"].tolist(),
            "train_config": obj["train_config"]}
    return model.to(device).eval(), sde, meta


def image_shape(meta: dict) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a model file's U-Net was trained on."""
    net, hw = meta.get("net", {}), meta.get("image_hw")
    if net.get("kind") != "unet" or hw is None:
        raise ValueError("image_shape needs the description of a U-Net trained on images (meta['image_hw'])")
    return (int(net["in_channels"]), int(hw[0]), int(hw[1]))
