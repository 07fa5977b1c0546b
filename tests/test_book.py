"""The book's harness: the table of contents matches the chapters, and a raising cell fails
both the test run (nbval through conftest.py) and the book build (execution errors are fatal)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HEADER = textwrap.dedent("""\
    ---
    jupytext:
      text_representation:
        extension: .md
        format_name: myst
        format_version: 0.13
    kernelspec:
      display_name: Python 3
      language: python
      name: python3
    ---
    """)


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc["parts"]:
        files += [c["file"] for c in part["chapters"]]
    return files


def test_toc_lists_every_chapter_and_nothing_else():
    listed = set(_toc_files())
    on_disk = {f"book/{p.stem}" for p in (ROOT / "book").glob("*.md")}
    assert listed == on_disk


def test_no_notebooks_are_committed():
    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked.strip() == ""


def test_chapters_are_jupytext_myst_with_python3_kernel():
    for p in sorted((ROOT / "book").glob("[0-9][0-9]_*.md")):
        head = p.read_text(encoding="utf-8")[:400]
        assert "format_name: myst" in head and "name: python3" in head, p.name


def _raising_chapter(directory: Path) -> Path:
    (directory / "book").mkdir()
    page = directory / "book" / "99_broken.md"
    page.write_text(HEADER + "\n# Broken\n\n```{code-cell} ipython3\nx = 1\n```\n\n"
                    "```{code-cell} ipython3\nraise RuntimeError('this cell must fail the run')\n```\n")
    return page


def test_a_raising_cell_fails_pytest(tmp_path):
    page = _raising_chapter(tmp_path)
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", str(page)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert re.search(r"1 failed", res.stdout), res.stdout[-2000:]
    assert "this cell must fail the run" in res.stdout


def test_a_raising_cell_fails_the_book_build(tmp_path):
    _raising_chapter(tmp_path)
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.pop("bibtex_bibfiles", None)
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    shutil.copytree(ROOT / "_ext", tmp_path / "_ext")          # the book's local Sphinx extension
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/99_broken\n")
    jb = Path(sys.executable).with_name("jupyter-book")
    if not jb.exists():
        pytest.fail(f"jupyter-book is not installed next to {sys.executable}")
    res = subprocess.run([str(jb), "build", str(tmp_path), "-W", "--keep-going"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0, res.stdout[-2000:]
    # it failed because of the cell, not because of anything else about the scratch book
    assert "this cell must fail the run" in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
