"""Run every chapter of the book through nbval.

Chapters are jupytext MyST markdown files (``book/NN_slug.md``). We convert each to a
notebook on the fly under ``_build/nbval/`` (never committed) and hand it to nbval, so a
cell that raises fails the test run exactly as it fails the book build.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
from nbval.plugin import IPyNbFile

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "_build" / "nbval"


def _is_chapter(path: Path) -> bool:
    if path.suffix != ".md" or path.parent != ROOT / "book":
        return False
    head = path.read_text(encoding="utf-8")[:600]
    return head.startswith("---") and "format_name: myst" in head and "kernelspec" in head


def pytest_collect_file(file_path: Path, parent):
    if not _is_chapter(file_path):
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(file_path)
    target = OUT / (file_path.stem + ".ipynb")
    nbformat.write(nb, target)
    return IPyNbFile.from_parent(parent, path=target)
