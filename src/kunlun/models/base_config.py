"""Validation helpers shared by the model config dataclasses."""

from __future__ import annotations

from kunlun.blocks.summary import GATES
from kunlun.errors import KunlunError


def check_positive(cfg, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        values = value if isinstance(value, list) else [value]
        if any(v < 1 for v in values):
            raise KunlunError(f"config key model.{key}: expected positive integer(s), got {value}")


def check_heads(cfg, dim_key: str = "d_model", heads_key: str = "num_heads") -> None:
    d, h = getattr(cfg, dim_key), getattr(cfg, heads_key)
    if d % h:
        raise KunlunError(f"config key model.{heads_key}: {h} heads do not divide model.{dim_key}={d}")


def check_dropout(cfg) -> None:
    if not 0 <= cfg.dropout < 1:
        raise KunlunError(f"config key model.dropout: expected 0 <= dropout < 1, got {cfg.dropout}")


def check_summary_gate(cfg) -> None:
    """``summary_gate``, shared by Kunlun and InterFormer: one of the gates of ``kunlun.blocks.summary``."""
    if cfg.summary_gate not in GATES:
        raise KunlunError(f"config key model.summary_gate: expected one of {', '.join(GATES)}, got {cfg.summary_gate!r}")
