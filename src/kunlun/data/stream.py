"""Preparing a dataset chunk by chunk, in memory bounded by the chunk rather than by the dataset.

A ``ChunkSource`` yields ``Chunk``s: the rows of each split that the chunk holds, in order, and the rows it appends to
each sequence's event table. Sources: ``synthetic.SyntheticChunks`` (Parquet shards), ``tabular.SchemaChunks`` (a schema
file's CSV blocks or Parquet row groups), ``tabular.FrappeChunks``, ``public.CriteoChunks``, ``public.BarsChunks``
(files read through ``io.TableChunks``: each block with the whole file's column types), ``movielens.Impressions`` and
``public.TimelineExamples`` (per-user timelines: the sorted events held as compact columns, the examples made a range of
rows at a time). A row's history range
``[start, end)`` indexes the *whole* event table (every chunk's events, concatenated). ``prepare_chunked`` reads
the source three times:

1. rows: per vocabulary the sorted unique values of the training split's columns, numeric statistics
   (``NumericStats``: exact, chunking does not change them), positives, rows per split, the sorted unique group
   values of every split, and the training rows' history ranges merged into disjoint intervals;
2. events: the unique values of the events those intervals cover (the events training histories use; the
   vocabularies of ``Encoder.fit`` hold exactly these);
3. encoding: each chunk is encoded (``Encoder.encode_split``/``encode_events``) and appended to the cache's ``.npy``
   files (``CacheWriter``) inside the atomic temporary directory.

The cache is byte-identical to the one ``Encoder.fit`` + ``Encoder.prepare`` + ``save_prepared`` write for the same
rows (tests/test_out_of_core.py, tests/test_chunked_adapters.py). Memory held besides one chunk: the vocabularies and
per-split group values (O(distinct ids)), the merged history intervals (O(users) for per-user timelines), and what a
source keeps (Criteo's split: a byte per row; per-user timelines' sorted events: ≈ 17–25 bytes per event). Id columns
must come as integers or text (the adapters' ``id_column`` gives nothing else): a float column's normalisation
(integral → int64, else text) would otherwise depend on which values a chunk holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kunlun.data.prepare import CacheWriter, Encoder, NumericStats, Vocab, _normalise
from kunlun.data.schema import RawSplit, Schema
from kunlun.files import atomic_dir


@dataclass
class Chunk:
    """Rows of some splits (history ranges index the whole event table) and rows appended to each event table
    (sequence → column → values: item, event, time and side columns, like ``RawData.events``)."""

    splits: dict[str, RawSplit]
    events: dict[str, dict[str, np.ndarray]]


class ChunkSource(Protocol):
    """A dataset that can be read, again and again, as the same sequence of chunks."""

    schema: Schema
    source: str  # where it comes from, for messages

    def chunks(self) -> Iterator[Chunk]: ...


class SortedUnique:
    """The sorted unique values of everything ``add``ed: merged lazily (when the pending values outgrow the merged
    ones), so adding n values in chunks costs O(n log n) in all, like one ``np.unique``."""

    def __init__(self):
        self.merged: np.ndarray | None = None
        self.pending: list[np.ndarray] = []
        self.pending_len = 0

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        if values.dtype.kind not in "iuU":
            raise TypeError(f"chunked prepare needs integer or text ids, got {values.dtype}")
        self.pending.append(np.unique(values))
        self.pending_len += len(self.pending[-1])
        if self.pending_len > max(len(self.merged) if self.merged is not None else 0, 1 << 16):
            self.result()

    def result(self) -> np.ndarray:
        parts = ([self.merged] if self.merged is not None else []) + self.pending
        if parts:
            self.merged = np.unique(np.concatenate(parts)) if len(parts) > 1 else parts[0]
        self.pending, self.pending_len = [], 0
        return self.merged if self.merged is not None else np.array([], dtype=np.int64)


def merge_intervals(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open intervals [start, end) → the disjoint, sorted intervals covering the same positions (empty ones
    dropped; touching ones merged)."""
    keep = start < end
    start, end = start[keep], end[keep]
    if not len(start):
        return start, end
    order = np.argsort(start, kind="stable")
    start, end = start[order], np.maximum.accumulate(end[order])
    first = np.r_[True, start[1:] > end[:-1]]  # a new interval begins where no earlier one reaches it
    last = np.r_[first[1:], True]
    return start[first], end[last]


