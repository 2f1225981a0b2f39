"""Vocabularies, encoding, normalisation and the on-disk cache of a prepared dataset.

Index conventions for every categorical column: 0 = padding (empty history slot), 1 = out of
vocabulary (a value never seen in the training split), 2.. = known values. Vocabularies are built
from the training split only; numeric columns are standardised with training mean and std.

**The cache is memory-mapped, not loaded.** Each encoded array is one ``.npy`` file (layout in
``save_prepared``); ``load_prepared`` opens them with ``np.load(mmap_mode="r")``, so a loaded ``Prepared`` holds
memory maps and a batch pages in only its rows: training, evaluation and prediction read a prepared set larger
than memory (the operating system keeps what fits in its page cache). ``ulimit -v`` counts mapped files, so it
cannot cap such a process: cap its resident memory instead (a cgroup; docs/datasets.md#data-larger-than-memory).

**Two ways to prepare, one result.** ``Encoder.fit`` + ``Encoder.prepare`` encode a ``RawData`` held in memory
(small sets, and single files to score); ``kunlun.data.stream`` encodes a dataset chunk by chunk in bounded memory
(synthetic sets and every file-based adapter: ``kunlun.data.registry.chunk_source``). Both use the same pieces —
vocabularies as sorted unique values, ``NumericStats`` (exact sums, so the statistics do not depend on how rows are
chunked), ``label_ctr``, ``Encoder.encode_split`` — and write through the same ``CacheWriter``, so for the same input
they produce byte-identical caches.

**What still takes RAM in proportion to rows** (everything else is memory-mapped, or bounded by a chunk or a batch):

- the training shuffle, ``rng.permutation(n)``: 8 bytes per training row (so 0.8 GB at 1e8 rows); with
  ``train.shuffle_block_rows`` only one window of blocks at a time (``kunlun.data.batches.shuffled_rows``);
- evaluation of a split: its predictions, labels and groups (16 bytes per row) and the metrics' sorts of them
  (≈ 125 bytes per row at the peak, measured on a 4M-row split);
- the chunked prepare: vocabularies and each split's group values (O(distinct ids)), the training histories'
  merged ranges (O(users)), Criteo's split (1 byte per row) and, for per-user timelines (MovieLens, Taobao
  UserBehavior, KuaiRand), the events sorted by user and time as compact columns (≈ 17–25 bytes per event); the
  in-memory prepare, the whole dataset (small datasets; ``eval --file``, ``predict --file`` and serving encode their
  one file in memory);
- ``kunlun data info``: whole columns of a split at a time (history lengths, their percentiles);
- ``useful_flops`` reads a fixed sample of at most 100,000 rows, and the data fingerprint streams every array.

Reading a set larger than memory in a shuffled order reads its pages from disk as batches need them: the speed then
depends on the disk (docs/datasets.md#data-larger-than-memory). Caches are replaced by renaming a new directory into place, so
a process reading an old one keeps its maps; never edit a cache file in place while a process reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from kunlun.data.schema import RawData, RawSplit, Schema
from kunlun.errors import KunlunError
from kunlun.files import atomic_dir

PAD, OOV = 0, 1
CACHE_VERSION = 3  # bump when the cache layout changes (3: one memory-mapped .npy per array)


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
        keys = np.unique(np.concatenate([_normalise(v) for v in vals]))
        if keys.dtype.kind == "U":  # as wide as the longest key, not as the widest input array: the same however it was read
            keys = keys.astype(f"U{max(int(np.char.str_len(keys).max()), 1)}")
        return cls(keys)

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


_SCALE = 1127  # every finite float64 is an integer multiple of 2^-1074; its 53-bit mantissa adds 53 more
_BLOCK = 1 << 24  # rows summed per bincount: partial sums of 27-bit halves stay below 2^53, exact in float64


def exact_sum(v: np.ndarray) -> int:
    """Σ v × 2^1127 as an exact integer (``v``: finite float64 [n]). Vectorised: each value is split into an integer
    mantissa and an exponent, mantissa halves are summed per exponent (exactly: the sums stay below 2^53), and only
    the few per-exponent totals become Python integers."""
    total = 0
    for i in range(0, len(v), _BLOCK):
        m, e = np.frexp(v[i : i + _BLOCK])  # v = m × 2^e, 0.5 <= |m| < 1 (0 for 0)
        q = np.ldexp(m, 53).astype(np.int64)  # exact: v = q × 2^(e − 53)
        lo_e = int(e.min())
        idx = e - lo_e
        hi = np.bincount(idx, weights=(q >> 26).astype(np.float64))  # q = hi × 2^26 + lo, 0 <= lo < 2^26
        lo = np.bincount(idx, weights=(q & ((1 << 26) - 1)).astype(np.float64))
        for k in np.flatnonzero((hi != 0) | (lo != 0)).tolist():
            total += ((int(hi[k]) << 26) + int(lo[k])) << (k + lo_e - 53 + _SCALE)
    return total


def _square_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, r) with p + r = x² exactly (Dekker's product without FMA; exact for 1e-150 < |x| < 1e150, which covers every
    float32 feature above 1e-150 — beyond that the sums are still deterministic, only no longer exact)."""
    c = 134217729.0 * x  # 2^27 + 1: splits x into two 26-bit halves
    xh = c - (c - x)
    xl = x - xh
    p = x * x
    return p, ((xh * xh - p) + 2.0 * xh * xl) + xl * xl


