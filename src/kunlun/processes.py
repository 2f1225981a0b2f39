"""Processes that share run directories: one OS lock per run directory, and child processes that die with
their parent.

The lock is ``fcntl.flock`` on ``<dir>/.lock``: the kernel releases it when the holder exits however it exits
(kill -9 included), so a lock is never stale; the holder's process id is written into the file for the
message the next process prints. The file itself stays (removing it would let two processes lock two
different files of the same name).

Example::

    with lock_run_dir(Path("runs/try")):   # KunlunError "run directory runs/try is in use by process 1234"
        ...                                # train into runs/try
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from kunlun.errors import KunlunError

LOCK_NAME = ".lock"
PARENT_ENV = "KUNLUN_PARENT_PID"  # set by a parent (a sweep) for a child that must die with it
PR_SET_PDEATHSIG = 1


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "(unknown)"


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the directory) for the ``with`` block; KunlunError if another process
    holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise KunlunError(f"{run_dir}: cannot create the run directory's lock file ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KunlunError(f"run directory {run_dir} is in use by process {_holder(fd)}") from None
        with contextlib.suppress(OSError):  # the pid is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_holder(run_dir: Path) -> str | None:
    """The process id holding ``run_dir``'s lock (a string, "(unknown)" when unreadable), or None when no process
    holds it. Creates nothing."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR)
    except OSError:
        return None  # no lock file: nobody ever locked it, or the directory is gone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Remove everything in ``run_dir`` but its lock file (for a caller holding the lock: removing the file would
    let another process lock a new one beside it)."""
    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def is_empty_run_dir(run_dir: Path) -> bool:
    """True when ``run_dir`` does not exist or holds nothing but its lock file."""
    return not run_dir.exists() or all(p.name == LOCK_NAME for p in run_dir.iterdir())


# ------------------------------------------------------------------------------------- parent and child


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that must die with this one (see ``die_with_parent``)."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """If started by ``child_env``'s parent, end this process (SIGTERM) when that parent dies, however it dies.

    Linux: the kernel sends the signal (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the parent
    once a second. A parent that died before this ran is caught by comparing the parent's process id."""
    text = os.environ.pop(PARENT_ENV, None)  # not inherited by this process's own children
    if not text or not text.isdigit():
        return
    parent = int(text)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    if os.getppid() != parent:  # the parent was gone before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` so that ``finally`` blocks run: temporary files are removed, locks
    released, and a half-written checkpoint never replaces a good one."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
