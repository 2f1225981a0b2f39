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
        separator: "|"           # CSV only
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from kunlun.data.io import id_column, numeric_column, optional_label, read_table
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.errors import KunlunError

FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


def read_frappe_file(path: Path, labels: bool = True) -> tuple[RawSplit, bool]:
    t = read_table(path, required=(["label"] if labels else []) + FRAPPE_FIELDS)
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


class SchemaFile:
    """A user's dataset described by a YAML schema file (see module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise KunlunError(f"{self.path}: schema file not found")
        try:
            spec = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise KunlunError(f"{self.path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(spec, dict):
            raise KunlunError(f"{self.path}: expected a mapping")
        for key in ("files", "label", "categorical"):
            if key not in spec:
                raise KunlunError(f"{self.path}: missing key {key!r}")
        allowed = {"name", "files", "label", "group", "time", "categorical", "numeric", "sequences"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise KunlunError(f"{self.path}: unknown key {unknown[0]!r}; allowed: {sorted(allowed)}")
        self.spec = spec
        self.name = str(spec.get("name", self.path.stem))
        files = spec["files"]
        if not isinstance(files, dict) or "train" not in files or "valid" not in files:
            raise KunlunError(f"{self.path}: key 'files' must map at least train and valid to file paths")
        self.files = {k: (self.path.parent / v) for k, v in files.items()}
        cat = spec["categorical"]
        self.categorical = [(c, c) for c in cat] if isinstance(cat, list) else [(c, v) for c, v in cat.items()]
        self.numeric = list(spec.get("numeric") or [])
        self.sequences = list(spec.get("sequences") or [])
        for s in self.sequences:
            for key in ("name", "item", "item_vocab"):
                if key not in s:
                    raise KunlunError(f"{self.path}: a sequence is missing key {key!r}")
        self.schema = Schema(
            label=spec["label"],
            categorical=tuple(self.categorical),
            numeric=tuple(self.numeric),
            sequences=tuple(
                SequenceSpec(s["name"], s["item_vocab"], "event_" + s["name"] if s.get("event") else None, (), bool(s.get("time")))
                for s in self.sequences
            ),
            group=spec.get("group"),
            has_time=bool(spec.get("time")),
        )

    def load(self, file: Path | None = None, labels: bool = True) -> RawData:
        targets = {"file": file} if file is not None else self.files
        has_labels = True
        splits: dict[str, RawSplit] = {}
        events: dict[str, dict[str, list]] = {s["name"]: {"item": [], "event": [], "time": []} for s in self.sequences}
        offset = {s["name"]: 0 for s in self.sequences}
        for split_name, path in targets.items():
            columns = ([self.spec["label"]] if labels else []) + [c for c, _ in self.categorical] + self.numeric
            columns += [c for c in (self.spec.get("group"), self.spec.get("time")) if c]
            columns += [s[k] for s in self.sequences for k in ("item", "event", "time") if s.get(k)]
            t = read_table(path, required=list(dict.fromkeys(columns)))
            label, has_labels = optional_label(t, self.spec["label"], path, labels)
            cols = {self.spec["label"]: label}
            cols.update({c: id_column(t, c, path) for c, _ in self.categorical})
            cols.update({c: numeric_column(t, c, path) for c in self.numeric})
            if self.spec.get("group"):
                cols[self.spec["group"]] = id_column(t, self.spec["group"], path)
            if self.spec.get("time"):
                cols["time"] = numeric_column(t, self.spec["time"], path, integer=True)
            split = RawSplit(columns=cols)
            for s in self.sequences:
                items, lengths = self._list_column(t, s["item"], s.get("separator"), path)
                ev = events[s["name"]]
                ev["item"].append(items)
                for key in ("event", "time"):
                    if s.get(key):
                        vals, lens = self._list_column(t, s[key], s.get("separator"), path)
                        if not np.array_equal(lens, lengths):
                            raise KunlunError(f"{path}: column {s[key]!r} must have as many entries per row as {s['item']!r}")
                        ev[key].append(vals.astype(np.int64) if key == "time" else vals)
                ends = offset[s["name"]] + np.cumsum(lengths)
                split.seq_start[s["name"]] = ends - lengths
                split.seq_end[s["name"]] = ends
                offset[s["name"]] = int(ends[-1]) if len(ends) else offset[s["name"]]
            splits[split_name] = split
        raw_events = {
            name: {k: np.concatenate(v) for k, v in ev.items() if v} for name, ev in events.items()
        }
        return RawData(self.schema, splits, raw_events, source=str(self.path), has_labels=has_labels)

    @staticmethod
    def _list_column(t: pa.Table, column: str, separator: str | None, path: Path) -> tuple[np.ndarray, np.ndarray]:
        arr = t.column(column).combine_chunks()
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            arr = pc.split_pattern(arr.fill_null(""), separator or "|")
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise KunlunError(f"{path}: column {column!r} must be a list (Parquet) or a separated string (CSV)")
        arr = arr.fill_null(pa.scalar([], arr.type))
        lengths = pc.list_value_length(arr).to_numpy().astype(np.int64)
        flat = pc.list_flatten(arr)
        if pa.types.is_string(flat.type):
            # CSV: "" splits to [""] — an empty history
            empty = pc.equal(flat, "").to_numpy(zero_copy_only=False)
            if empty.any():
                keep_rows = np.repeat(np.arange(len(lengths)), lengths)[~empty]
                lengths = np.bincount(keep_rows, minlength=len(lengths)).astype(np.int64)
                flat = flat.filter(pa.array(~empty))
            values = np.asarray(flat.to_numpy(zero_copy_only=False)).astype(str)
            as_int = np.char.isdigit(values)
            return (values.astype(np.int64) if as_int.all() and len(values) else values), lengths
        return flat.to_numpy(zero_copy_only=False), lengths
