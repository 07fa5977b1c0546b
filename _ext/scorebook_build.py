"""Sphinx extension for the scorebook build (loaded through ``sphinx.local_extensions`` in _config.yml).

It does four small things the themes do not:

* **Executed notebooks for download and Colab.** sphinx-book-theme copies each chapter's executed
  notebook to ``_sources/<page>.ipynb`` and offers it in the download menu. We prepend one cell that
  installs scorebook from the repository when it is missing (Colab, a fresh laptop), and point the
  Colab button at that executed notebook on the published site's branch (``gh-pages``): Colab opens
  ``.ipynb`` files from GitHub, not the MyST ``.md`` chapters. Both come from the one
  ``repository`` setting in _config.yml.
* **No duplicated inline scripts, no dead widget state.** sphinx-thebe and sphinx-togglebutton add
  their inline configuration scripts twice (once with an empty file name, once with none), and the
  duplicated ``const THEBE_JS_URL = ...`` throws "Identifier 'THEBE_JS_URL' has already been
  declared" on every page. We keep one copy of each. The explorers' widget state (with their PNGs)
  is dropped from the pages too: without a kernel it only adds weight.
* **Wide display equations fit their column** (``static/scorebook-math.js``): after MathJax has
  typeset a page, an equation wider than its column is scaled down (to at most 60 %), and only if it
  still does not fit does it scroll; it is never cut off.
* A light default colour mode (an empty one logs a JavaScript error on every page).
* Nothing is fetched from a CDN: no widget manager (``nb_ipywidgets_js: {}`` in _config.yml) and
  MathJax from ``sphinx-mathjax-offline``.
* **Chapters execute in parallel.** myst-nb executes the notebooks one after another while Sphinx reads
  them. Before reading, we execute every chapter whose outputs are not in the execution cache, one
  process per core (``SCOREBOOK_BUILD_JOBS`` overrides the count; 1 turns this off), with myst-nb's own
  execution function and settings, and store the results in its cache, where myst-nb then finds them.
  Each kernel is limited to one BLAS/OpenMP thread, so that N kernels share N cores without
  oversubscription (every chapter also sets ``torch.set_num_threads(1)`` itself). A chapter that fails
  here is left out of the cache, and myst-nb runs it again on its own and reports the error as usual.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

STATIC = Path(__file__).parent / "static"
PAGES_BRANCH = "gh-pages"  #: where ``ghp-import -n -p -f _build/html`` publishes the site (README)


def _repo(app) -> tuple[str, str, str] | None:
    """(org, repo, branch) from ``html_theme_options`` (jupyter-book fills it from ``repository``)."""
    opts = app.config.html_theme_options or {}
    url = (opts.get("repository_url") or "").rstrip("/")
    m = re.match(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?$", url)
    if not m:
        return None
    return m.group(1), m.group(2), opts.get("repository_branch") or "main"


def _fix_page(app, pagename, templatename, context, doctree) -> None:
    # one copy of each inline script (sphinx-thebe's configuration can appear twice)
    scripts = context.get("script_files")
    if scripts:
        seen, kept = set(), []
        for js in scripts:
            attrs = getattr(js, "attributes", None) or {}
            if attrs.get("type") == "application/vnd.jupyter.widget-state+json":
                continue            # widget state (PNG bytes and all) is useless without a kernel: drop it
            key = (getattr(js, "filename", None) or None, attrs.get("body"))
            if key != (None, None) and key in seen:
                continue            # the same inline script twice (sphinx-thebe's, sphinx-togglebutton's)
            seen.add(key)
            kept.append(js)
        scripts[:] = kept           # in place: extensions that add files later append to this same list
    # the Colab button opens the executed notebook of this page on the published branch
    repo = _repo(app)
    if repo is None or "ipynb_source" not in context:
        return
    org, name, _ = repo
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []) if isinstance(group, dict) else []:
            if button.get("text") == "Colab":
                button["url"] = (f"https://colab.research.google.com/github/{org}/{name}/blob/{PAGES_BRANCH}/"
                                 f"_sources/{context['ipynb_source']}")


def _install_cell(app) -> dict | None:
    repo = _repo(app)
    if repo is None:
        return None
    org, name, branch = repo
    src = ("# Runs anywhere: installs the scorebook package (and the book's requirements) only where it is missing,\n"
           "# for example on Colab. In the book's own environment this cell does nothing.\n"
           "try:\n"
           "    import scorebook  # noqa: F401\n"
           "except ImportError:\n"
           f"    %pip install -q \"scorebook @ git+https://github.com/{org}/{name}@{branch}\" "
           "jupytext myst-nb ipywidgets\n")
    return {"cell_type": "code", "execution_count": None, "id": "scorebook-install",
            "metadata": {"tags": ["scorebook-install"]}, "outputs": [], "source": src}


def _with_cached_outputs(app, nb: dict) -> dict:
    """The notebook with its outputs. myst-nb writes a page's notebook without outputs when it takes them from
    the execution cache (it renders the merged copy but saves the unmerged one), so a rebuild would offer
    output-less downloads; merge them back from the same cache."""
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    # myst-nb's default cache folder (used when _config.yml sets no execute.cache) sits beside the HTML
    cache_dir = getattr(app.config, "nb_execution_cache_path", "") or str(Path(app.outdir).parent / ".jupyter_cache")
    if not code or any(c.get("outputs") for c in code) or not Path(cache_dir).is_dir():
        return nb
    import nbformat
    from jupyter_cache import get_cache

    node = nbformat.reads(json.dumps(nb), as_version=4)
    try:
        _, merged = get_cache(cache_dir).merge_match_into_notebook(node)
    except KeyError:                      # not in the cache (execution off, or the cache was cleared)
        return nb
    return json.loads(nbformat.writes(merged))


def _finish(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    cell = _install_cell(app)
    sources = Path(app.outdir) / "_sources"
    executed = Path(app.outdir).parent / "jupyter_execute"
    for nb_path in sources.rglob("*.ipynb"):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        nb["cells"] = [c for c in nb.get("cells", []) if c.get("id") != "scorebook-install"]
        nb = _with_cached_outputs(app, nb)
        twin = executed / nb_path.relative_to(sources)       # myst-nb's own copy, same fix
        if twin.is_file():
            twin.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")
        if cell is not None and not any(c.get("id") == cell["id"] for c in nb.get("cells", [])):
            nb["cells"].insert(0, cell)
        nb.get("metadata", {}).pop("widgets", None)      # explorers run live; no stale widget state
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")


def _config(app, config) -> None:
    # an empty theme mode makes pydata-sphinx-theme log "Got invalid theme mode" on every page; the
    # book's figures are drawn for a light background
    ctx = dict(config.html_context or {})
    ctx.setdefault("default_mode", "light")
    config.html_context = ctx


def _execute_one(nb, cwd: str, timeout: int, allow_errors: bool):
    """Run in a worker process: execute one notebook exactly as myst-nb's cache mode does."""
    from jupyter_cache.executors.utils import single_nb_execution

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")                  # the kernel inherits this process's environment
    result = single_nb_execution(nb, cwd=cwd, allow_errors=allow_errors, timeout=timeout, meta_override=True)
    return nb, result.time, (None if result.err is None else f"{type(result.err).__name__}: {result.err}")


