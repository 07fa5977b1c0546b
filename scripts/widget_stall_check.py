"""Execute chapters through nbclient (the client the book build uses) many times and report stalls.

A *stall* is a run slower than ``--factor`` (default 3) times the median run. The known stall
(an ipywidgets ``Output`` widget in an executed cell; see ``scorebook.plotting.explorer``) shows up
as one cell that takes exactly the cell timeout and then succeeds, so per-cell times are reported too.

    python scripts/widget_stall_check.py book/01_data_as_samples.md --runs 50 --timeout 60
    python scripts/widget_stall_check.py book/01_data_as_samples.md --runs 50 --load 1   # one busy process beside it
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path


def _busy(stop_at: float) -> None:
    while time.time() < stop_at:
        sum(i * i for i in range(10_000))


def run_once(path: Path, timeout: int) -> tuple[float, list[tuple[int, float]], str]:
    import jupytext
    from nbclient import NotebookClient

    cell_times: list[tuple[int, float]] = []

    class Timed(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
            t0 = time.perf_counter()
            out = await super().async_execute_cell(cell, cell_index, *args, **kwargs)
            cell_times.append((cell_index, time.perf_counter() - t0))
            return out

    nb = jupytext.read(path)
    client = Timed(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except Exception as e:  # a failed run is reported, not hidden
        status = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return time.perf_counter() - t0, cell_times, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("chapters", nargs="+", type=Path)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--timeout", type=int, default=60, help="nbclient cell timeout in seconds")
    p.add_argument("--factor", type=float, default=3.0, help="a run slower than factor x median is a stall")
    p.add_argument("--load", type=int, default=0, help="busy processes to run beside the chapters")
    p.add_argument("--json", type=Path, help="write the per-run times here")
    args = p.parse_args(argv)
    worst_ok = True
    report = {}
    for path in args.chapters:
        busy = [mp.Process(target=_busy, args=(time.time() + 10 ** 6,), daemon=True) for _ in range(args.load)]
        for b in busy:
            b.start()
        totals, statuses, slow_cells = [], [], []
        try:
            for i in range(args.runs):
                total, cells, status = run_once(path, args.timeout)
                totals.append(total)
                statuses.append(status)
                worst = max(cells, key=lambda c: c[1]) if cells else (-1, 0.0)
                slow_cells.append(worst)
                print(f"{path.name} run {i + 1:3d}: {total:6.1f} s  slowest cell #{worst[0]} {worst[1]:5.1f} s  {status}",
                      flush=True)
        finally:
            for b in busy:
                b.terminate()
        med = statistics.median(totals)
        stalls = [t for t in totals if t > args.factor * med]
        failed = [s for s in statuses if s != "ok"]
        print(f"{path.name}: {args.runs} runs, median {med:.1f} s, max {max(totals):.1f} s "
              f"({max(totals) / med:.2f} x median), {len(stalls)} over {args.factor:g} x median, {len(failed)} failed")
        report[path.name] = {"runs": totals, "median": med, "max": max(totals), "stalls": len(stalls),
                             "failed": failed, "slowest_cells": slow_cells, "load": args.load}
        worst_ok &= not stalls and not failed
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if worst_ok else 1


if __name__ == "__main__":
    sys.exit(main())
