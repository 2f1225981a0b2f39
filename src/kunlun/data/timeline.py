"""Examples on per-user timelines (MovieLens; Taobao UserBehavior and KuaiRand share the construction): events sorted
by user, time and file order; an example's history is the user's events strictly earlier in time (same-second events
excluded); split per user in time order (the first 80 % of a user's events train, the next 10 % valid, the rest test).

``Timeline`` holds the sorted events as compact numpy columns and computes the positions of a *range* of sorted rows
(where the user's events start, where the history ends, the split): the in-memory path takes the whole range, the
chunked one (``kunlun.data.stream``) successive ranges. Every value of a row comes from the sorted columns, never from
the rows before it in the range, so both give the same rows.

What is bounded, and what is not: the sort needs every event at once, so the sorted columns are held whole (int32
where the values fit, else int64: about 4 bytes per column per event, plus 4–8 for the permutation); everything made
per example — features, strings, per-split copies, encodings — exists one range at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kunlun.data.schema import RawData, RawSplit, Schema
from kunlun.data.stream import Chunk
from kunlun.errors import KunlunError

SPLIT_FRACTIONS = (0.8, 0.9)  # cumulative: train < 0.8 <= valid < 0.9 <= test
SPLITS = ("train", "valid", "test")
CHECK_ROWS = 1 << 20  # rows per range when checking that no split is empty


def compact(a: np.ndarray) -> np.ndarray:
    """Wide integers in int32 when every value fits (read back with ``.astype(np.int64)``: the same values), else as
    they are."""
    a = np.asarray(a)
    if a.dtype.kind in "iu" and a.dtype.itemsize > 4 and (not len(a) or (a.min() >= -(1 << 31) and a.max() < (1 << 31))):
        return a.astype(np.int32)
    return a


@dataclass
class Positions:
    """Rows ``[i, j)`` of a ``Timeline``, each as an index of the sorted events [j - i]: the user's first event
    (``user_start``; the history starts there), the first event of the same user and second (``hist_end``: the history
    ends before it), the previous event's time (the row's own when it has no history), and the split (0, 1, 2)."""

    idx: np.ndarray
    user_start: np.ndarray
    hist_end: np.ndarray
    ts: np.ndarray
    prev_ts: np.ndarray
    assign: np.ndarray


class Timeline:
    """Events sorted by user, then time, then file order. ``user`` and ``ts`` [n] are the events in file order;
    ``fields`` (name → [n] array) are sorted along (compact them first: they are held whole). ``split=False``: one split
    (0) for every row (a single file to score)."""

    def __init__(self, user: np.ndarray, ts: np.ndarray, fields: dict[str, np.ndarray], *, split: bool = True):
        n = len(user)
        order = np.lexsort((np.arange(n), ts, user))  # by user, then time, then file order
        self.n, self.split = n, split
        self.order = compact(order)
        del order
        self.user = compact(user[self.order])
        self.ts = compact(ts[self.order])
        self.fields = {k: v[self.order] for k, v in fields.items()}

    def positions(self, i: int, j: int) -> Positions:
        idx = np.arange(i, j)
        user = self.user[i:j]
        ts = self.ts[i:j].astype(np.int64)
        user_start = np.searchsorted(self.user, user, "left")
        user_count = np.searchsorted(self.user, user, "right") - user_start
        # the first event of each (user, second): where the row before differs (for the range's first row, the row
        # before the range); a range that starts inside a run takes the run's start, found among the user's times
        new_moment = np.r_[True, (user[1:] != user[:-1]) | (ts[1:] != ts[:-1])]
        base = 0
        if i > 0 and j > i and self.user[i - 1] == user[0] and self.ts[i - 1] == ts[0]:
            new_moment[0] = False
            s, e = int(user_start[0]), i
            base = s + int(np.searchsorted(self.ts[s:e], ts[0], "left"))
        hist_end = np.maximum.accumulate(np.where(new_moment, idx, base))
        hist_len = hist_end - user_start
        prev_ts = np.where(hist_len > 0, self.ts[np.maximum(hist_end - 1, 0)].astype(np.int64), ts)
        if self.split:
            frac = (idx - user_start) / user_count
            assign = np.where(frac < SPLIT_FRACTIONS[0], 0, np.where(frac < SPLIT_FRACTIONS[1], 1, 2))
        else:
            assign = np.zeros(j - i, dtype=np.int64)
        return Positions(idx, user_start, hist_end, ts, prev_ts, assign)

    def rows_positions(self, user: np.ndarray, ts: np.ndarray) -> Positions:
        """Positions of rows that are not among the events (a file's rows to score, in file order), each against the
        events: the user's first event and the end of the user's events strictly earlier than the row (same-second
        events excluded, as for the events themselves); one split (0). A user without events has an empty history."""
        user, ts = np.asarray(user, dtype=np.int64), np.asarray(ts, dtype=np.int64)
        n, m = self.n, len(user)
        ev_user, ev_ts = self.user.astype(np.int64), self.ts.astype(np.int64)
        user_start = np.searchsorted(ev_user, user, "left")
        # events and rows sorted together by user and time, a row before the events of its own second: the events before
        # a row there are its history's end
        is_row = np.r_[np.zeros(n, dtype=bool), np.ones(m, dtype=bool)]
        order = np.lexsort((~is_row, np.r_[ev_ts, ts], np.r_[ev_user, user]))
        place = np.empty(n + m, dtype=np.int64)
        place[order] = np.arange(n + m)
        rows_before = np.cumsum(is_row[order]) - is_row[order]  # rows ahead of each place in that order
        hist_end = place[n:] - rows_before[place[n:]]
        prev_ts = np.where(hist_end > user_start, ev_ts[np.maximum(hist_end - 1, 0)] if n else ts, ts)
        return Positions(np.arange(m), user_start, hist_end, ts, prev_ts, np.zeros(m, dtype=np.int64))

    def check_splits(self, source: str, what: str) -> None:
        """A one-line error when a split would be empty (users with too few events for 80/10/10), before any work."""
        if not self.split:
            return
        seen = np.zeros(3, dtype=bool)
        for i in range(0, self.n, CHECK_ROWS):
            seen[np.unique(self.positions(i, min(self.n, i + CHECK_ROWS)).assign)] = True
        if not seen.all():
            starts = np.flatnonzero(np.r_[True, self.user[1:] != self.user[:-1]])
            most = int(np.diff(np.r_[starts, self.n]).max()) if self.n else 0
            raise KunlunError(f"{source}: the {SPLITS[int(np.flatnonzero(~seen)[0])]} split is empty: users need more {what} "
                              f"for an 80/10/10 split (the most any user has is {most})")


class TimelineSource:
    """What the timeline adapters share: ``block(i, j)`` (a subclass's) makes sorted rows ``[i, j)``; ``raw()`` takes
    every row at once (the in-memory path), ``chunks()`` ``rows`` at a time (a ``kunlun.data.stream.ChunkSource``), so
    both give the same rows. Subclasses set ``timeline``, ``schema``, ``source``, ``rows`` and ``split_names``."""

    timeline: Timeline
    schema: Schema
    source: str
    rows: int
    split_names: list[str]

    def block(self, i: int, j: int) -> tuple[dict[str, RawSplit], dict[str, dict[str, np.ndarray]]]:
        raise NotImplementedError

    def splits_of(self, i: int, j: int, p: Positions, columns: dict[str, np.ndarray], seq: str) -> dict[str, RawSplit]:
        """Rows ``[i, j)`` (positions ``p``, example ``columns``) divided into their splits; history ranges of ``seq``."""
        row = self.timeline.order[i:j].astype(np.int64)
        splits = {}
        for k, name in enumerate(self.split_names):
            m = p.assign == k
            splits[name] = RawSplit(columns={c: v[m] for c, v in columns.items()}, seq_start={seq: p.user_start[m]},
                                    seq_end={seq: p.hist_end[m]}, time=p.ts[m], row=row[m])
        return splits

    def raw(self) -> RawData:
        splits, events = self.block(0, self.timeline.n)
        return RawData(schema=self.schema, splits=splits, events=events, source=self.source)

    def example_columns(self, values: dict[str, np.ndarray], p: Positions) -> dict[str, np.ndarray]:
        """The example columns of rows whose raw fields are ``values`` (``user`` and the timeline's fields, per row) at
        positions ``p`` (a subclass's; ``block`` makes its rows with it too)."""
        raise NotImplementedError

    def score_rows(self, values: dict[str, np.ndarray], has_labels: bool, note: str = "") -> RawData:
        """A file's rows as split ``file`` (file order), each row's history the events of this timeline (split=False)
        of its user strictly earlier than the row: ``values`` holds the rows' raw fields (``user``, ``ts`` and the
        timeline's fields; a label field of zeros when the file has no labels). ``note``: ``RawData.note``."""
        p = self.timeline.rows_positions(values["user"], values["ts"])
        _, events = self.block(0, self.timeline.n)  # every event (the examples made beside them are not used)
        seq = self.schema.sequences[0].name
        split = RawSplit(columns=self.example_columns(values, p), seq_start={seq: p.user_start}, seq_end={seq: p.hist_end},
                         time=p.ts, row=np.arange(len(p.ts)))
        return RawData(schema=self.schema, splits={"file": split}, events=events, source=self.source, has_labels=has_labels,
                       note=note)

    def chunks(self) -> Iterator[Chunk]:
        for i in range(0, self.timeline.n, self.rows):
            yield Chunk(*self.block(i, min(self.timeline.n, i + self.rows)))


def same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each row of ``a`` [n, k] equals some row of ``b`` [m, k] (integer keys): [n] bool."""
    if not len(a) or not len(b):
        return np.zeros(len(a), dtype=bool)
    _, inverse = np.unique(np.concatenate([b, a]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return np.isin(inverse[len(b):], inverse[: len(b)])


def scoring_events(data: dict[str, np.ndarray] | None, file: dict[str, np.ndarray], file_events: bool,
                   same: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The events that the rows of a file to score draw their histories from, as columns in file order (``Timeline``
    sorts them): the data set's events of the file's users (``data``, in the data's order, so same-second events keep
    the order training gave them), then, when ``file_events`` (the file has labels: its rows are events too), the
    file's rows that are not already among them (a row equal to a data event in the fields ``same`` is that event).
    ``data`` None: the data set is not available, the file's own rows only. ``data`` and ``file`` have the same keys."""
    parts = []
    if data is not None:
        keep = np.isin(data["user"], np.unique(file["user"]))
        parts.append({k: v[keep] for k, v in data.items()})
    own = np.full(len(file["user"]), file_events)
    if parts and own.any():
        key = lambda d: np.stack([np.asarray(d[k]).astype(np.int64) for k in same], axis=1)  # noqa: E731
        own &= ~same_rows(key(file), key(parts[0]))
    parts.append({k: np.asarray(v)[own] for k, v in file.items()})
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in file}


def missing_data_note(path, has_labels: bool, kept: tuple[Path, tuple[str, ...]] | None = None) -> str:
    """``RawData.note`` of a file scored without its data set (``path``: the data file not found). ``kept``: (folder,
    names) of the run's copies of the data set's other files that were read instead (``registry.keep_side_files``)."""
    copies = f"; {', '.join(kept[1])} read from the run's copy in {kept[0]}" if kept else ""
    if has_labels:
        return (f"{path}: not found, so each row's history is only the file's own earlier rows{copies} "
                "(pass --data-dir to draw histories from the data set too)")
    return (f"{path}: not found, and the file has no labels, so every row is scored with an empty history{copies} "
            "(pass --data-dir)")
