"""One exception type for everything the user can fix (bad file, column, value, config key), and the one-line
message for an exception the user caused (``user_error``), which the CLI prints before exiting with status 2."""

from __future__ import annotations

import os


class KunlunError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def os_reason(exc: OSError) -> str:
    """Why an OSError happened, in a few words ("Permission denied"), also for pyarrow's OSErrors."""
    if exc.errno:
        return os.strerror(exc.errno)
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an exception the user caused and can fix, or None for a bug (traceback).

    Readers raise KunlunError with the file, column and row; the rest is a backstop for what no reader
    anticipated: a file that cannot be read or written (OSError names it), text that is not UTF-8, YAML
    that does not parse."""
    import yaml

    if isinstance(exc, KunlunError):
        return str(exc)
    if isinstance(exc, OSError):
        names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{names}: {os_reason(exc)}" if names else os_reason(exc)
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not valid {exc.encoding} text (byte {exc.start}: {exc.reason})"
    if isinstance(exc, yaml.YAMLError):
        return f"not valid YAML ({(str(exc).strip().splitlines() or ['?'])[0]})"
    return None
