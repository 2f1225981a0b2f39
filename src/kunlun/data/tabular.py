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
        event: click_types       # optional list, same length
        time: click_times        # optional list of unix seconds
        separator: "|"           # CSV only (default "|")

Column names are YAML strings (quote one that YAML would read as a number or boolean, e.g. "1" or "yes");
a column is one feature only. In a CSV, sequence columns are always read as text, so a history whose
cells each hold at most one item id is still a history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from kunlun.config import UniqueKeyLoader, yaml_problem
from kunlun.data.io import id_column, numeric_column, optional_label, read_table, show
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.errors import KunlunError

FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


def read_frappe_file(path: Path, labels: bool = True) -> tuple[RawSplit, bool]:
    t = read_table(path, required=(["label"] if labels else []) + FRAPPE_FIELDS, optional=["label"])
    label, has_labels = optional_label(t, "label", path, labels)
    cols = {"label": label}
    cols.update({f: id_column(t, f, path) for f in FRAPPE_FIELDS})
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


# ----------------------------------------------------------------------------- generic

SCHEMA_KEYS = ("name", "files", "label", "group", "time", "categorical", "numeric", "sequences")
SEQUENCE_KEYS = ("name", "item", "item_vocab", "event", "time", "separator")
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
    item: str
    item_vocab: str
    event: str | None = None
    time: str | None = None
    separator: str = "|"


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
                SequenceSpec(s.name, s.item_vocab, f"event_{s.name}" if s.event else None, (), s.time is not None) for s in self.sequences
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
            for key in ("name", "item", "item_vocab"):
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
            if f"event_{name}" in vocabs and s.get("event") is not None:
                raise self._fail(f"{where}: vocabulary name 'event_{name}' is taken by a categorical column; "
                                 "it is reserved for this sequence's event types")
            separator = s.get("separator", "|")
            if not isinstance(separator, str) or not separator:
                raise self._fail(f"key '{key}.separator' must be a non-empty string, got {separator!r}")
            out.append(SequenceColumns(
                name, self._column(s["item"], f"{key}.item"), vocab,
                self._column(s["event"], f"{key}.event") if s.get("event") is not None else None,
                self._column(s["time"], f"{key}.time") if s.get("time") is not None else None,
                separator,
            ))
        return out

    def _check_roles(self) -> None:
        """A column is one feature: listed once, and never also the label (group and time may be features too)."""
        roles = [(self.label, "the label")]
        roles += [(c, "categorical") for c, _ in self.categorical]
        roles += [(c, "numeric") for c in self.numeric]
        roles += [(getattr(s, k), f"{k} of sequence {s.name!r}") for s in self.sequences for k in ("item", "event", "time") if getattr(s, k)]
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
        cols += [getattr(s, k) for s in self.sequences for k in ("item", "event", "time") if getattr(s, k)]
        return list(dict.fromkeys(cols))

    def load(self, file: Path | None = None, labels: bool = True) -> RawData:
        targets = {"file": file} if file is not None else self.files
        has_labels = True
        splits: dict[str, RawSplit] = {}
        events: dict[str, dict[str, list]] = {s.name: {"item": [], "event": [], "time": []} for s in self.sequences}
        offset = {s.name: 0 for s in self.sequences}
        list_columns = [getattr(s, k) for s in self.sequences for k in ("item", "event", "time") if getattr(s, k)]
        for split_name, path in targets.items():
            t = read_table(path, required=self.columns(labels), optional=[self.label], text=list_columns)
            label, has_labels = optional_label(t, self.label, path, labels)
            cols = {self.label: label}
            cols.update({c: id_column(t, c, path) for c, _ in self.categorical})
            cols.update({c: numeric_column(t, c, path, float32=True) for c in self.numeric})
            if self.group and self.group not in cols:
                cols[self.group] = id_column(t, self.group, path)
            split = RawSplit(columns=cols, time=numeric_column(t, self.time, path, integer=True) if self.time else None)
            for s in self.sequences:
                items, lengths = _list_column(t, s.item, s.separator, path)
                ev = events[s.name]
                ev["item"].append(_list_ids(items, s.item, lengths, path))
                for key in ("event", "time"):
                    column = getattr(s, key)
                    if column:
                        vals, lens = _list_column(t, column, s.separator, path)
                        if not np.array_equal(lens, lengths):
                            row = int(np.flatnonzero(lens != lengths)[0])
                            raise KunlunError(f"{path}: column {column!r} must have as many entries per row as {s.item!r}; "
                                              f"data row {row + 1} has {lens[row]} and {lengths[row]}")
                        ev[key].append(_list_times(vals, column, lens, path) if key == "time" else _list_ids(vals, column, lens, path))
                ends = offset[s.name] + np.cumsum(lengths)
                split.seq_start[s.name] = ends - lengths
                split.seq_end[s.name] = ends
                offset[s.name] = int(ends[-1]) if len(ends) else offset[s.name]
            splits[split_name] = split
        raw_events = {
            name: {k: _concat(v) for k, v in ev.items() if v} for name, ev in events.items()
        }
        return RawData(self.schema, splits, raw_events, source=str(self.path), has_labels=has_labels)


