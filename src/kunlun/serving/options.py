"""The scoring server's settings, kept apart from the server so the CLI can read their defaults without importing
torch or aiohttp."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kunlun.errors import KunlunError


@dataclass(frozen=True)
class ServeOptions:
    """Batching, back-pressure and size limits of the server (each a ``kunlun serve`` option)."""

    max_batch: int = 256  # examples per model call (a larger request is scored alone)
    max_wait_ms: float = 2.0  # latency budget: how long the oldest queued request waits for others to join its batch
    max_queue: int = 16384  # examples queued at most; a request beyond it gets 503 + Retry-After
    max_body_mb: float = 64.0  # request body limit (413 beyond it)
    timeout_s: float = 30.0  # a request not scored by then gets 503
    threads: int = 0  # torch threads for scoring (0: torch's default)
    workers: int = 1  # scoring processes (0: score in the server process, sharing its GIL with request parsing)

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_queue"):
            if getattr(self, key) < 1:
                raise KunlunError(f"--{key.replace('_', '-')}: expected a positive integer, got {getattr(self, key)}")
        for key in ("threads", "workers"):
            if getattr(self, key) < 0:
                raise KunlunError(f"--{key}: expected >= 0, got {getattr(self, key)}")
        for key in ("max_wait_ms", "max_body_mb", "timeout_s"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0) or (key != "max_wait_ms" and v == 0):
                raise KunlunError(f"--{key.replace('_', '-')}: expected a positive number, got {v}")