class NumericStats:
    """Mean and (population) standard deviation of numeric columns fed in chunks of rows: Σx and Σx² are kept as exact
    integers, so the result is the correctly rounded mean and variance whatever the chunking (a float64 running sum
    would depend on it in the last bits, and through float32 rounding, on rare occasions, in the statistics used).
    ``add(x)``: x [n, D] float64."""

    def __init__(self, width: int):
        self.n = 0
        self.s1 = [0] * width
        self.s2 = [0] * width

    def add(self, x: np.ndarray) -> None:
        self.n += len(x)
        for j in range(len(self.s1)):
            col = np.ascontiguousarray(x[:, j], dtype=np.float64)
            p, r = _square_parts(col)
            self.s1[j] += exact_sum(col)
            self.s2[j] += exact_sum(p) + exact_sum(r)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) [D] float64; a spread float32 cannot hold (a column of 1e-88s) is no spread: std 1."""
        n, unit = self.n, 1 << _SCALE
        mean = np.array([float(Fraction(s, n * unit)) for s in self.s1]) if n else np.zeros(len(self.s1))
        var = [float(Fraction(n * s2 * unit - s1 * s1, n * n * unit * unit)) if n else 0.0 for s1, s2 in zip(self.s1, self.s2)]
        std = np.array([math.sqrt(max(v, 0.0)) for v in var])
        return mean, np.where(std.astype(np.float32) > 0, std, 1.0)


def label_ctr(positives: int, n: int) -> float:
    """The training CTR as ``np.mean`` of a float32 0/1 label column gives it below 2^24 positives (the float32 sum is
    exact there): the float32 quotient. From counts, so a chunked pass gets the same value."""
    return float(np.float32(positives) / np.float32(n))


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
    """Encoded event table of one sequence. item/event/time [E], side [E, S]; ``type_positions``: event code (≥ 2) →
    the sorted positions of that type's events [E_c] (from the cache; ``Batcher`` computes them when absent)."""

    item: np.ndarray
    event: np.ndarray
    side: np.ndarray
    time: np.ndarray
    type_positions: dict[int, np.ndarray] = field(default_factory=dict)


