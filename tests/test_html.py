"""The built HTML book, checked page by page in a real browser (headless Chromium through Playwright).

For every page in the table of contents it asserts that
* MathJax typeset the formulas: no raw ``$$``, ``\\frac`` or ``\\begin`` is visible;
* every image (figures and animation frames) loaded, and every figure is shown at no less than
  ``MIN_SCALE`` of its natural size, so its text stays legible at a 1400 px wide window;
* no Python traceback, error or stderr output is on the page, and no JavaScript error was raised;
* no request leaves the machine (no CDN: the book works offline);
* no display equation overflows its column;
* the page, with its images and animations, weighs at most 8 MB;
and that the navigation reaches every page from the front page.

It needs a built book (``jupyter-book build .``) and Chromium. Without a build the module is skipped,
unless ``SCOREBOOK_REQUIRE_HTML=1`` (set by CI, which builds first) makes that a failure. Screenshots
of every page are kept in ``_build/screenshots/`` for anyone to look at.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
REQUIRED = os.environ.get("SCOREBOOK_REQUIRE_HTML") == "1"
WIDTH, HEIGHT = 1400, 900
MIN_SCALE = 0.75          # shown at >= 75 % of natural size: 9 pt text at 100 dpi stays >= 9.4 px on screen
MAX_PAGE_BYTES = 8 * 2 ** 20
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [c["file"] for c in part["chapters"]]
    return pages


PAGES = _toc_pages()


def _skip_or_fail(reason: str):
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not (HTML / "index.html").exists():
        _skip_or_fail("no built book in _build/html (run the README's build command first)")
    exe = next((c for c in CHROMIUM_CANDIDATES if Path(c).exists()), None) or shutil.which("chromium")
    if exe is None:
        _skip_or_fail("Chromium is not installed (CI installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("playwright is not installed (it is in requirements.txt)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _local_path(url: str) -> Path | None:
    u = urlparse(url)
    return Path(unquote(u.path)) if u.scheme == "file" else None


# measured in the page, after MathJax has typeset and our equation fitting has run
_PROBE = r"""
() => {
  const art = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const artBox = art.getBoundingClientRect();
  // visible prose: the article without code, outputs and MathJax's own rendering
  const clone = art.cloneNode(true);
  clone.querySelectorAll('pre, code, .highlight, .cell_input, mjx-container, script, style, .MathJax')
       .forEach(e => e.remove());
  const text = clone.innerText;
  const imgs = [...art.querySelectorAll('img')].map(img => {
    const r = img.getBoundingClientRect();
    return {src: img.currentSrc || img.src, complete: img.complete, natural: img.naturalWidth,
            shown: r.width, visible: r.width > 0 && r.height > 0,
            inFigure: !!img.closest('figure, .cell_output, .animation')};
  });
  const eqs = [...art.querySelectorAll('mjx-container[display="true"]')].map(eq => {
    const r = eq.getBoundingClientRect(), box = eq.parentElement.getBoundingClientRect();
    return {overflow: eq.scrollWidth > eq.clientWidth + 1 || r.right > Math.max(box.right, artBox.right) + 1,
            scroll: eq.classList.contains('sb-scroll'), tex: (eq.getAttribute('aria-label') || '').slice(0, 80)};
  });
  const errors = [...art.querySelectorAll('.output.traceback, .output.error, .output.stderr, .cell_output .stderr')]
      .map(e => e.innerText.slice(0, 200));
  const nav = [...document.querySelectorAll('.bd-sidebar-primary a[href], .prev-next-area a[href], .bd-article a[href]')]
      .map(a => a.href);
  return {text, imgs, eqs, errors, nav, hasMath: !!document.querySelector('.math, mjx-container, script[src*="mathjax"]')};
}
"""


@pytest.fixture(scope="module")
def report(browser):
    """Visit every page once; return ``{page: measurements}``."""
    out = {}
    for page_name in PAGES:
        url = (HTML / f"{page_name}.html").as_uri()
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        js_errors, external, failed = [], [], []
        page.on("pageerror", lambda e, acc=js_errors: acc.append(str(e)))
        page.on("console", lambda m, acc=js_errors: acc.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r, acc=failed: acc.append(r.url))

        def _route(route):                     # one parameter: Playwright passes (route, request) to two
            if urlparse(route.request.url).scheme in ("file", "data", "blob", "about"):
                return route.continue_()
            external.append(route.request.url)     # the offline book asks the network for nothing
            return route.abort()

        page.route("**/*", _route)
        page.goto(url, wait_until="load")
        if page.evaluate("() => !!window.MathJax"):
            page.wait_for_function("() => document.documentElement.dataset.sbMathFitted === '1'", timeout=60_000)
        data = page.evaluate(_PROBE)
        stem = page_name.replace("/", "_")
        page.screenshot(path=str(SHOTS / f"{stem}.png"))
        try:
            page.screenshot(path=str(SHOTS / f"{stem}_full.jpg"), full_page=True, type="jpeg", quality=55)
        except Exception:                               # very long pages can exceed the browser's limit
            pass
        # weight: the HTML plus every local image it shows (inline data: URIs are inside the HTML already)
        size = (HTML / f"{page_name}.html").stat().st_size
        for src in {i["src"] for i in data["imgs"]}:
            p = _local_path(src)
            if p is not None and p.exists():
                size += p.stat().st_size
        data.update(js_errors=js_errors, external=external, failed=failed, bytes=size)
        out[page_name] = data
        page.close()
    return out


@pytest.mark.parametrize("page_name", PAGES)
def test_math_is_typeset(report, page_name):
    text = report[page_name]["text"]
    raw = [tok for tok in ("$$", "\\frac", "\\begin", "\\mathbf") if tok in text]
    assert raw == [], f"raw TeX visible on {page_name}: {raw}"


@pytest.mark.parametrize("page_name", PAGES)
def test_no_raw_markdown_tables(report, page_name):
    """A Markdown table that was not rendered shows as lines of pipes, for example '| a | b |' and '| --- |'."""
    text = report[page_name]["text"]
    rules = [m.start() for m in re.finditer(r"\|\s*(?:—|–|:?-{3,}:?)\s*\|", text)]   # a header rule, typeset or not
    where = text[max(0, rules[0] - 120):rules[0] + 40] if rules else ""
    assert rules == [], f"unrendered Markdown table on {page_name}: {where!r}"


@pytest.mark.parametrize("page_name", PAGES)
def test_images_load_and_figures_are_legible(report, page_name):
    imgs = report[page_name]["imgs"]
    broken = [i["src"][:120] for i in imgs if not (i["complete"] and i["natural"] > 0)]
    assert broken == [], f"images that did not load on {page_name}: {broken}"
    small = [(i["src"][-60:], round(i["shown"] / i["natural"], 2)) for i in imgs
             if i["inFigure"] and i["visible"] and i["natural"] > 0 and i["shown"] / i["natural"] < MIN_SCALE]
    assert small == [], f"figures shown below {MIN_SCALE:.0%} of natural size on {page_name}: {small}"


@pytest.mark.parametrize("page_name", PAGES)
def test_no_errors_on_the_page(report, page_name):
    r = report[page_name]
    assert "Traceback (most recent call last)" not in r["text"], page_name
    assert r["errors"] == [], f"error or stderr output on {page_name}: {r['errors']}"
    assert r["js_errors"] == [], f"JavaScript errors on {page_name}: {r['js_errors']}"
    assert r["failed"] == [] or set(r["failed"]) <= set(r["external"]), f"failed loads on {page_name}: {r['failed']}"


@pytest.mark.parametrize("page_name", PAGES)
def test_no_network_requests(report, page_name):
    assert report[page_name]["external"] == [], f"{page_name} asked the network for {report[page_name]['external']}"


@pytest.mark.parametrize("page_name", PAGES)
def test_no_equation_overflows(report, page_name):
    bad = [e["tex"] for e in report[page_name]["eqs"] if e["overflow"] or e["scroll"]]
    assert bad == [], f"display equations wider than the column on {page_name} (break them over lines): {bad}"


@pytest.mark.parametrize("page_name", PAGES)
def test_page_weight(report, page_name):
    assert report[page_name]["bytes"] <= MAX_PAGE_BYTES, f"{page_name}: {report[page_name]['bytes'] / 2**20:.1f} MB"


def test_navigation_reaches_every_page(report):
    """Following links from the front page (sidebar, previous/next, text) reaches every page of the TOC."""
    target = {(HTML / f"{p}.html").resolve() for p in PAGES}
    seen, todo = set(), [(HTML / "index.html").resolve()]
    links = {(HTML / f"{p}.html").resolve(): report[p]["nav"] for p in PAGES}
    while todo:
        here = todo.pop()
        if here in seen:
            continue
        seen.add(here)
        for href in links.get(here, []):
            p = _local_path(href.split("#")[0])
            if p is not None and p.resolve() in target and p.resolve() not in seen:
                todo.append(p.resolve())
        if here.name == "index.html" and here not in links:   # the front page redirects to the root page
            todo.append((HTML / f"{PAGES[0]}.html").resolve())
    missing = sorted(str(p.relative_to(HTML)) for p in target - seen)
    assert missing == [], f"pages the navigation never reaches: {missing}"
