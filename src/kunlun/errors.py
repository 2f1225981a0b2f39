"""One exception type for everything the user can fix (bad file, column, value, config key)."""


class KunlunError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""