def type_positions(event: np.ndarray, rows: int = 1 << 22) -> dict[int, np.ndarray]:
    """Event code (≥ 2: not PAD, not OOV) → positions of its events [E_c] in ``event`` [E], read a block at a time."""
    found: dict[int, list[np.ndarray]] = {}
    for i in range(0, len(event), rows):
        block = np.asarray(event[i : i + rows])
        for code in np.unique(block[block > 1]).tolist():
            found.setdefault(int(code), []).append(i + np.flatnonzero(block == code))
    return {c: np.concatenate(v) for c, v in sorted(found.items())}


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
            _hash(h, arr)
        for name in sorted(self.splits):
            sp = self.splits[name]
            for arr in (sp.label, sp.cat, sp.num, sp.group, sp.time, sp.row, *[sp.seq_start[k] for k in sorted(sp.seq_start)],
                        *[sp.seq_end[k] for k in sorted(sp.seq_end)]):
                _hash(h, arr)
        for name in sorted(self.events):
            for arr in vars(self.events[name]).values():
                if isinstance(arr, np.ndarray):
                    _hash(h, arr)
        return {"name": self.name, "rows": {k: len(v) for k, v in self.splits.items()}, "sha256": h.hexdigest()}


    def in_memory(self) -> Prepared:
        """This dataset with every array copied into RAM (for a set that fits, when page faults on a cold page cache
        must not count, e.g. to compare the two); the same values, so the same batches and metrics."""
        def copy(x):
            return {k: copy(v) for k, v in x.items()} if isinstance(x, dict) else np.array(x)

        splits = {k: Split(**{f: copy(v) for f, v in vars(sp).items()}) for k, sp in self.splits.items()}
        events = {k: Events(**{f: copy(v) for f, v in vars(e).items()}) for k, e in self.events.items()}
        return Prepared(self.name, self.schema, self.vocabs, self.num_mean, self.num_std, self.train_ctr, splits, events,
                        self.has_labels)


