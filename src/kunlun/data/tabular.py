"""Context-only (no sequence) datasets: Frappe_x1, and the generic schema-file adapter.

Generic schema file (YAML), paths relative to the schema file::

    name: my-clicks
    files: {train: train.parquet, valid: valid.parquet, test: test.parquet}   # test optional
    label: clicked
    group: user_id               # optional: groups impressions for gAUC
    time: ts                     # optional: request time (unix seconds)
    categorical: [user_id, item_id, city]          # or a mapping column -> shared vocabulary
    numeric: [price]
    sequences:                   # optional, each a list column (Parquet) or a separated string (CSV)
      - name: clicks
        item: clicked_items      # list of item ids
        item_vocab: item_id      # shares ids/embeddings with this categorical vocabulary
        event: click_types       # optional list, same length: several event types in one history
        time: click_times        # optional list of unix seconds
        side: {click_cats: category}   # optional per-event side features: list column -> vocabulary
                                 # (or a list of columns, each its own vocabulary)
        separator: "|"           # CSV only (default "|")
      - name: history            # or one list column per event type, merged in time order
        item_vocab: item_id
        types:                   # event type -> its item list and time list (times are required to merge)
          click: {item: clicked_items2, time: click_times2}
          like: {item: liked_items, time: like_times}

Column names are YAML strings (quote one that YAML would read as a number or boolean, e.g. "1" or "yes");
a column is one feature only. In a CSV, sequence columns are always read as text, so a history whose
cells each hold at most one item id is still a history. A sequence with ``types`` has events of each type
from its own columns, ordered by time (ties: in the order the types are listed, then list order); a row's
lists of one type (item, time, side) must have equal lengths, and every bad value is named by file, column
and data row.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from kunlun.config import UniqueKeyLoader, yaml_problem
from kunlun.data.io import TableChunks, id_column, numeric_column, optional_label, read_table, show
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.data.stream import Chunk
from kunlun.errors import KunlunError

FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


def read_frappe_file(path: Path, labels: bool = True) -> tuple[RawSplit, bool]:
    t = read_table(path, required=(["label"] if labels else []) + FRAPPE_FIELDS, optional=["label"])
    return frappe_block(t, path, labels)


def frappe_block(t: pa.Table, path: Path, labels: bool = True, first_row: int = 0) -> tuple[RawSplit, bool]:
    """``read_frappe_file`` of a table: a whole file, or a block of one (``first_row``: data rows before it)."""
    label, has_labels = optional_label(t, "label", path, labels, first_row)
    cols = {"label": label}
    cols.update({f: id_column(t, f, path, first_row) for f in FRAPPE_FIELDS})
    return RawSplit(columns=cols), has_labels


FRAPPE_SCHEMA = Schema(label="label", categorical=tuple((f, f) for f in FRAPPE_FIELDS), group="user")


FRAPPE_SPLITS = {"train": "train.csv", "valid": "valid.csv"}


def load_frappe(folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
    """BARS Frappe_x1: train on train.csv, early-stop and report on valid.csv — exactly these two files.

    A test.csv beside them is never read implicitly (it is held out, and the prepared-data cache key
    covers only the files read): score it with ``kunlun eval RUN --file test.csv``."""
    if file is not None:
        split, has_labels = read_frappe_file(file, labels)
        return RawData(FRAPPE_SCHEMA, {"file": split}, source=str(file), has_labels=has_labels)
    splits = {name: read_frappe_file(folder / f)[0] for name, f in FRAPPE_SPLITS.items()}
    return RawData(FRAPPE_SCHEMA, splits, source=str(folder))


class FrappeChunks:
    """``load_frappe(folder)`` as a ``kunlun.data.stream.ChunkSource``, ``rows`` rows of a file at a time."""

    def __init__(self, folder: Path, rows: int):
        self.schema, self.source = FRAPPE_SCHEMA, str(folder)
        self.files = {name: TableChunks(folder / f, required=["label", *FRAPPE_FIELDS], optional=["label"], rows=rows)
                      for name, f in FRAPPE_SPLITS.items()}

    def chunks(self) -> Iterator[Chunk]:
        for name, f in self.files.items():
            for first, t in f:
                yield Chunk({name: frappe_block(t, f.path, True, first)[0]}, {})


# ----------------------------------------------------------------------------- generic

SCHEMA_KEYS = ("name", "files", "label", "group", "time", "categorical", "numeric", "sequences")
SEQUENCE_KEYS = ("name", "item", "item_vocab", "event", "time", "side", "types", "separator")
TYPE_KEYS = ("item", "time")
EVENT_FIELDS = ("item", "event", "time")  # an event's own fields: a side feature may not take one of these names
# split and sequence names: they name cache files, and sequence names name model modules (which refuse a '.')
SAFE_NAME = re.compile(r"[^./\\\x00]+")


def read_schema_yaml(path: Path) -> Any:
    if not path.is_file():
        raise KunlunError(f"{path}: schema file not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise KunlunError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise KunlunError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise KunlunError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    except RecursionError:
        raise KunlunError(f"{path}: not valid YAML (nested too deeply)") from None


@dataclass(frozen=True)
class SequenceColumns:
    """One ``sequences:`` entry of a schema file: which list columns hold a behaviour sequence."""

    name: str
    item: str | None  # None with ``types``
    item_vocab: str
    event: str | None = None
    time: str | None = None
    separator: str = "|"
    side: tuple[tuple[str, str], ...] = ()  # (list column, vocabulary)
    types: tuple[tuple[str, str, str], ...] = ()  # (event type, item list column, time list column)

    @property
    def list_columns(self) -> list[str]:
        cols = [c for c in (self.item, self.event, self.time) if c] + [c for c, _ in self.side]
        return cols + [c for _, item, time in self.types for c in (item, time)]

    @property
    def has_events(self) -> bool:
        return self.event is not None or bool(self.types)


class SchemaFile:
    """A user's dataset described by a YAML schema file (see module docstring).

    Everything is checked when the file is read — key names and types, duplicated features, vocabularies
    that sequences name — so that a mistake is one error naming the key, not a failure during training."""

    def __init__(self, path: Path):
        self.path = Path(path)
        spec = read_schema_yaml(self.path)
        if not isinstance(spec, dict):
            raise KunlunError(f"{self.path}: expected a mapping of keys ({', '.join(SCHEMA_KEYS)}), found {_kind(spec)}")
        odd = [k for k in spec if not isinstance(k, str) or k not in SCHEMA_KEYS]
        if odd:
            raise KunlunError(f"{self.path}: unknown key {odd[0]!r}; allowed: {list(SCHEMA_KEYS)}")
        for key in ("files", "label", "categorical"):
            if key not in spec:
                raise KunlunError(f"{self.path}: missing key {key!r}")
        self.name = self._dataset_name(spec.get("name", self.path.stem))
        self.files = self._files(spec["files"])
        self.label = self._column(spec["label"], "label")
        self.group = self._column(spec["group"], "group") if spec.get("group") is not None else None
        self.time = self._column(spec["time"], "time") if spec.get("time") is not None else None
        self.categorical = self._categorical(spec["categorical"])
        self.numeric = self._columns(spec.get("numeric") or [], "numeric")
        self.sequences = self._sequences(spec.get("sequences") or [])
        self._check_roles()
        self.schema = Schema(
            label=self.label,
            categorical=tuple(self.categorical),
            numeric=tuple(self.numeric),
            sequences=tuple(
                SequenceSpec(s.name, s.item_vocab, f"event_{s.name}" if s.has_events else None, s.side,
                             s.time is not None or bool(s.types))
                for s in self.sequences
            ),
            group=self.group,
            has_time=self.time is not None,
        )

    # --- checking the YAML ---
    def _fail(self, message: str) -> KunlunError:
        return KunlunError(f"{self.path}: {message}")

    def _dataset_name(self, name: Any) -> str:
        if isinstance(name, (int, float)) and not isinstance(name, bool):
            name = str(name)
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise self._fail(f"key 'name' must be a dataset name without / or \\, got {name!r}")
        return name

    def _files(self, files: Any) -> dict[str, Path]:
        if not isinstance(files, dict) or "train" not in files or "valid" not in files:
            raise self._fail("key 'files' must map at least train and valid to file paths, "
                             "e.g. files: {train: train.csv, valid: valid.csv}")
        out = {}
        for split, f in files.items():
            if not isinstance(split, str) or not SAFE_NAME.fullmatch(split):
                raise self._fail(f"key 'files': split name {split!r} must be a name without '.', '/' or '\\'")
            if not isinstance(f, str) or not f.strip():
                raise self._fail(f"key 'files.{split}' must be a file path, got {f!r}")
            out[split] = self.path.parent / f
        return out

    def _column(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            hint = " (quote a column name that YAML reads as a number, boolean or date)" if isinstance(value, (int, float, bool, date)) else ""
            raise self._fail(f"key {key!r} must be a column name, got {_kind(value)} {value!r}{hint}")
        return value

    def _columns(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list):
            raise self._fail(f"key {key!r} must be a list of column names, e.g. {key}: [a, b]; got {_kind(value)} {value!r}")
        return [self._column(v, f"{key}[{i}]") for i, v in enumerate(value)]

    def _categorical(self, value: Any) -> list[tuple[str, str]]:
        if isinstance(value, dict):
            pairs = [(self._column(c, "categorical"), self._column(v, f"categorical.{c}")) for c, v in value.items()]
        elif isinstance(value, list):
            pairs = [(c, c) for c in self._columns(value, "categorical")]
        else:
            raise self._fail(f"key 'categorical' must be a list of column names, or a mapping column -> vocabulary; "
                             f"got {_kind(value)} {value!r}")
        if not pairs:
            raise self._fail("key 'categorical' must name at least one column")
        return pairs

    def _sequences(self, value: Any) -> list[SequenceColumns]:
        if not isinstance(value, list):
            raise self._fail(f"key 'sequences' must be a list of mappings (name, item, item_vocab, ...), got {_kind(value)}")
        vocabs = list(dict.fromkeys(v for _, v in self.categorical))
        out = []
        for i, s in enumerate(value):
            where = f"sequences[{i}]"
            if not isinstance(s, dict):
                raise self._fail(f"{where} must be a mapping with keys name, item, item_vocab, got {_kind(s)} {s!r}")
            odd = [k for k in s if k not in SEQUENCE_KEYS]
            if odd:
                raise self._fail(f"{where}: unknown key {odd[0]!r}; allowed: {list(SEQUENCE_KEYS)}")
            for key in ("name", "item_vocab") if "types" in s else ("name", "item", "item_vocab"):
                if key not in s:
                    raise self._fail(f"{where}: a sequence is missing key {key!r}")
            name = s["name"]
            if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
                raise self._fail(f"{where}: key 'name' must be a name without '.', '/' or '\\', got {name!r}")
            if _reserved_by_torch(name):
                raise self._fail(f"{where}: sequence name {name!r} is taken: the models name a module after each sequence, "
                                 f"and PyTorch modules have an attribute {name!r}; choose another name")
            if any(q.name == name for q in out):
                raise self._fail(f"{where}: sequence name {name!r} is used twice")
            key = f"sequences[{i}]"  # for keys: sequences[0].item
            where = f"sequence {name!r}"
            vocab = self._column(s["item_vocab"], f"{key}.item_vocab")
            if vocab not in vocabs:
                raise self._fail(f"{where}: item_vocab {vocab!r} is not the vocabulary of any categorical column; "
                                 f"vocabularies: {vocabs}")
            types = self._types(s["types"], key, where, s) if "types" in s else ()
            side = self._side(s.get("side"), key, where)
            if f"event_{name}" in vocabs + [v for _, v in side] and (s.get("event") is not None or types):
                raise self._fail(f"{where}: vocabulary name 'event_{name}' is taken by a categorical column; "
                                 "it is reserved for this sequence's event types")
            separator = s.get("separator", "|")
            if not isinstance(separator, str) or not separator:
                raise self._fail(f"key '{key}.separator' must be a non-empty string, got {separator!r}")
            out.append(SequenceColumns(
                name, self._column(s["item"], f"{key}.item") if not types else None, vocab,
                self._column(s["event"], f"{key}.event") if s.get("event") is not None else None,
                self._column(s["time"], f"{key}.time") if s.get("time") is not None else None,
                separator, side, types,
            ))
        return out

    def _side(self, value: Any, key: str, where: str) -> tuple[tuple[str, str], ...]:
        """``side``: a list of list columns (each its own vocabulary) or a mapping list column -> vocabulary."""
        if value is None:
            return ()
        if isinstance(value, dict):
            pairs = [(self._column(c, f"{key}.side"), self._column(v, f"{key}.side.{c}")) for c, v in value.items()]
        elif isinstance(value, list):
            pairs = [(c, c) for c in self._columns(value, f"{key}.side")]
        else:
            raise self._fail(f"key '{key}.side' must be a list of list columns, or a mapping list column -> vocabulary; "
                             f"got {_kind(value)} {value!r}")
        for column, _ in pairs:
            if column in EVENT_FIELDS:  # a side feature is a field of each event, beside these
                raise self._fail(f"{where}: side column {column!r} has the name of an event's own field "
                                 f"({', '.join(EVENT_FIELDS)}); rename the column")
        return tuple(pairs)

    def _types(self, value: Any, key: str, where: str, seq: dict) -> tuple[tuple[str, str, str], ...]:
        """``types``: event type -> {item: list column, time: list column}, instead of item/event/time/side."""
        taken = [k for k in ("item", "event", "time", "side") if seq.get(k) is not None]
        if taken:
            raise self._fail(f"{where}: key {taken[0]!r} and key 'types' exclude each other (with types, each type "
                             "names its own item and time columns)")
        if not isinstance(value, dict) or not value:
            raise self._fail(f"key '{key}.types' must map event types to {{item: list column, time: list column}}, "
                             f"got {_kind(value)} {value!r}")
        out = []
        for t, cols in value.items():
            if isinstance(t, bool) or not isinstance(t, (str, int)):
                raise self._fail(f"key '{key}.types': event type {t!r} must be a name")
            if not isinstance(cols, dict) or set(cols) - set(TYPE_KEYS) or "item" not in cols:
                raise self._fail(f"key '{key}.types.{t}' must be a mapping with keys item and time, got {_kind(cols)} {cols!r}")
            if "time" not in cols:
                raise self._fail(f"{where}: event type {str(t)!r} needs a time list column (key '{key}.types.{t}.time'), "
                                 "to merge the types' events in time order")
            out.append((str(t), self._column(cols["item"], f"{key}.types.{t}.item"), self._column(cols["time"], f"{key}.types.{t}.time")))
        return tuple(out)

    def _check_roles(self) -> None:
        """A column is one feature: listed once, and never also the label (group and time may be features too)."""
        roles = [(self.label, "the label")]
        roles += [(c, "categorical") for c, _ in self.categorical]
        roles += [(c, "numeric") for c in self.numeric]
        roles += [(getattr(s, k), f"{k} of sequence {s.name!r}") for s in self.sequences for k in ("item", "event", "time") if getattr(s, k)]
        roles += [(c, f"side feature of sequence {s.name!r}") for s in self.sequences for c, _ in s.side]
        roles += [(c, f"{k} of event type {t!r} of sequence {s.name!r}") for s in self.sequences for t, item, time in s.types
                  for k, c in (("item", item), ("time", time))]
        seen: dict[str, str] = {}
        for column, role in roles:
            if column in seen:
                also = "listed twice in " + role if seen[column] == role else f"listed as {seen[column]} and as {role}"
                raise self._fail(f"feature {column!r} is {also}; a column can be one feature only")
            seen[column] = role
        for column, key in ((self.group, "group"), (self.time, "time")):
            if column is not None and column == self.label:
                raise self._fail(f"key {key!r}: {column!r} is the label column")

    # --- reading the data ---
    def columns(self, labels: bool = True) -> list[str]:
        """Every column the files must have (the label only when ``labels``)."""
        cols = ([self.label] if labels else []) + [c for c, _ in self.categorical] + self.numeric
        cols += [c for c in (self.group, self.time) if c]
        cols += [c for s in self.sequences for c in s.list_columns]
        return list(dict.fromkeys(cols))

    def load(self, file: Path | None = None, labels: bool = True) -> RawData:
        targets = {"file": file} if file is not None else self.files
        has_labels = True
        splits: dict[str, RawSplit] = {}
        events: dict[str, dict[str, list]] = {s.name: {} for s in self.sequences}
        offset = {s.name: 0 for s in self.sequences}
        list_columns = [c for s in self.sequences for c in s.list_columns]
        for split_name, path in targets.items():
            t = read_table(path, required=self.columns(labels), optional=[self.label], text=list_columns)
            split, ev, has_labels = self.read_block(t, path, labels)
            for s in self.sequences:
                split.seq_start[s.name] += offset[s.name]
                split.seq_end[s.name] += offset[s.name]
                offset[s.name] += len(ev[s.name]["item"])
                for k, v in ev[s.name].items():
                    events[s.name].setdefault(k, []).append(v)
            splits[split_name] = split
        raw_events = {name: {k: _concat(v) for k, v in ev.items()} for name, ev in events.items()}
        return RawData(self.schema, splits, raw_events, source=str(self.path), has_labels=has_labels)

    def read_block(self, t: pa.Table, path: Path, labels: bool = True, first_row: int = 0,
                   ints: dict[str, bool] | None = None) -> tuple[RawSplit, dict[str, dict[str, np.ndarray]], bool]:
        """The rows of ``t`` (a whole file, or a block of one starting at data row ``first_row + 1``) as a split whose
        history ranges index its own events (from 0), those events (sequence → item, event, time and side columns that
        the sequence has), and whether the label was there. ``ints``: list column → whether its ids become integers,
        when decided for the whole file (``SchemaChunks``); by default each column's values decide (``_list_ids``)."""
        label, has_labels = optional_label(t, self.label, path, labels, first_row)
        cols = {self.label: label}
        cols.update({c: id_column(t, c, path, first_row) for c, _ in self.categorical})
        cols.update({c: numeric_column(t, c, path, float32=True, first_row=first_row) for c in self.numeric})
        if self.group and self.group not in cols:
            cols[self.group] = id_column(t, self.group, path, first_row)
        time = numeric_column(t, self.time, path, integer=True, first_row=first_row) if self.time else None
        split = RawSplit(columns=cols, time=time)
        ints = ints or {}
        events: dict[str, dict[str, np.ndarray]] = {}
        for s in self.sequences:
            ev: dict[str, np.ndarray] = {}
            if s.types:
                lengths = _merge_types(t, s, path, ev, first_row, ints)
            else:
                items, lengths = _list_column(t, s.item, s.separator, path, first_row)
                ev["item"] = _list_ids(items, s.item, lengths, path, first_row, ints.get(s.item))
                for key, column in [("event", s.event), ("time", s.time), *[(c, c) for c, _ in s.side]]:
                    if column:
                        vals = _aligned(t, column, s.separator, path, s.item, lengths, first_row)
                        ev[key] = (_list_times(vals, column, lengths, path, first_row) if key == "time"
                                   else _list_ids(vals, column, lengths, path, first_row, ints.get(column)))
            ends = np.cumsum(lengths)
            split.seq_start[s.name], split.seq_end[s.name] = ends - lengths, ends
            events[s.name] = ev
        return split, events, has_labels

    def id_lists(self) -> dict[tuple[str, str], list[str]]:
        """(sequence, event key) → the list columns whose ids make up that key's event column (``_list_ids`` reads them)."""
        out: dict[tuple[str, str], list[str]] = {}
        for s in self.sequences:
            if s.types:
                out[s.name, "item"] = [item for _, item, _ in s.types]
                continue
            out[s.name, "item"] = [s.item]
            if s.event:
                out[s.name, "event"] = [s.event]
            for c, _ in s.side:
                out[s.name, c] = [c]
        return out


