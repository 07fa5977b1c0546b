"""The Jupyter reader's path: JupyterLab opens a chapter as a notebook, and an executed chapter shows its figures.

* A real ``jupyter lab`` server (from requirements.txt) serves ``book/*.md`` as notebooks through jupytext's
  contents manager: what "Open With -> Jupytext Notebook" shows.
* In the executed notebooks the build produces (``_build/jupyter_execute``; the same files are offered for
  download), every figure cell has its picture as an output, and every animation its player, so a
  Jupyter reader sees what the HTML reader sees. Skipped without a build unless
  ``SCOREBOOK_REQUIRE_HTML=1``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = ROOT / "_build" / "jupyter_execute" / "book"
DOWNLOADS = ROOT / "_build" / "html" / "_sources" / "book"
REQUIRED = os.environ.get("SCOREBOOK_REQUIRE_HTML") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyterlab_opens_a_chapter_as_a_notebook(tmp_path):
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        pytest.fail(f"jupyter is not installed next to {sys.executable} (JupyterLab is in requirements.txt)")
    port, token = _free_port(), "scorebook-test"
    cmd = [str(jupyter), "lab", "--no-browser", "--allow-root", f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={ROOT}", "--ServerApp.open_browser=False"]
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"jupyter lab did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(1)
        url = f"{base}/api/contents/book/05_score_function.md?type=notebook&content=1&token={token}"
        model = json.load(urllib.request.urlopen(url, timeout=60))
        assert model["type"] == "notebook"
        cells = model["content"]["cells"]
        assert sum(c["cell_type"] == "code" for c in cells) >= 5
        assert model["content"]["metadata"]["kernelspec"]["name"] == "python3"
        # the lab front end itself is served (the page a reader opens)
        assert b"JupyterLab" in urllib.request.urlopen(f"{base}/lab?token={token}", timeout=60).read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _executed() -> list[Path]:
    """myst-nb's executed notebooks and the downloadable copies the pages offer (``_sources``)."""
    nbs = sorted(EXECUTED.glob("*.ipynb")) + sorted(DOWNLOADS.glob("*.ipynb"))
    if not nbs:
        if REQUIRED:
            pytest.fail("no executed notebooks in _build/jupyter_execute (build the book first)")
        pytest.skip("no built book: run the README's build command first")
    return nbs


def test_every_figure_is_visible_in_the_executed_notebooks():
    missing, n_figures = [], 0
    for path in _executed():
        nb = json.loads(path.read_text(encoding="utf-8"))
        for i, cell in enumerate(nb["cells"]):
            fig = (cell.get("metadata", {}).get("mystnb") or {}).get("figure")
            if cell["cell_type"] != "code" or not fig:
                continue
            n_figures += 1
            kinds = {k for out in cell.get("outputs", []) for k in out.get("data", {})}
            if not kinds & {"image/png", "image/svg+xml", "text/html"}:
                missing.append(f"{path.parent.parent.name}/{path.name} cell {i} ({fig.get('name')}): outputs {sorted(kinds)}")
    assert n_figures > 0, "no figure cells found: figures must be cell outputs with mystnb figure metadata"
    assert missing == [], missing