def _pre_execute(app, env, docnames) -> None:
    """Execute the notebooks Sphinx is about to read, in parallel, into myst-nb's execution cache."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from myst_nb.core.read import create_nb_reader
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    nb_config = env.mystnb_config
    jobs = int(os.environ.get("SCOREBOOK_BUILD_JOBS", "0") or 0) or (os.cpu_count() or 1)
    if nb_config.execution_mode != "cache" or jobs < 2:
        return
    cache = get_cache(nb_config.execution_cache_path or ".jupyter_cache")
    todo = []
    for docname in docnames:
        path = Path(env.doc2path(docname))
        text = path.read_text(encoding="utf-8")
        reader = create_nb_reader(str(path), env.myst_config, nb_config, text)
        if reader is None:                                       # plain Markdown, not a notebook
            continue
        nb = reader.read(text)
        if not any(c.cell_type == "code" for c in nb.cells):
            continue
        try:
            cache.match_cache_notebook(nb)                       # already executed with this code
            continue
        except KeyError:
            todo.append((path, nb))
    if len(todo) < 2:
        return                                                   # nothing to gain; myst-nb runs it
    todo.sort(key=lambda item: -item[0].stat().st_size)          # the long chapters first
    jobs = min(jobs, len(todo))
    log.info(f"scorebook: executing {len(todo)} notebooks in {jobs} parallel processes")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_execute_one, nb, str(path.parent), nb_config.execution_timeout,
                               nb_config.execution_allow_errors): path for path, nb in todo}
        for future in as_completed(futures):
            path = futures[future]
            try:
                nb, seconds, err = future.result()
            except Exception as exc:                             # a crashed worker: myst-nb retries alone
                nb, seconds, err = None, 0.0, f"{type(exc).__name__}: {exc}"
            if err is not None:
                log.info(f"scorebook: {path.name} failed in the parallel pass ({err}); myst-nb will run it")
                continue
            cache.cache_notebook_bundle(CacheBundleIn(nb, str(path), data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            log.info(f"scorebook: executed {path.name} in {seconds:.1f} s")
    log.info(f"scorebook: parallel execution took {time.perf_counter() - t0:.0f} s")


def setup(app):
    app.connect("env-before-read-docs", _pre_execute)
    app.connect("config-inited", _config)
    app.connect("builder-inited", lambda app: app.config.html_static_path.append(str(STATIC)))
    app.add_js_file("scorebook-math.js", defer="defer")
    app.add_css_file("scorebook.css")
    app.connect("html-page-context", _fix_page, priority=900)   # after sphinx-book-theme's buttons
    app.connect("build-finished", _finish)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