class SchemaChunks:
    """The data set of ``SchemaFile(path).load()`` as a ``kunlun.data.stream.ChunkSource``: each split's file read
    ``rows`` data rows at a time (``TableChunks``: Parquet row groups or CSV blocks, with the whole file's column types).

    What ``load`` decides from whole columns is decided first, in a scan of the files: whether a list column's text ids
    are all integers (``_list_ids``: then they become int64), and per event column whether any file gives text (then
    every file's ids are text, as ``_concat`` makes them). The scan reads only files with text list columns (every CSV
    with sequences; Parquet with string lists). Memory: one block, and per file its column types."""

    def __init__(self, sf: SchemaFile, rows: int):
        self.sf, self.schema, self.source = sf, sf.schema, str(sf.path)
        text = [c for s in sf.sequences for c in s.list_columns]
        self.files = {split: TableChunks(path, required=sf.columns(True), optional=[sf.label], text=text, rows=rows)
                      for split, path in sf.files.items()}
        self.ints = {split: self._scan_ids(f) for split, f in self.files.items()}
        # an event column is text when any file's ids for it are (as np.concatenate makes them in load)
        self.text_keys = {key for key, cols in sf.id_lists().items() for ints in self.ints.values() if not all(ints[c] for c in cols)}
        self.text_keys |= {(s.name, "event") for s in sf.sequences if s.types}

    def _scan_ids(self, f: TableChunks) -> dict[str, bool]:
        """List column → whether ``_list_ids`` makes the whole file's ids integers: integer lists always, text lists when
        the file has ids and every one is an ASCII integer (so a text list column is read to the end while that holds)."""
        separator = {c: s.separator for s in self.sf.sequences for c in s.list_columns}
        undecided = [c for cols in self.sf.id_lists().values() for c in cols]
        ints: dict[str, bool] = {}
        has_ids = dict.fromkeys(undecided, False)
        for first, t in f if undecided else ():
            for c in list(undecided):
                flat, _ = _list_column(t, c, separator[c], f.path, first)
                if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
                    values = np.unique(np.asarray(flat.to_numpy(zero_copy_only=False)).astype(str))
                    has_ids[c] |= len(values) > 0
                    if _all_ascii_ints(values):
                        continue
                    ints[c] = False
                else:
                    ints[c] = pa.types.is_integer(flat.type)
                undecided.remove(c)
            if not undecided:
                break
        return ints | {c: has_ids[c] for c in undecided}

    def chunks(self) -> Iterator[Chunk]:
        offset = {s.name: 0 for s in self.sf.sequences}
        for split_name, f in self.files.items():
            for first, t in f:
                split, ev, _ = self.sf.read_block(t, f.path, True, first, self.ints[split_name])
                for s in self.sf.sequences:
                    split.seq_start[s.name] += offset[s.name]
                    split.seq_end[s.name] += offset[s.name]
                    offset[s.name] += len(ev[s.name]["item"])
                    for k, v in ev[s.name].items():
                        if (s.name, k) in self.text_keys and v.dtype.kind != "U":
                            ev[s.name][k] = v.astype(str)
                yield Chunk({split_name: split}, ev)


