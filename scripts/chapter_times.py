"""Execution time of each chapter: wall-clock and the kernel's CPU time (user + system).

Each chapter is executed once through nbclient, in its own kernel, as the book build does.
CPU time is the steadier number on a shared machine; wall time is what CI waits for.

    python scripts/chapter_times.py                       # every chapter in book/
    python scripts/chapter_times.py book/07_langevin.md --json times.json
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def is_chapter(path: Path) -> bool:
    head = path.read_text(encoding="utf-8")[:600]
    return path.suffix == ".md" and head.startswith("---") and "kernelspec" in head


def time_chapter(path: Path, timeout: int = 600) -> dict:
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)     # the kernel has exited and been reaped
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"chapter": path.name, "wall_s": round(wall, 1), "kernel_cpu_s": round(cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chapters", nargs="*", type=Path)
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    chapters = args.chapters or sorted(f for f in (ROOT / "book").glob("*.md") if is_chapter(f))
    rows = []
    for ch in chapters:
        rows.append(time_chapter(ch.resolve()))
        r = rows[-1]
        print(f"{r['chapter']:40s} wall {r['wall_s']:6.1f} s   kernel CPU {r['kernel_cpu_s']:6.1f} s", flush=True)
    total = sum(r["wall_s"] for r in rows)
    print(f"{'total':40s} wall {total:6.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
