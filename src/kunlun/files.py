"""Writing files so that a crash never leaves a half-written one where a good one was.

The lowest layer with ``errors`` and ``config``: data caches, checkpoints, run records, sweep
manifests, scaling reports and benchmark tables all write through these two helpers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from kunlun.errors import KunlunError


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` on a temporary sibling of ``target``, then swap it into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path`` (the sibling is removed on failure)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def os_reason(exc: OSError) -> str:
    """Why an OSError happened, in a few words ("Permission denied"), also for pyarrow's OSErrors."""
    if exc.errno:
        return os.strerror(exc.errno)
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
