"""Rules every chapter keeps (CONTRIBUTING.md), checked on the chapter sources."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _chapters() -> list[Path]:
    return sorted(p for p in (ROOT / "book").glob("*.md") if "kernelspec" in p.read_text(encoding="utf-8")[:600])


def test_explorers_never_use_output_widgets():
    """``interact``/``interactive``/``Output`` make nbclient write to the kernel during a cell, which can stall
    the build for the whole cell timeout; chapters use ``scorebook.plotting.explorer`` instead."""
    bad = re.compile(r"\b(interact|interactive|interactive_output)\(|widgets\.Output\b|@interact")
    offenders = [f"{p.name}:{i}" for p in _chapters()
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert offenders == [], offenders


def test_figures_are_cell_outputs_not_hidden_glue():
    """A Jupyter reader must see every figure: no ``glue(..., fig, display=False)`` and no ``glue:figure``."""
    offenders = [f"{p.name}:{i}" for p in _chapters()
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if "{glue:figure}" in line or re.search(r"glue\([^)]*\bfig\w*\b[^)]*display=False", line)]
    assert offenders == [], offenders


def test_no_text_below_nine_points_in_figures():
    # text sizes only: fontsize=, labelsize=, or size= as a keyword of its own (not markersize, capsize, ...)
    small = re.compile(r"(\bfontsize|\blabelsize|(?<![\w.])size)\s*=\s*([0-8](\.\d+)?)\b")
    offenders = [f"{p.name}:{i}: {line.strip()}" for p in _chapters()
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if small.search(line)]
    assert offenders == [], offenders
