"""Validation helpers shared by the model config dataclasses."""

from __future__ import annotations

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
