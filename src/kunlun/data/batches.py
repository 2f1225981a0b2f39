"""Turning a prepared split into padded tensor batches (vectorised gathers, no Python loops per row).

Histories keep the ``max_len`` most recent events and are left-padded, so the newest event is always
the last position. Padding slots have index 0 (PAD) and ``mask`` False.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kunlun.data.prepare import PAD, Events, Prepared, Split


@dataclass
class SequenceBatch:
    """One behaviour sequence for B examples, L = max_len slots.

    item, event: [B, L] long; side: [B, L, S] long; gap: [B, L] float (seconds before the request, >= 0);
    mask: [B, L] bool (True = a real event).
    """

    item: torch.Tensor
    event: torch.Tensor
    side: torch.Tensor
    gap: torch.Tensor
    mask: torch.Tensor


@dataclass
class Batch:
    """label: [B] float; cat: [B, F] long; num: [B, Dn] float; group: [B] long; seqs: name -> SequenceBatch."""

    label: torch.Tensor
    cat: torch.Tensor
    num: torch.Tensor
    group: torch.Tensor
    seqs: dict[str, SequenceBatch]

    def __len__(self) -> int:
        return self.label.shape[0]


class Batcher:
    """Builds batches of one split. ``max_len`` caps every sequence's length."""

    def __init__(self, data: Prepared, split: str, max_len: int):
        self.split: Split = data.splits[split]
        self.events: dict[str, Events] = data.events
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, rows: np.ndarray) -> Batch:
        s = self.split
        seqs = {}
        offsets = np.arange(-self.max_len, 0)
        for name, ev in self.events.items():
            start, end = s.seq_start[name][rows], s.seq_end[name][rows]
            idx = end[:, None] + offsets[None, :]  # [B, L], newest last
            mask = idx >= start[:, None]
            safe = np.where(mask, idx, 0)
            gap = np.where(mask, s.time[rows][:, None] - ev.time[safe], 0).clip(min=0)
            seqs[name] = SequenceBatch(
                item=torch.from_numpy(np.where(mask, ev.item[safe], PAD)),
                event=torch.from_numpy(np.where(mask, ev.event[safe], PAD)),
                side=torch.from_numpy(np.where(mask[..., None], ev.side[safe], PAD)),
                gap=torch.from_numpy(gap.astype(np.float32)),
                mask=torch.from_numpy(mask),
            )
        return Batch(
            label=torch.from_numpy(s.label[rows]),
            cat=torch.from_numpy(s.cat[rows]),
            num=torch.from_numpy(s.num[rows]),
            group=torch.from_numpy(s.group[rows]),
            seqs=seqs,
        )

    def iterate(self, batch_size: int, rng: np.random.Generator | None = None, start: int = 0) -> Iterator[Batch]:
        """All rows once, shuffled by ``rng`` if given (deterministic for a seeded generator), from batch ``start``
        on (a run resumed inside an epoch skips the batches it trained on without building them)."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for i in range(start * batch_size, len(order), batch_size):
            yield self.batch(order[i : i + batch_size])