def _aligned(t: pa.Table, column: str, separator: str, path: Path, item: str, lengths: np.ndarray, first_row: int = 0) -> pa.Array:
    """The flat values of list column ``column``, which must have ``lengths`` entries per row like ``item``."""
    vals, lens = _list_column(t, column, separator, path, first_row)
    if not np.array_equal(lens, lengths):
        row = int(np.flatnonzero(lens != lengths)[0])
        raise KunlunError(f"{path}: column {column!r} must have as many entries per row as {item!r}; "
                          f"data row {first_row + row + 1} has {lens[row]} and {lengths[row]}")
    return vals


def _merge_types(t: pa.Table, s: SequenceColumns, path: Path, ev: dict[str, np.ndarray], first_row: int = 0,
                 ints: dict[str, bool] | None = None) -> np.ndarray:
    """One list column per event type → one history per row, its events in time order (ties: types in the order
    listed, then list order); sets item, event (the type's name) and time in ``ev``; returns entries per row."""
    n = t.num_rows
    items, times, kinds, rows, lengths = [], [], [], [], np.zeros(n, dtype=np.int64)
    for k, (_, item_col, time_col) in enumerate(s.types):
        flat, lens = _list_column(t, item_col, s.separator, path, first_row)
        items.append(_list_ids(flat, item_col, lens, path, first_row, (ints or {}).get(item_col)))
        times.append(_list_times(_aligned(t, time_col, s.separator, path, item_col, lens, first_row), time_col, lens, path, first_row))
        kinds.append(np.full(len(items[-1]), k))
        rows.append(np.repeat(np.arange(n), lens))
        lengths += lens
    row, time, kind = np.concatenate(rows), np.concatenate(times), np.concatenate(kinds)
    order = np.lexsort((np.arange(len(row)), kind, time, row))  # by row, then time, then type, then list position
    names = np.asarray([name for name, _, _ in s.types])
    ev["item"] = _concat(items)[order]
    ev["event"] = names[kind[order]]
    ev["time"] = time[order]
    return lengths


