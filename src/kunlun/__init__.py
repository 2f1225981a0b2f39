"""kunlun: Kunlun-style recommendation ranking models, trained and measured end to end.

Data flow: ``data`` (adapters, cache, batches) → ``blocks`` → ``models`` → ``training`` →
``metrics`` → ``runs`` / ``bench``; ``cli`` sits on top.
"""

from kunlun.errors import KunlunError

try:  # written by setuptools-scm at build time: 0.1.1.devN+g<commit>[.d<date> when built from a dirty tree]
    from kunlun._version import __version__
except ImportError:  # running from a source tree that was never built
    __version__ = "0.1.0+unknown"
__all__ = ["KunlunError", "__version__"]
