"""Vocabularies, encoding, normalisation and the on-disk columnar cache of a prepared dataset.

Index conventions for every categorical column: 0 = padding (empty history slot), 1 = out of
vocabulary (a value never seen in the training split), 2.. = known values. Vocabularies are built
from the training split only; numeric columns are standardised with training mean and std.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from kunlun.data.schema import RawData, RawSplit, Schema
from kunlun.errors import KunlunError
from kunlun.files import atomic_dir

PAD, OOV = 0, 1
CACHE_VERSION = 2  # bump when the cache layout changes


@dataclass
class Vocab:
    """Sorted raw values; ``encode`` maps raw → index (2.. known, 1 unknown) without Python loops."""

    keys: np.ndarray

    def __len__(self) -> int:  # number of embedding rows, including PAD and OOV
        return len(self.keys) + 2

    @classmethod
    def build(cls, values: list[np.ndarray]) -> Vocab:
        vals = [v for v in values if len(v)]
        if not vals:
            return cls(np.array([], dtype=np.int64))
        return cls(np.unique(np.concatenate([_normalise(v) for v in vals])))

    def encode(self, raw: np.ndarray) -> np.ndarray:
        raw = _normalise(raw)
        if len(self.keys) == 0:
            return np.full(len(raw), OOV, dtype=np.int64)
        if raw.dtype.kind != self.keys.dtype.kind:
            # e.g. a file with string ids scored against an integer vocabulary: compare as strings
            raw, keys = raw.astype(str), self.keys.astype(str)
            order = np.argsort(keys)
            keys = keys[order]
        else:
            keys, order = self.keys, None
        pos = np.searchsorted(keys, raw)
        pos_c = np.minimum(pos, len(keys) - 1)
        hit = keys[pos_c] == raw
        if order is not None:
            pos_c = order[pos_c]
        return np.where(hit, pos_c + 2, OOV).astype(np.int64)


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype.kind in "iub":
        return v.astype(np.int64)
    if v.dtype.kind == "f":
        if np.all(np.isfinite(v)) and np.all(v == np.round(v)):
            return v.astype(np.int64)
        return v.astype(str)
    return v.astype(str)


@dataclass
class Split:
    """Encoded examples of one split. Shapes: label [n], cat [n, F], num [n, Dn], group/time/row [n]."""

    label: np.ndarray
    cat: np.ndarray
    num: np.ndarray
    group: np.ndarray
    time: np.ndarray
    row: np.ndarray  # row number in the source file (examples may be reordered, e.g. by user and time)
    seq_start: dict[str, np.ndarray] = field(default_factory=dict)
    seq_end: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class Events:
    """Encoded event table of one sequence. item/event/time [E], side [E, S]."""

    item: np.ndarray
    event: np.ndarray
    side: np.ndarray
    time: np.ndarray


@dataclass
class Prepared:
    """A dataset ready for batching: schema, vocabularies, statistics, encoded splits and events."""

    name: str
    schema: Schema
    vocabs: dict[str, Vocab]
    num_mean: np.ndarray
    num_std: np.ndarray
    train_ctr: float
    splits: dict[str, Split]
    events: dict[str, Events]
    has_labels: bool = True

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.vocabs.items()}

    def encoder(self) -> Encoder:
        return Encoder(self.schema, self.vocabs, self.num_mean, self.num_std, self.train_ctr)

    def fingerprint(self) -> dict[str, Any]:
        """Rows per split and a SHA-256 over every encoded array (splits, events, vocabularies, statistics):
        two runs with the same fingerprint saw the same data, however it was read or cached."""
        h = hashlib.sha256(json.dumps({"schema": repr(self.schema), "vocabs": self.vocab_sizes}, sort_keys=True).encode())
        for arr in (self.num_mean, self.num_std):
            h.update(np.ascontiguousarray(arr).tobytes())
        for name in sorted(self.splits):
            sp = self.splits[name]
            for arr in (sp.label, sp.cat, sp.num, sp.group, sp.time, sp.row, *[sp.seq_start[k] for k in sorted(sp.seq_start)],
                        *[sp.seq_end[k] for k in sorted(sp.seq_end)]):
                h.update(np.ascontiguousarray(arr).tobytes())
        for name in sorted(self.events):
            for arr in vars(self.events[name]).values():
                if isinstance(arr, np.ndarray):
                    h.update(np.ascontiguousarray(arr).tobytes())
        return {"name": self.name, "rows": {k: len(v) for k, v in self.splits.items()}, "sha256": h.hexdigest()}


@dataclass
class Encoder:
    """Everything needed to encode new raw data exactly as the training data was encoded."""

    schema: Schema
    vocabs: dict[str, Vocab]
    num_mean: np.ndarray
    num_std: np.ndarray
    train_ctr: float

    @classmethod
    def fit(cls, raw: RawData) -> Encoder:
        schema = raw.schema
        train = raw.splits["train"]
        pools: dict[str, list[np.ndarray]] = {v: [] for v in schema.vocab_names}
        for col, vocab in schema.categorical:
            pools[vocab].append(train.columns[col])
        for seq in schema.sequences:
            used = _events_used(train.seq_start[seq.name], train.seq_end[seq.name], len(raw.events[seq.name]["item"]))
            for col, vocab in seq.categorical_columns:
                pools[vocab].append(raw.events[seq.name][col][used])
        vocabs = {name: Vocab.build(vals) for name, vals in pools.items()}
        if schema.numeric:
            num = np.stack([train.columns[c].astype(np.float64) for c in schema.numeric], axis=1)
            mean, std = num.mean(axis=0), num.std(axis=0)
            # a spread float32 cannot hold (a column of 1e-88s) is no spread: dividing by it would give NaN
            std = np.where(std.astype(np.float32) > 0, std, 1.0)
        else:
            mean = std = np.zeros(0)
        ctr = float(np.mean(train.columns[schema.label]))
        if not 0.0 < ctr < 1.0:
            raise KunlunError(f"{raw.source}: the training labels are all {int(round(ctr))}; need both classes")
        return cls(schema, vocabs, mean.astype(np.float32), std.astype(np.float32), ctr)

    def encode_split(self, split: RawSplit) -> Split:
        s = self.schema
        n = len(split)
        cat = np.stack([self.vocabs[v].encode(split.columns[c]) for c, v in s.categorical], axis=1)
        if s.numeric:
            num = np.stack([split.columns[c].astype(np.float32) for c in s.numeric], axis=1)
            num = (num - self.num_mean) / self.num_std
            bad = ~np.isfinite(num)
            if bad.any():
                row, col = (int(i[0]) for i in np.nonzero(bad))
                raise KunlunError(f"numeric column {s.numeric[col]!r}: value {split.columns[s.numeric[col]][row]:g} (example {row + 1}) "
                                  "is too large for float32 features once standardised")
        else:
            num = np.zeros((n, 0), dtype=np.float32)
        group = split.columns.get(s.group) if s.group else None
        group = np.unique(_normalise(group), return_inverse=True)[1] if group is not None else np.arange(n)
        return Split(
            label=split.columns[s.label].astype(np.float32),
            cat=cat.astype(np.int64),
            num=num.astype(np.float32),
            group=group.astype(np.int64),
            time=(split.time if split.time is not None else np.zeros(n)).astype(np.int64),
            row=(split.row if split.row is not None else np.arange(n)).astype(np.int64),
            seq_start={k: v.astype(np.int64) for k, v in split.seq_start.items()},
            seq_end={k: v.astype(np.int64) for k, v in split.seq_end.items()},
        )

    def encode_events(self, raw_events: dict[str, dict[str, np.ndarray]]) -> dict[str, Events]:
        out = {}
        for seq in self.schema.sequences:
            ev = raw_events[seq.name]
            m = len(ev["item"])
            out[seq.name] = Events(
                item=self.vocabs[seq.item_vocab].encode(ev["item"]),
                event=self.vocabs[seq.event_vocab].encode(ev["event"]) if seq.event_vocab else np.full(m, OOV),
                side=np.stack([self.vocabs[v].encode(ev[c]) for c, v in seq.side], axis=1)
                if seq.side
                else np.zeros((m, 0), dtype=np.int64),
                time=ev["time"].astype(np.int64) if seq.has_time else np.zeros(m, dtype=np.int64),
            )
        return out

    def prepare(self, raw: RawData, name: str) -> Prepared:
        return Prepared(
            name=name,
            schema=self.schema,
            vocabs=self.vocabs,
            num_mean=self.num_mean,
            num_std=self.num_std,
            train_ctr=self.train_ctr,
            splits={k: self.encode_split(v) for k, v in raw.splits.items()},
            events=self.encode_events(raw.events),
            has_labels=raw.has_labels,
        )

    # --- persistence (run directories keep the encoder so `eval --file` needs no dataset cache) ---
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"schema": self.schema.to_dict(), "train_ctr": self.train_ctr, "vocabs": list(self.vocabs)}
        (directory / "encoder.json").write_text(json.dumps(meta, indent=1))
        np.save(directory / "num_stats.npy", np.stack([self.num_mean, self.num_std]) if len(self.num_mean) else np.zeros((2, 0)))
        for k, v in self.vocabs.items():
            np.save(directory / vocab_file(k), v.keys, allow_pickle=False)

    @classmethod
    def load(cls, directory: Path) -> Encoder:
        """Read what ``save`` wrote; a missing, truncated or altered file is a KunlunError naming it."""
        path = directory / "encoder.json"
        try:
            meta = json.loads(path.read_text())
            schema = Schema.from_dict(meta["schema"])
            names, ctr = [str(k) for k in meta["vocabs"]], float(meta["train_ctr"])
            path = directory / "num_stats.npy"
            stats = np.load(path, allow_pickle=False)
            if stats.ndim != 2 or stats.shape != (2, len(schema.numeric)):
                raise ValueError(f"shape {stats.shape}, expected (2, {len(schema.numeric)})")
            vocabs = {}
            for k in names:
                path = directory / vocab_file(k)
                vocabs[k] = Vocab(np.load(path, allow_pickle=False))
            path = directory / "encoder.json"
            missing = [v for v in schema.vocab_names if v not in vocabs]
            if missing:
                raise ValueError(f"no vocabulary {missing[0]!r}")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError) as exc:
            raise KunlunError(f"{path}: unreadable ({_reason(exc)}); the encoder was damaged or written by other code") from None
        return cls(schema, vocabs, stats[0].astype(np.float32), stats[1].astype(np.float32), ctr)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def vocab_file(name: str) -> str:
    """The file of vocabulary ``name``: the name itself when it is safe in a file name, else a hash of it."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name):
        return f"vocab.{name}.npy"
    return f"vocab.{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}.npy"