def _reserved_by_torch(name: str) -> bool:
    """Whether PyTorch refuses ``name`` as a module name in a ModuleDict ('items', 'train', 'type', ...)."""
    from torch import nn  # only for schemas with sequences, which train a torch model anyway

    return hasattr(nn.ModuleDict(), name)


def _kind(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "text", type(None): "nothing", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _list_column(t: pa.Table, column: str, separator: str, path: Path, first_row: int = 0) -> tuple[pa.Array, np.ndarray]:
    """A list column (Parquet list, or separated text) → (flat values, entries per row)."""
    arr = t.column(column).combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = pc.split_pattern(arr.fill_null(""), separator)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise KunlunError(f"{path}: column {column!r} must be a list (Parquet) or a separated string (CSV), found {arr.type}")
    arr = arr.fill_null(pa.scalar([], arr.type))
    lengths = pc.list_value_length(arr).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr)
    if pa.types.is_dictionary(flat.type):
        flat = flat.cast(flat.type.value_type)
    if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
        # CSV: "" splits to [""] — an empty history
        empty = pc.equal(flat, "").fill_null(False).to_numpy(zero_copy_only=False)
        if empty.any():
            keep_rows = np.repeat(np.arange(len(lengths)), lengths)[~empty]
            lengths = np.bincount(keep_rows, minlength=len(lengths)).astype(np.int64)
            flat = flat.filter(pa.array(~empty))
    if flat.null_count:
        row = int(np.repeat(np.arange(len(lengths)), lengths)[np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]])
        raise KunlunError(f"{path}: column {column!r} has a missing value inside its list at data row {first_row + row + 1}")
    return flat, lengths


