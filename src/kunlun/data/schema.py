"""One schema for every dataset, and the raw (pre-vocabulary) form that adapters produce.

An example has a binary label, non-sequence fields (categorical and numeric), and zero or more
behaviour sequences. Sequences are jagged and stored once per dataset as an *event table*
(values, in time order per user) plus, per example, a half-open range ``[start, end)`` into it: for
MovieLens, a rating's history is the user's events strictly before it, so every example points into
one shared timeline instead of copying its history (O(events) storage, not O(events²)).

Categorical columns name a *vocabulary*; columns that name the same vocabulary share ids and, in the
model, one embedding table (e.g. the candidate ``item`` and the history's item ids).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class SequenceSpec:
    """A behaviour sequence: each event has an item id, an event type, a time and side features."""

    name: str
    item_vocab: str  # vocabulary shared with a categorical field (the candidate item)
    event_vocab: str | None = None  # e.g. liked / not liked
    side: tuple[tuple[str, str], ...] = ()  # (event column, vocabulary) pairs
    has_time: bool = True

    @property
    def categorical_columns(self) -> list[tuple[str, str]]:
        cols = [("item", self.item_vocab)]
        if self.event_vocab:
            cols.append(("event", self.event_vocab))
        return cols + list(self.side)


@dataclass(frozen=True)
class Schema:
    label: str
    categorical: tuple[tuple[str, str], ...]  # (column, vocabulary)
    numeric: tuple[str, ...] = ()
    sequences: tuple[SequenceSpec, ...] = ()
    group: str | None = None  # column used to group impressions for gAUC (the user)
    has_time: bool = False  # examples carry a request time (needed for history time gaps)

    @property
    def vocab_names(self) -> list[str]:
        names = [v for _, v in self.categorical]
        for seq in self.sequences:
            names += [v for _, v in seq.categorical_columns]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        seqs = tuple(
            SequenceSpec(
                name=s["name"],
                item_vocab=s["item_vocab"],
                event_vocab=s.get("event_vocab"),
                side=tuple(tuple(x) for x in s.get("side", ())),
                has_time=s.get("has_time", True),
            )
            for s in d.get("sequences", ())
        )
        return cls(
            label=d["label"],
            categorical=tuple(tuple(x) for x in d["categorical"]),
            numeric=tuple(d.get("numeric", ())),
            sequences=seqs,
            group=d.get("group"),
            has_time=d.get("has_time", False),
        )


@dataclass
class RawSplit:
    """Examples of one split before encoding: raw column values, and history ranges per sequence."""

    columns: dict[str, np.ndarray]  # label, categorical and numeric columns, group: by column name
    seq_start: dict[str, np.ndarray] = field(default_factory=dict)
    seq_end: dict[str, np.ndarray] = field(default_factory=dict)
    # kept apart from ``columns`` so that a user's column may be called "time" or "row"
    time: np.ndarray | None = None  # request time (unix seconds), when the schema has_time
    row: np.ndarray | None = None  # row in the source file, when the examples were reordered (default: in order)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


@dataclass
class RawData:
    """What an adapter returns: schema, raw splits, and per sequence a raw event table."""

    schema: Schema
    splits: dict[str, RawSplit]
    events: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # seq -> column -> values
    source: str = ""  # human-readable origin, for messages
    has_labels: bool = True  # False: a file to score had no label column (labels are 0 placeholders)
    note: str = ""  # a file to score: one line for the user about how it was read (e.g. its histories' source)
