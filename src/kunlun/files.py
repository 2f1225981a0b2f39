"""Writing files so that a crash never leaves a half-written one where a good one was.

The lowest layer with ``errors`` and ``config``: data caches, checkpoints, run records, sweep
manifests, scaling reports and benchmark tables all write through these helpers. A write that fails
(a full disk, say) removes its temporary file and leaves the previous version in place.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kunlun.errors import KunlunError, os_reason


def os_error_text(exc: OSError) -> str:
    """``os_reason`` with the errno's name, for a failed write: ``No space left on device (ENOSPC)``; a short write
    (an OSError without errno) says so."""
    if not exc.errno:
        return f"{os_reason(exc)} (a short write: is the disk full?)"
    return f"{os_reason(exc)} ({errno.errorcode.get(exc.errno, exc.errno)})"


def fsync_dir(path: Path) -> None:
    """Make the renames inside directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` on a temporary sibling of ``target``, then swap it into ``target``.

    The swap is two renames (``target`` → ``.<name>.old``, then the new one → ``target``); a process killed
    between them leaves the previous version as ``.<name>.old``, which ``recover_dir`` puts back."""
    tmp = temporary_dir(target)
    try:
        write(tmp)
        swap_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temporary_dir(target: Path) -> Path:
    """A new temporary sibling of ``target`` (the name ``recover_dir`` cleans up), for ``swap_dir``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))


def swap_dir(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` (from ``temporary_dir``) in place of ``target``: ``atomic_dir``'s two renames,
    for a directory that several processes wrote (a distributed checkpoint)."""
    old = _old(target)
    if target.exists():
        if old.exists():  # left by an earlier swap that completed but was killed before removing it
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo what a process killed inside ``atomic_dir(target, …)`` left: put the previous version back when the
    swap stopped between its renames, and remove temporary directories. Only for a caller that knows no other
    process writes ``target`` (it holds the run directory's lock)."""
    old = _old(target)
    if not target.exists() and old.is_dir():
        os.replace(old, target)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if target.parent.is_dir():
        for tmp in target.parent.glob(f".{target.name}.tmp*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path`` (the sibling is removed on failure)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` to write a temporary sibling of ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(path: Path, option: str = "--out") -> Path:
    """Check, before the work that produces it, that ``path`` can be written as a file: not a directory, not
    under a file, in a folder (or a folder to be created) that can be written. A KunlunError naming ``option``."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise KunlunError(f"{option} {path}: expected a file path")
    try:
        if path.is_dir():
            raise KunlunError(f"{option} {path}: is a directory; give a file path")
        folder = path.parent
        while not folder.exists() and folder != folder.parent:  # the nearest folder that exists (it is created below it)
            folder = folder.parent
        if not folder.is_dir():
            raise KunlunError(f"{option} {path}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise KunlunError(f"{option} {path}: cannot write in {folder} (permission denied)")
    except OSError as exc:
        raise KunlunError(f"{option} {path}: cannot be written ({os_reason(exc)})") from None
    return path
