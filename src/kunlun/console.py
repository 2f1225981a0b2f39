"""Where output goes: progress and logs to stderr, tables to stdout.

The lowest layer: the trainer, the benchmarks and the CLI all log and print through these, so none of
them has to import another for its console.
"""

from __future__ import annotations

from rich.console import Console

stderr = Console(stderr=True)


def log(msg: str) -> None:
    """One line of progress on stderr, printed as is (no markup, no highlighting). Not wrapped when stderr is not a
    terminal: a log file or pipe gets the whole line, not a line cut at 80 columns."""
    stderr.print(msg, highlight=False, markup=False, soft_wrap=not stderr.is_terminal)


def out_console() -> Console:
    """Console for tables on stdout; when piped, wide enough that nothing is truncated."""
    con = Console()
    return con if con.is_terminal else Console(width=200)