def _hash(h, arr: np.ndarray, rows: int = 1 << 20) -> None:
    """Feed ``arr``'s bytes (C order) to ``h`` a block of rows at a time: the same digest as its whole ``tobytes()``,
    without a copy of a memory-mapped split in RAM."""
    arr = np.asarray(arr)
    if arr.ndim == 0 or len(arr) <= rows:
        h.update(np.ascontiguousarray(arr).tobytes())
        return
    for i in range(0, len(arr), rows):
        h.update(np.ascontiguousarray(arr[i : i + rows]).tobytes())


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
        stats = NumericStats(len(schema.numeric))
        if schema.numeric:
            stats.add(np.stack([train.columns[c].astype(np.float64) for c in schema.numeric], axis=1))
        mean, std = stats.result()
        label = train.columns[schema.label]
        return cls.from_parts(schema, vocabs, mean, std, int(np.count_nonzero(label)), len(label), raw.source)

    @classmethod
    def from_parts(cls, schema: Schema, vocabs: dict[str, Vocab], mean: np.ndarray, std: np.ndarray, positives: int, n: int,
                   source: str) -> Encoder:
        """The encoder of fitted parts (also ``kunlun.data.stream``'s): refuses a training split of one class."""
        if not 0 < positives < n:
            raise KunlunError(f"{source}: the training labels are all {int(positives > 0)}; need both classes")
        return cls(schema, vocabs, mean.astype(np.float32), std.astype(np.float32), label_ctr(positives, n))

    def encode_split(self, split: RawSplit, groups: np.ndarray | None = None, offset: int = 0) -> Split:
        """Encode ``split`` whole, or (``kunlun.data.stream``) one chunk of a split: then ``groups`` holds the sorted
        group values of the whole split (group ids are ranks among them) and ``offset`` the split rows before it."""
        s = self.schema
        n = len(split)
        cat = np.stack([self.vocabs[v].encode(split.columns[c]) for c, v in s.categorical], axis=1)
        if s.numeric:
            num = np.stack([split.columns[c].astype(np.float32) for c in s.numeric], axis=1)
            num = (num - self.num_mean) / self.num_std
            bad = ~np.isfinite(num)
            if bad.any():
                row, col = (int(i[0]) for i in np.nonzero(bad))
                raise KunlunError(f"numeric column {s.numeric[col]!r}: value {split.columns[s.numeric[col]][row]:g} "
                                  f"(example {offset + row + 1}) is too large for float32 features once standardised")
        else:
            num = np.zeros((n, 0), dtype=np.float32)
        group = split.columns.get(s.group) if s.group else None
        if group is None:
            group = offset + np.arange(n)
        elif groups is None:
            group = np.unique(_normalise(group), return_inverse=True)[1]
        else:
            group = np.searchsorted(groups, _normalise(group))
        return Split(
            label=split.columns[s.label].astype(np.float32),
            cat=cat.astype(np.int64),
            num=num.astype(np.float32),
            group=group.astype(np.int64),
            time=(split.time if split.time is not None else np.zeros(n)).astype(np.int64),
            row=(split.row if split.row is not None else offset + np.arange(n)).astype(np.int64),
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

    def same_as(self, other: Encoder) -> bool:
        """Whether ``other`` encodes every input exactly as this one: same schema, vocabularies, statistics and CTR."""
        return (self.schema == other.schema and self.vocabs.keys() == other.vocabs.keys() and self.train_ctr == other.train_ctr
                and np.array_equal(self.num_mean, other.num_mean) and np.array_equal(self.num_std, other.num_std)
                and all(self.vocabs[k].keys.dtype.kind == other.vocabs[k].keys.dtype.kind
                        and np.array_equal(self.vocabs[k].keys, other.vocabs[k].keys) for k in self.vocabs))

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


def split_arrays(s: Split) -> dict[str, np.ndarray]:
    """File stem → array of a split in the cache: label [n], cat [n, F], num [n, Dn], group, time, row [n], and per
    sequence start.<name>, end.<name> [n]."""
    out = {"label": s.label, "cat": s.cat, "num": s.num, "group": s.group, "time": s.time, "row": s.row}
    for k in s.seq_start:
        out[f"start.{k}"], out[f"end.{k}"] = s.seq_start[k], s.seq_end[k]
    return out


def event_arrays(e: Events) -> dict[str, np.ndarray]:
    """File stem → array of an event table in the cache: item, event, time [E], side [E, S]."""
    return {"item": e.item, "event": e.event, "side": e.side, "time": e.time}


class NpyAppender:
    """One ``.npy`` file of a known shape, written a block of rows at a time: the header first, then each block's bytes,
    so a split larger than memory is written without ever being whole. The bytes are those ``np.save`` writes."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.rows = path, np.dtype(dtype), tuple(shape), 0
        self.file = open(path, "wb")  # open across chunks; close() closes it
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: block {block.dtype}{block.shape} does not fit {self.dtype}{self.shape} after {self.rows} rows")
        self.file.write(np.ascontiguousarray(block).data)
        self.rows += len(block)

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


class CacheWriter:
    """Writes a prepared dataset into directory ``tmp`` (inside ``files.atomic_dir``): the encoder, ``dataset.json``, and
    one ``.npy`` per array (``split.<name>/<stem>.npy``, ``events.<seq>/<stem>.npy``), appended chunk by chunk.

    ``rows``: rows per split, ``events``: rows per event table, known before the first chunk (the arrays' shapes are in
    their headers). Chunks of a split (and of an event table) must come in order; splits may interleave."""

    def __init__(self, tmp: Path, name: str, encoder: Encoder, rows: dict[str, int], events: dict[str, int]):
        s = encoder.schema
        encoder.save(tmp)
        (tmp / "dataset.json").write_text(json.dumps({"name": name, "splits": sorted(rows), "version": CACHE_VERSION}))
        seqs = [q.name for q in s.sequences]
        split_shapes = {"label": (np.float32, ()), "cat": (np.int64, (len(s.categorical),)), "num": (np.float32, (len(s.numeric),)),
                        "group": (np.int64, ()), "time": (np.int64, ()), "row": (np.int64, ())}
        split_shapes.update({f"{k}.{q}": (np.int64, ()) for q in seqs for k in ("start", "end")})
        self.splits: dict[str, dict[str, NpyAppender]] = {}
        for split, n in rows.items():
            (tmp / f"split.{split}").mkdir()
            self.splits[split] = {k: NpyAppender(tmp / f"split.{split}" / f"{k}.npy", dt, (n, *rest)) for k, (dt, rest) in split_shapes.items()}
        self.events: dict[str, dict[str, NpyAppender]] = {}
        for q in s.sequences:
            (tmp / f"events.{q.name}").mkdir()
            m = events[q.name]
            self.events[q.name] = {k: NpyAppender(tmp / f"events.{q.name}" / f"{k}.npy", np.int64, (m, *rest))
                                   for k, rest in (("item", ()), ("event", ()), ("side", (len(q.side),)), ("time", ()))}

    def add_split(self, split: str, chunk: Split) -> None:
        for k, arr in split_arrays(chunk).items():
            self.splits[split][k].append(arr)

    def add_events(self, seq: str, chunk: Events) -> None:
        for k, arr in event_arrays(chunk).items():
            self.events[seq][k].append(arr)

    def close(self) -> None:
        for files in [*self.splits.values(), *self.events.values()]:
            for f in files.values():
                f.close()
        for files in self.events.values():
            _write_type_positions(files["event"].path)


def _write_type_positions(event_file: Path, rows: int = 1 << 22) -> None:
    """``type.<code>.npy`` beside ``event_file``: ``type_positions`` of its events, written a block at a time (one pass
    to count each type, one to write), so event windows need no O(events) index in RAM."""
    event = np.load(event_file, mmap_mode="r")
    counts = np.zeros(0, dtype=np.int64)
    for i in range(0, len(event), rows):
        c = np.bincount(np.asarray(event[i : i + rows]), minlength=len(counts))
        counts = np.pad(counts, (0, len(c) - len(counts))) + c
    out = {code: NpyAppender(event_file.with_name(f"type.{code}.npy"), np.int64, (int(counts[code]),))
           for code in range(2, len(counts)) if counts[code]}
    for i in range(0, len(event), rows):
        block = np.asarray(event[i : i + rows])
        for code, f in out.items():
            f.append(i + np.flatnonzero(block == code))
    for f in out.values():
        f.close()


def save_prepared(p: Prepared, directory: Path) -> None:
    """Write atomically: build in a temporary sibling directory, then rename into place."""

    def write(tmp: Path) -> None:
        w = CacheWriter(tmp, p.name, p.encoder(), {k: len(v) for k, v in p.splits.items()},
                        {k: len(e.item) for k, e in p.events.items()})
        for k, sp in p.splits.items():
            w.add_split(k, sp)
        for k, e in p.events.items():
            w.add_events(k, e)
        w.close()

    atomic_dir(directory, write)


def _open(path: Path, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    """A read-only memory map of ``path`` (a plain ndarray over it); its dtype and shape (None: any length) checked, a mismatch is a KunlunError."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise KunlunError(f"{path}: unreadable ({_reason(exc)}); the prepared-data cache was damaged") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        raise KunlunError(f"{path}: holds {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{shape}; the cache was damaged")
    return arr.view(np.ndarray)  # still the map, without np.memmap's Python-level indexing (~12 µs per gather)


def load_prepared(directory: Path) -> Prepared:
    """The cache in ``directory`` as a ``Prepared`` of read-only memory maps: nothing is read until a batch (or a
    statistic) touches it. A missing or inconsistent file is a KunlunError (the registry then rebuilds the cache)."""
    enc = Encoder.load(directory)
    path = directory / "dataset.json"
    try:
        meta = json.loads(path.read_text())
        names = [str(k) for k in meta["splits"]]
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"cache layout {meta.get('version')}, this kunlun reads {CACHE_VERSION}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KunlunError(f"{path}: unreadable ({_reason(exc)})") from None
    s = enc.schema
    splits = {}
    for split_name in names:
        d = directory / f"split.{split_name}"
        label = _open(d / "label.npy", np.float32, (None,))
        n = len(label)
        one = lambda k, d=d, n=n: _open(d / f"{k}.npy", np.int64, (n,))  # noqa: E731
        splits[split_name] = Split(
            label=label, cat=_open(d / "cat.npy", np.int64, (n, len(s.categorical))), num=_open(d / "num.npy", np.float32, (n, len(s.numeric))),
            group=one("group"), time=one("time"), row=one("row"),
            seq_start={q.name: one(f"start.{q.name}") for q in s.sequences},
            seq_end={q.name: one(f"end.{q.name}") for q in s.sequences},
        )
    events = {}
    for q in s.sequences:
        d = directory / f"events.{q.name}"
        item = _open(d / "item.npy", np.int64, (None,))
        m = len(item)
        types = {int(f.name.split(".")[1]): _open(f, np.int64, (None,)) for f in d.glob("type.*.npy")}
        events[q.name] = Events(item=item, event=_open(d / "event.npy", np.int64, (m,)), side=_open(d / "side.npy", np.int64, (m, len(q.side))),
                                time=_open(d / "time.npy", np.int64, (m,)), type_positions=dict(sorted(types.items())))
    return Prepared(str(meta["name"]), s, enc.vocabs, enc.num_mean, enc.num_std, enc.train_ctr, splits, events)