def covered(positions: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``positions`` lie in one of the disjoint, sorted intervals [start, end)."""
    i = np.searchsorted(start, positions, side="right") - 1
    return (i >= 0) & (positions < end[np.maximum(i, 0)])


@dataclass
class _Fit:
    """What pass 1 and 2 gather."""

    vocab_values: dict[str, SortedUnique]
    groups: dict[str, SortedUnique]
    stats: NumericStats
    positives: int
    rows: dict[str, int]
    events: dict[str, int]
    intervals: dict[str, tuple[np.ndarray, np.ndarray]]


def _scan_rows(src: ChunkSource) -> _Fit:
    s = src.schema
    fit = _Fit({v: SortedUnique() for v in s.vocab_names}, {}, NumericStats(len(s.numeric)), 0, {}, {q.name: 0 for q in s.sequences}, {})
    spans: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {q.name: [] for q in s.sequences}
    for chunk in src.chunks():
        for name, sp in chunk.splits.items():
            fit.rows[name] = fit.rows.get(name, 0) + len(sp)
            if s.group and s.group in sp.columns:
                fit.groups.setdefault(name, SortedUnique()).add(_normalise(sp.columns[s.group]))
            if name != "train" or not len(sp):
                continue
            for col, vocab in s.categorical:
                fit.vocab_values[vocab].add(_normalise(sp.columns[col]))
            if s.numeric:
                fit.stats.add(np.stack([sp.columns[c].astype(np.float64) for c in s.numeric], axis=1))
            fit.positives += int(np.count_nonzero(sp.columns[s.label]))
            for q in s.sequences:
                spans[q.name].append(merge_intervals(sp.seq_start[q.name], sp.seq_end[q.name]))
        for q in s.sequences:
            fit.events[q.name] += len(chunk.events[q.name]["item"])
    fit.rows.setdefault("train", 0)
    for q in s.sequences:
        parts = spans[q.name]
        fit.intervals[q.name] = merge_intervals(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])) if parts \
            else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return fit


def _scan_events(src: ChunkSource, fit: _Fit) -> None:
    """Add to the vocabularies the events that training histories cover."""
    s = src.schema
    offset = {q.name: 0 for q in s.sequences}
    for chunk in src.chunks():
        for q in s.sequences:
            ev = chunk.events[q.name]
            m = len(ev["item"])
            used = covered(offset[q.name] + np.arange(m), *fit.intervals[q.name])
            offset[q.name] += m
            if used.any():
                for col, vocab in q.categorical_columns:
                    fit.vocab_values[vocab].add(_normalise(ev[col][used]))


def fit_chunked(src: ChunkSource) -> tuple[Encoder, _Fit]:
    """Passes 1 and 2: the encoder ``Encoder.fit`` would give for the same rows, and the counts pass 3 needs."""
    fit = _scan_rows(src)
    if src.schema.sequences:
        _scan_events(src, fit)
    vocabs = {name: Vocab.build([u.result()]) for name, u in fit.vocab_values.items()}
    mean, std = fit.stats.result()
    return Encoder.from_parts(src.schema, vocabs, mean, std, fit.positives, fit.rows["train"], src.source), fit


def prepare_chunked(src: ChunkSource, name: str, directory: Path) -> None:
    """Write the prepared cache of ``src`` into ``directory`` (atomically), one chunk in memory at a time."""
    encoder, fit = fit_chunked(src)
    s = src.schema
    groups = {k: u.result() for k, u in fit.groups.items()}

    def write(tmp: Path) -> None:
        w = CacheWriter(tmp, name, encoder, fit.rows, fit.events)
        done = dict.fromkeys(fit.rows, 0)
        for chunk in src.chunks():
            for split, sp in chunk.splits.items():
                if len(sp):
                    w.add_split(split, encoder.encode_split(sp, groups.get(split) if s.group else None, done[split]))
                    done[split] += len(sp)
            if s.sequences:
                for seq, ev in encoder.encode_events(chunk.events).items():
                    w.add_events(seq, ev)
        w.close()

    atomic_dir(directory, write)
