"""kunlun: Kunlun-style recommendation ranking models, trained and measured end to end.

Data flow: ``data`` (adapters, cache, batches) → ``blocks`` → ``models`` → ``training`` →
``metrics`` → ``runs`` / ``bench``; ``cli`` sits on top.
"""

from kunlun.errors import KunlunError

__version__ = "0.1.0"
__all__ = ["KunlunError", "__version__"]
