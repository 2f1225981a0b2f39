"""The scoring server's settings, kept apart from the server so the CLI can read their defaults without importing
torch or aiohttp."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kunlun.errors import KunlunError


@dataclass(frozen=True)
class ServeOptions:
    """Batching, back-pressure and size limits of the server: each a ``kunlun serve`` option, whose help text is the
    field's ``help``."""

    threads: int = field(default=0, metadata={"help": "torch threads for scoring (0: torch's default)."})
    workers: int = field(default=1, metadata={  # a worker in the server process shares its GIL with request parsing
        "help": "Scoring processes (0: score in the server process, which then parses requests only between model calls)."})
    max_batch: int = field(default=256, metadata={"help": "Examples per model call."})  # a larger request is scored alone
    max_wait_ms: float = field(default=2.0, metadata={
        "help": "Latency budget: how long the oldest queued request waits for others to join its batch."})
    max_queue: int = field(default=16384, metadata={"help": "Examples queued at most; beyond it a request gets 503 with Retry-After."})
    max_body_mb: float = field(default=64.0, metadata={"help": "Largest request body (413 beyond it)."})
    timeout_s: float = field(default=30.0, metadata={"help": "A request not scored by then gets 503."})

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