def _events_used(start: np.ndarray, end: np.ndarray, n_events: int) -> np.ndarray:
    """Boolean mask of events covered by any [start, end) range (difference-array trick, no loops)."""
    diff = np.zeros(n_events + 1, dtype=np.int64)
    np.add.at(diff, start, 1)
    np.add.at(diff, end, -1)
    return np.cumsum(diff[:-1]) > 0


# ---------------------------------------------------------------- on-disk cache

def cache_key(name: str, files: list[Path], options: dict) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{name}|{json.dumps(options, sort_keys=True)}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def save_prepared(p: Prepared, directory: Path) -> None:
    """Write atomically: build in a temporary sibling directory, then rename into place."""

    def write(tmp: Path) -> None:
        p.encoder().save(tmp)
        (tmp / "dataset.json").write_text(json.dumps({"name": p.name, "splits": sorted(p.splits)}))
        for split_name, s in p.splits.items():
            cols = {"label": s.label, "group": s.group, "time": s.time, "row": s.row}
            cols.update({f"cat{i}": s.cat[:, i] for i in range(s.cat.shape[1])})
            cols.update({f"num{i}": s.num[:, i] for i in range(s.num.shape[1])})
            for k in s.seq_start:
                cols[f"start.{k}"], cols[f"end.{k}"] = s.seq_start[k], s.seq_end[k]
            feather.write_feather(pa.table(cols), tmp / f"{split_name}.arrow", compression="uncompressed")
        for seq_name, e in p.events.items():
            cols = {"item": e.item, "event": e.event, "time": e.time}
            cols.update({f"side{i}": e.side[:, i] for i in range(e.side.shape[1])})
            feather.write_feather(pa.table(cols), tmp / f"events.{seq_name}.arrow", compression="uncompressed")

    atomic_dir(directory, write)


