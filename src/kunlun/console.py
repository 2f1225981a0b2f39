"""Where output goes: progress and logs to stderr, tables to stdout.

The lowest layer: the trainer, the benchmarks and the CLI all log and print through these, so none of
them has to import another for its console.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

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


def out_console() -> Console:
    """Console for tables on stdout; when piped, wide enough that nothing is truncated."""
    con = Console()
    return con if con.is_terminal else Console(width=200)