def _row_of(position: int, lengths: np.ndarray) -> int:
    """The data row (1-based) holding flat list entry ``position``."""
    return int(np.searchsorted(np.cumsum(lengths), position, side="right")) + 1


ASCII_INT = re.compile(r"-?[0-9]{1,18}")


def _all_ascii_ints(values: np.ndarray) -> bool:
    return all(ASCII_INT.fullmatch(v) for v in values)


def _list_ids(flat: pa.Array, column: str, lengths: np.ndarray, path: Path, first_row: int = 0, as_int: bool | None = None) -> np.ndarray:
    """Ids of a list column: integers stay int64, text of ASCII integers becomes int64 (when all of them are: the
    values decide, or ``as_int`` where the whole file decided), other text stays str."""
    t = flat.type
    if pa.types.is_integer(t):
        return flat.to_numpy().astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(str)
        if as_int if as_int is not None else len(values) and _all_ascii_ints(np.unique(values)):
            return values.astype(np.int64)
        return values
    if pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        if pa.types.is_floating(t):
            bad = ~np.isfinite(flat.to_numpy(zero_copy_only=False))
            if bad.any():
                row = first_row + _row_of(int(np.flatnonzero(bad)[0]), lengths)
                raise KunlunError(f"{path}: column {column!r} has a NaN/inf id at data row {row}")
        return np.asarray(flat.cast(pa.string()).to_numpy(zero_copy_only=False)).astype(str)
    raise KunlunError(f"{path}: column {column!r} must be a list of ids (text or integers), found entries of type {t}")