def load_prepared(directory: Path) -> Prepared:
    enc = Encoder.load(directory)
    meta = json.loads((directory / "dataset.json").read_text())
    s = enc.schema
    splits = {}
    for split_name in meta["splits"]:
        t = feather.read_table(directory / f"{split_name}.arrow", memory_map=True)
        col = lambda k, t=t: t.column(k).to_numpy()
        n = t.num_rows
        cat = np.stack([col(f"cat{i}") for i in range(len(s.categorical))], axis=1) if s.categorical else np.zeros((n, 0), np.int64)
        num = np.stack([col(f"num{i}") for i in range(len(s.numeric))], axis=1) if s.numeric else np.zeros((n, 0), np.float32)
        splits[split_name] = Split(
            label=col("label"), cat=cat, num=num, group=col("group"), time=col("time"), row=col("row"),
            seq_start={q.name: col(f"start.{q.name}") for q in s.sequences},
            seq_end={q.name: col(f"end.{q.name}") for q in s.sequences},
        )
    events = {}
    for q in s.sequences:
        t = feather.read_table(directory / f"events.{q.name}.arrow", memory_map=True)
        m = t.num_rows
        side = np.stack([t.column(f"side{i}").to_numpy() for i in range(len(q.side))], axis=1) if q.side else np.zeros((m, 0), np.int64)
        events[q.name] = Events(item=t.column("item").to_numpy(), event=t.column("event").to_numpy(), side=side, time=t.column("time").to_numpy())
    return Prepared(meta["name"], s, enc.vocabs, enc.num_mean, enc.num_std, enc.train_ctr, splits, events)
