"""Where output goes: progress and logs to stderr, tables to stdout.

The lowest layer: the trainer, the benchmarks and the CLI all log and print through these, so none of
them has to import another for its console.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

stderr = Console(stderr=True)


def log(msg: str) -> None:
    """One line of progress on stderr, printed as is (no markup, no highlighting). Not wrapped when stderr is not a
    terminal: a log file or pipe gets the whole line, not a line cut at 80 columns."""
    stderr.print(msg, highlight=False, markup=False, soft_wrap=not stderr.is_terminal)


@contextlib.contextmanager
def stage(start: str, still: str, every: float, logger: Callable[[str], None] = log) -> Iterator[None]:
    """Log ``start`` now, then ``still, <N>s elapsed`` every ``every`` seconds until the block ends: a step that takes
    minutes (an AOTInductor compile) says it is still going instead of printing nothing."""
    logger(start)
    t0, done = time.monotonic(), threading.Event()

    def tick() -> None:
        while not done.wait(every):
            logger(f"{still}, {time.monotonic() - t0:.0f}s elapsed")

    ticker = threading.Thread(target=tick, daemon=True, name="stage-progress")
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


@contextlib.contextmanager
def rows_bar(label: str, total: int, disable: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for work counted in rows (done of ``total``, rows/s, elapsed, ETA). Yields
    ``progress(rows, total)``, to call with each batch of rows done; it redraws at most 5 times a second."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), TaskProgressColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=stderr, disable=disable) as bar:
        task = bar.add_task(label, total=total, rate="")
        started, shown = time.perf_counter(), [0.0, 0]

        def progress(rows: int, total: int) -> None:
            shown[1] += rows
            now = time.perf_counter()
            if now - shown[0] > 0.2 or shown[1] >= total:  # rich redraws ~10 times a second; don't flood it
                bar.update(task, completed=shown[1], rate=f"{shown[1] / max(now - started, 1e-9):,.0f} rows/s")
                shown[0] = now

        yield progress


def emit_json(obj: Any) -> None:
    """``obj`` on stdout as one line of strict JSON (``--json``)."""
    print(json_text(obj), flush=True)


def json_text(obj: Any) -> str:
    """``obj`` as one line of strict JSON (what ``--json`` prints): NaN and infinities become null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj))


def out_console() -> Console:
    """Console for tables on stdout; when piped, wide enough that nothing is truncated."""
    con = Console()
    return con if con.is_terminal else Console(width=200)