def _list_times(flat: pa.Array, column: str, lengths: np.ndarray, path: Path, first_row: int = 0) -> np.ndarray:
    """Event times of a list column: integers (unix seconds)."""
    t = flat.type
    if pa.types.is_integer(t):
        return flat.to_numpy().astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(str)
        bad = [i for i, v in enumerate(values) if not ASCII_INT.fullmatch(v)][:1]
        if bad:
            raise KunlunError(f"{path}: column {column!r} must hold integer times, found {show(str(values[bad[0]]))} "
                              f"at data row {first_row + _row_of(bad[0], lengths)}")
        return values.astype(np.int64)
    if pa.types.is_floating(t):
        values = flat.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > 2**62))
        if len(bad):
            raise KunlunError(f"{path}: column {column!r} must hold integer times, found {values[bad[0]]} "
                              f"at data row {first_row + _row_of(int(bad[0]), lengths)}")
        return values.astype(np.int64)
    raise KunlunError(f"{path}: column {column!r} must be a list of integer times, found entries of type {t}")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Split pieces of one event column; ids read as integers in one file and as text in another become text."""
    kinds = {p.dtype.kind for p in parts if len(p)}
    if len(kinds) > 1:
        parts = [p.astype(str) for p in parts]
    return np.concatenate(parts)
