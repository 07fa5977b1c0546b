"""Run every chapter of the book through nbval.

Chapters are jupytext MyST markdown files (``book/NN_slug.md``); no ``.ipynb`` is committed.
nbval reads notebooks with ``nbformat.read``; we hand it a reader that converts a chapter with
jupytext in memory, so ``pytest book/06_score_matching.md`` runs that chapter, its kernel starts
in ``book/``, and a cell that raises fails the test run exactly as it fails the book build.
"""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import nbval.plugin
from nbval.plugin import IPyNbFile

BOOK = Path(__file__).resolve().parent / "book"


class _ChapterReader:
    """``nbformat`` as nbval sees it, except that ``read`` converts MyST chapters with jupytext."""

    def __getattr__(self, name: str):
        return getattr(nbformat, name)

    @staticmethod
    def read(fp, as_version: int = 4, **kwargs):
        if str(fp).endswith(".md"):
            return jupytext.read(fp, as_version=as_version)
        return nbformat.read(fp, as_version=as_version, **kwargs)


nbval.plugin.nbformat = _ChapterReader()


def _is_chapter(path: Path) -> bool:
    if path.suffix != ".md" or path.parent != BOOK:
        return False
    head = path.read_text(encoding="utf-8")[:600]
    return head.startswith("---") and "format_name: myst" in head and "kernelspec" in head


def pytest_collect_file(file_path: Path, parent):
    if _is_chapter(file_path):
        return IPyNbFile.from_parent(parent, path=file_path)
    return None


# Longest first. pytest-xdist (``--dist loadfile``) hands files to the workers in collection order, so a
# long file collected last would run alone at the end while the other core idles. These files took 1-4
# minutes each on the 2-core machine (test_html's setup 214 s, test_bench's quick benchmark 154 s, the
# chapters 65-90 s by scripts/chapter_times.py and the build's log); starting them first lets the short ones
# fill the gaps.
LONGEST_FIRST = [
    "tests/test_html.py",                # every built page in headless Chromium
    "tests/test_bench.py",               # the quick benchmark, including the peer comparison
    "book/13_images.md",
    "book/06_score_matching.md",
    "book/12_probability_flow.md",
    "book/11_sdes.md",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = Path(__file__).resolve().parent

    def key(item):
        try:
            rel = Path(str(item.path)).resolve().relative_to(root).as_posix()
        except ValueError:
            rel = ""
        return rank.get(rel, len(rank))

    items.sort(key=key)   # stable: within a file, and among the other files, the collection order is kept
