"""Make the digits model that chapter 13 loads: train the `digits` preset, then keep the EMA weights.

    python scripts/make_digits_model.py                      # writes book/data/digits_unet.pt
    python scripts/make_digits_model.py --out /tmp/d.pt --run /tmp/run

is exactly

    python -m scorebook train --preset digits --out runs/digits_model --no-resume --no-progress --threads 1
    # then scorebook.pretrained.export_model(runs/digits_model/checkpoint.pt, book/data/digits_unet.pt, ...)

Training takes about 20 CPU minutes on one thread (3000 steps of batch 128 at about 0.4 s each; 1234 s
measured on the 2-core machine this book is built on). The model file holds the EMA weights (parameters in float16) and the model
description, about 1.5 MB. tests/test_digits_checkpoint.py re-runs this and compares quality.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "book" / "data" / "digits_unet.pt"


def train_args(run: Path) -> list[str]:
    """The arguments of ``python -m scorebook train`` that make the digits model."""
    return ["train", "--preset", "digits", "--out", str(run), "--no-resume", "--no-progress", "--threads", "1"]


def make(out: Path = OUT, run: Path = ROOT / "runs" / "digits_model") -> Path:
    from scorebook.cli import main as cli_main
    from scorebook.pretrained import export_model

    args = train_args(run)
    if cli_main(args) != 0:
        raise RuntimeError("training failed")
    shown = " ".join(train_args(Path("runs/digits_model")))
    return export_model(run / "checkpoint.pt", out, command=f"python -m scorebook {shown}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="model file to write (default book/data/digits_unet.pt)")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "digits_model", help="training run folder")
    a = p.parse_args(argv)
    path = make(a.out, a.run)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