def _reserved_by_torch(name: str) -> bool:
    """Whether PyTorch refuses ``name`` as a module name in a ModuleDict ('items', 'train', 'type', ...)."""
    from torch import nn  # only for schemas with sequences, which train a torch model anyway

    return hasattr(nn.ModuleDict(), name)


def _kind(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "text", type(None): "nothing", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _list_column(t: pa.Table, column: str, separator: str, path: Path) -> tuple[pa.Array, np.ndarray]:
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
        raise KunlunError(f"{path}: column {column!r} has a missing value inside its list at data row {row + 1}")
    return flat, lengths


def _row_of(position: int, lengths: np.ndarray) -> int:
    """The data row (1-based) holding flat list entry ``position``."""
    return int(np.searchsorted(np.cumsum(lengths), position, side="right")) + 1


ASCII_INT = re.compile(r"-?[0-9]{1,18}")


def _list_ids(flat: pa.Array, column: str, lengths: np.ndarray, path: Path) -> np.ndarray:
    """Ids of a list column: integers stay int64, text of ASCII integers becomes int64, other text stays str."""
    t = flat.type
    if pa.types.is_integer(t):
        return flat.to_numpy().astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(str)
        if len(values) and all(ASCII_INT.fullmatch(v) for v in np.unique(values)):
            return values.astype(np.int64)
        return values
    if pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        if pa.types.is_floating(t):
            bad = ~np.isfinite(flat.to_numpy(zero_copy_only=False))
            if bad.any():
                raise KunlunError(f"{path}: column {column!r} has a NaN/inf id at data row {_row_of(int(np.flatnonzero(bad)[0]), lengths)}")
        return np.asarray(flat.cast(pa.string()).to_numpy(zero_copy_only=False)).astype(str)
    raise KunlunError(f"{path}: column {column!r} must be a list of ids (text or integers), found entries of type {t}")


def _list_times(flat: pa.Array, column: str, lengths: np.ndarray, path: Path) -> np.ndarray:
    """Event times of a list column: integers (unix seconds)."""
    t = flat.type
    if pa.types.is_integer(t):
        return flat.to_numpy().astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(str)
        bad = [i for i, v in enumerate(values) if not ASCII_INT.fullmatch(v)][:1]
        if bad:
            raise KunlunError(f"{path}: column {column!r} must hold integer times, found {show(values[bad[0]])} "
                              f"at data row {_row_of(bad[0], lengths)}")
        return values.astype(np.int64)
    if pa.types.is_floating(t):
        values = flat.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) > 2**62))
        if len(bad):
            raise KunlunError(f"{path}: column {column!r} must hold integer times, found {values[bad[0]]} "
                              f"at data row {_row_of(int(bad[0]), lengths)}")
        return values.astype(np.int64)
    raise KunlunError(f"{path}: column {column!r} must be a list of integer times, found entries of type {t}")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Split pieces of one event column; ids read as integers in one file and as text in another become text."""
    kinds = {p.dtype.kind for p in parts if len(p)}
    if len(kinds) > 1:
        parts = [p.astype(str) for p in parts]
    return np.concatenate(parts)
