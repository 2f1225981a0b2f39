"""Turning a prepared split into padded tensor batches (vectorised gathers, no Python loops per row).

Histories keep the ``max_len`` most recent events and are left-padded, so the newest event is always
the last position. Padding slots have index 0 (PAD) and ``mask`` False.

With ``event_windows`` (models that split a history into one stream per event type, e.g. Kunlun's
event-level personalisation), each batch also holds, per sequence and event type, that type's own window:
the ``max_len`` most recent events *of that type*. Carving the streams out of the merged window instead
would leave each mostly padding (a type that is a third of the events fills a third of the merged window)
and would drop older events of the rarer types that the stream has room for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

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
    """label: [B] float; cat: [B, F] long; num: [B, Dn] float; group: [B] long; seqs: name -> SequenceBatch;
    windows: name -> event-type index -> SequenceBatch of that type's own most recent events (``event_windows``)."""

    label: torch.Tensor
    cat: torch.Tensor
    num: torch.Tensor
    group: torch.Tensor
    seqs: dict[str, SequenceBatch]
    windows: dict[str, dict[int, SequenceBatch]] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.label.shape[0]

    def pin(self) -> Batch:
        """This batch in pinned (page-locked) host memory, for asynchronous copies to a GPU."""
        def pin_seq(s: SequenceBatch) -> SequenceBatch:
            return SequenceBatch(*(t.pin_memory() for t in (s.item, s.event, s.side, s.gap, s.mask)))

        return Batch(*(t.pin_memory() for t in (self.label, self.cat, self.num, self.group)),
                     seqs={k: pin_seq(s) for k, s in self.seqs.items()},
                     windows={k: {c: pin_seq(w) for c, w in ws.items()} for k, ws in self.windows.items()})

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device`` (itself when already there); copies are asynchronous from pinned memory."""
        if self.label.device == torch.device(device) or (torch.device(device).type == "cpu" and self.label.device.type == "cpu"):
            return self

        def move(s: SequenceBatch) -> SequenceBatch:
            return SequenceBatch(*(t.to(device, non_blocking=True) for t in (s.item, s.event, s.side, s.gap, s.mask)))

        return Batch(*(t.to(device, non_blocking=True) for t in (self.label, self.cat, self.num, self.group)),
                     seqs={k: move(s) for k, s in self.seqs.items()},
                     windows={k: {c: move(w) for c, w in ws.items()} for k, ws in self.windows.items()})


class Batcher:
    """Builds batches of one split. ``max_len`` caps every sequence's length (and every event-type window's).

    ``event_windows``: False (none), True (a window for every event type in the data) or, as a model asks for
    them (``RankingModel.event_windows``), sequence name → the event-type indices to build: exactly those, a type
    without events being an all-padding window, so every batch has the same structure (what an exported model
    needs) whatever events its rows happen to hold."""

    def __init__(self, data: Prepared, split: str, max_len: int, event_windows: bool | Mapping[str, Sequence[int]] = False):
        self.split: Split = data.splits[split]
        self.events: dict[str, Events] = {k: _with_a_row(e) for k, e in data.events.items()}
        self.max_len = max_len
        self.event_windows = event_windows
        # per sequence and event type c ≥ 2 (after PAD, OOV): positions of its events in the event table, and
        # before[i] = how many of them precede table position i, so a row's events [start, end) of type c are
        # positions[before[start]:before[end]]
        self.type_index: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        if event_windows:
            for name, ev in self.events.items():
                if isinstance(event_windows, Mapping) and name not in event_windows:
                    continue
                self.type_index[name] = {}
                codes = (np.unique(ev.event[ev.event > 1]).tolist() if event_windows is True
                         else sorted(int(c) for c in event_windows[name]))
                for code in codes:
                    is_code = ev.event == code
                    before = np.concatenate([[0], np.cumsum(is_code)])
                    self.type_index[name][int(code)] = (np.flatnonzero(is_code), before)

    def __len__(self) -> int:
        return len(self.split)

    def _window(self, ev: Events, positions: np.ndarray | None, start: np.ndarray, end: np.ndarray,
                request_time: np.ndarray) -> SequenceBatch:
        """The ``max_len`` most recent events among [start, end) of each row (of ``positions`` only, when given:
        start/end then index ``positions``), left-padded, newest last."""
        idx = end[:, None] + np.arange(-self.max_len, 0)[None, :]  # [B, L], newest last
        mask = idx >= start[:, None]
        safe = np.where(mask, idx, 0)
        if positions is not None:
            safe = positions[safe] if len(positions) else np.zeros_like(safe)
        gap = np.where(mask, request_time[:, None] - ev.time[safe], 0).clip(min=0)
        return SequenceBatch(
            item=torch.from_numpy(np.where(mask, ev.item[safe], PAD)),
            event=torch.from_numpy(np.where(mask, ev.event[safe], PAD)),
            side=torch.from_numpy(np.where(mask[..., None], ev.side[safe], PAD)),
            gap=torch.from_numpy(gap.astype(np.float32)),
            mask=torch.from_numpy(mask),
        )

    def batch(self, rows: np.ndarray) -> Batch:
        s = self.split
        request_time = s.time[rows]
        seqs, windows = {}, {}
        for name, ev in self.events.items():
            start, end = s.seq_start[name][rows], s.seq_end[name][rows]
            seqs[name] = self._window(ev, None, start, end, request_time)
            if name in self.type_index:
                windows[name] = {code: self._window(ev, positions, before[start], before[end], request_time)
                                 for code, (positions, before) in self.type_index[name].items()}
        return Batch(
            label=torch.from_numpy(s.label[rows]),
            cat=torch.from_numpy(s.cat[rows]),
            num=torch.from_numpy(s.num[rows]),
            group=torch.from_numpy(s.group[rows]),
            seqs=seqs,
            windows=windows,
        )

    def iterate(self, batch_size: int, rng: np.random.Generator | None = None, start: int = 0, rank: int = 0,
                world: int = 1) -> Iterator[Batch]:
        """All rows once, shuffled by ``rng`` if given (deterministic for a seeded generator), from batch ``start``
        on (a run resumed inside an epoch skips the batches it trained on without building them).

        With ``world`` > 1 (data-parallel training), rank ``rank``'s share of every batch: its rows
        [rank·k, (rank + 1)·k) with k = batch_size / world, so the ``world`` ranks together see exactly the batches
        of one process, whatever the world size. A last, shorter batch leaves the later ranks fewer rows, or none
        (an empty batch is yielded: every rank yields one batch per batch of the split)."""
        if world < 1 or not 0 <= rank < world or batch_size % world:
            raise ValueError(f"rank {rank} of {world}: batch size {batch_size} must split into {world} equal shares")
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        share = batch_size // world
        for i in range(start * batch_size, len(order), batch_size):
            yield self.batch(order[i : i + batch_size][rank * share : (rank + 1) * share])


def _with_a_row(e: Events) -> Events:
    """An empty event table (no history anywhere) as one padding event: every mask is False, but the lookups
    ``ev.item[safe]`` need a row 0 to read."""
    if len(e.item):
        return e
    return Events(item=np.zeros(1, np.int64), event=np.zeros(1, np.int64), side=np.zeros((1, e.side.shape[1]), np.int64),
                  time=np.zeros(1, np.int64))


class Prefetcher:
    """Iterates ``batches`` (any iterator of Batch) with the next ``depth`` batches assembled on a background
    thread, so the training thread never waits on the input path; on a GPU the batches are pinned and copied
    asynchronously (``Batch.to``). Order, and so determinism, is that of ``batches`` (one producer, a FIFO).

    A thread, not DataLoader worker processes: assembly is numpy gathers over memory-mapped arrays that release
    the GIL, it runs ~100× faster than a training step (``kunlun bench speed`` reports both), and processes would
    copy the prepared arrays and pickle every batch for nothing. An exception in the producer is raised in the
    consumer; leaving the loop early (``close``, or garbage collection) stops the producer.
    """

    _END = object()

    def __init__(self, batches: Iterator[Batch], depth: int = 2, device: torch.device | str = "cpu"):
        import queue
        import threading

        self.device = torch.device(device)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(batches,), daemon=True, name="kunlun-prefetch")
        self.thread.start()

    def _produce(self, batches: Iterator[Batch]) -> None:
        import queue

        def put(item) -> bool:
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch in batches:
                if self.device.type == "cuda":
                    batch = batch.pin().to(self.device)
                if not put(batch):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
            return
        put(self._END)

    def __iter__(self) -> Iterator[Batch]:
        try:
            while True:
                item = self.queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
