"""Public benchmarks users download themselves: Criteo (Kaggle Display Advertising) and Taobao UserBehavior.

Each adapter reads the files exactly as published (put them in ``<data-dir>/<name>/``); errors are one line
naming the file, column and line (``kunlun.data.io``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kunlun.data.io import id_column, label_column, numeric_column, read_table, require_file
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.errors import KunlunError

# ----------------------------------------------------------------------------- Criteo

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL]
CRITEO_FILES = ("train.txt",)
CRITEO_SEED = 2018  # the fixed seed of the 8:1:1 random split
CRITEO_SCHEMA = Schema(label="label", categorical=tuple((c, c) for c in CRITEO_CATEGORICAL), numeric=tuple(CRITEO_NUMERIC))
MISSING = "__missing__"  # an empty categorical cell: its own id


def _first_line(path: Path) -> str:
    with open(require_file(path), "rb") as f:
        return f.readline().decode("utf8", "replace")


def read_criteo_file(path: Path, labels: bool = True) -> tuple[RawSplit, bool]:
    """One Criteo file as a split. Two layouts: Kaggle's ``train.txt`` (no header, tab-separated: label, I1-I13,
    C1-C26; ``test.txt`` lacks the label) and DeepCTR's ``criteo_sample.txt`` (comma-separated, header
    ``label,I1..I13,C1..C26``). Empty cells are missing values.

    Numeric I1-I13: ``sign(v) * log(1 + |v|)``, missing → 0 (I2 can be negative; the log tames the heavy tails the
    usual CTR protocol transforms too); the encoder then standardises them. Categorical C1-C26: the hashed value as
    text, missing → its own id ``__missing__``."""
    head = _first_line(path)
    if head.startswith("label,"):
        t = read_table(path, required=CRITEO_COLUMNS, text=CRITEO_CATEGORICAL)
    else:
        fields = head.rstrip("\r\n").count("\t") + 1
        has_label = fields == len(CRITEO_COLUMNS)
        if not has_label and (labels or fields != len(CRITEO_COLUMNS) - 1):
            raise KunlunError(f"{path}: line 1 has {fields} tab-separated fields, expected {len(CRITEO_COLUMNS)} "
                              "(label, I1-I13, C1-C26)" + ("" if labels else " or 39 without the label"))
        names = CRITEO_COLUMNS if has_label else CRITEO_COLUMNS[1:]
        t = read_table(path, names=names, delimiter="\t", text=CRITEO_CATEGORICAL)
    has_labels = "label" in t.column_names
    cols: dict[str, np.ndarray] = {
        "label": label_column(t, "label", path) if has_labels else np.zeros(t.num_rows, dtype=np.float32)
    }
    for c in CRITEO_NUMERIC:
        arr = t.column(c)
        if pa.types.is_null(arr.type):  # a column empty on every row
            cols[c] = np.zeros(t.num_rows)
            continue
        if pa.types.is_string(arr.type):  # a cell that is not a number: numeric_column names it
            filled = pc.if_else(pc.equal(arr, ""), "0", arr).fill_null("0")
        else:
            filled = arr.fill_null(0)
        v = numeric_column(t.set_column(t.column_names.index(c), c, filled), c, path)
        cols[c] = np.sign(v) * np.log1p(np.abs(v))
    for c in CRITEO_CATEGORICAL:
        arr = pc.if_else(pc.equal(t.column(c), ""), None, t.column(c)).fill_null(MISSING)
        cols[c] = id_column(pa.table({c: arr}), c, path)
    return RawSplit(columns=cols), has_labels


def criteo_split(n: int, seed: int = CRITEO_SEED) -> np.ndarray:
    """0 / 1 / 2 (train / valid / test) per row: a random 8:1:1 split, the same for every run."""
    perm = np.random.default_rng(seed).permutation(n)
    assign = np.empty(n, dtype=np.int64)
    a, b = int(round(0.8 * n)), int(round(0.9 * n))
    assign[perm[:a]], assign[perm[a:b]], assign[perm[b:]] = 0, 1, 2
    return assign


def _take(split: RawSplit, mask: np.ndarray) -> RawSplit:
    rows = np.flatnonzero(mask)
    return RawSplit(columns={c: v[rows] for c, v in split.columns.items()}, row=rows)


def load_criteo(folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
    """Criteo (Kaggle Display Advertising Challenge), CTR with 13 numeric and 26 categorical fields, no sequences.

    Download (Criteo's release; accept the licence on the page first)::

        mkdir -p <data-dir>/criteo && cd <data-dir>/criteo
        curl -LO https://go.criteo.net/criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz
        tar xzf criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz train.txt

    Only ``train.txt`` (45,840,617 labelled rows) is read; it is split 8:1:1 at random with the fixed seed 2018
    (``criteo_split``), the protocol of BARS Criteo_x1 (whose exact rows differ: it shuffles differently).
    DeepCTR's ``criteo_sample.txt`` (header row, commas) is read the same way when saved as ``train.txt``."""
    if file is not None:
        split, has_labels = read_criteo_file(file, labels)
        return RawData(CRITEO_SCHEMA, {"file": split}, source=str(file), has_labels=has_labels)
    path = folder / CRITEO_FILES[0]
    split, has_labels = read_criteo_file(path, labels=True)
    assign = criteo_split(len(split))
    splits = {name: _take(split, assign == k) for k, name in enumerate(("train", "valid", "test"))}
    return RawData(CRITEO_SCHEMA, splits, source=str(path))


# ----------------------------------------------------------------------------- Taobao UserBehavior

TAOBAO_UB_FILES = ("UserBehavior.csv",)
BEHAVIORS = ("pv", "cart", "fav", "buy")
UB_SPLIT = (0.8, 0.9)  # cumulative, per user, chronological (as MovieLens)


def read_user_behavior(path: Path) -> dict[str, np.ndarray]:
    t = read_table(path, names=["user", "item", "category", "behavior", "ts"], text=["behavior"])
    out = {c: numeric_column(t, c, path, integer=True) for c in ("user", "item", "category", "ts")}
    behavior = np.asarray(pc.utf8_trim_whitespace(t.column("behavior")).to_numpy(zero_copy_only=False)).astype(str)
    bad = ~np.isin(behavior, BEHAVIORS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KunlunError(f"{path}: column 'behavior_type' (4th field) must be one of {'/'.join(BEHAVIORS)}, "
                          f"found {str(behavior[row])!r} on line {row + 1}")
    out["behavior"] = behavior
    return out


def load_user_behavior(folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
    """Taobao UserBehavior (Tianchi dataset 649: 100 M events of ~1 M users, 2017-11-25 to 12-03).

    Download (Tianchi account needed)::

        # https://tianchi.aliyun.com/dataset/649 → UserBehavior.csv.zip
        mkdir -p <data-dir>/taobao-userbehavior && unzip UserBehavior.csv.zip -d <data-dir>/taobao-userbehavior

    Protocol (ours; the data set has no official CTR task): one example per event; label = the event is a deeper
    engagement (cart, fav or buy) rather than a page view (pv) — "given that the user touches this item now, do
    they act on it". History = the user's events strictly earlier in time (same-second events excluded, so an
    example never sees its own or a simultaneous event), each with its item, type (pv/cart/fav/buy), category and
    time. Fields: user, item, category, hour and weekday (UTC+8, Beijing time) of the event; numeric: log history
    length, log hours since the previous event. Split per user chronologically: the first 80 % of each user's
    events train, the next 10 % valid, the last 10 % test. ``file``: one file in the same layout, scored whole."""
    path = file or folder / TAOBAO_UB_FILES[0]
    ev = read_user_behavior(path)
    n = len(ev["user"])
    order = np.lexsort((np.arange(n), ev["ts"], ev["user"]))
    user, item, cat, ts, beh = (ev[c][order] for c in ("user", "item", "category", "ts", "behavior"))
    label = (beh != "pv").astype(np.float32)
    idx = np.arange(n)
    new_user = np.r_[True, user[1:] != user[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    user_count = np.diff(np.r_[np.flatnonzero(new_user), n])[np.cumsum(new_user) - 1]
    new_moment = new_user | np.r_[True, ts[1:] != ts[:-1]]
    hist_end = np.maximum.accumulate(np.where(new_moment, idx, 0))
    hist_len = hist_end - user_start
    prev_ts = np.where(hist_len > 0, ts[np.maximum(hist_end - 1, 0)], ts)
    local = ts + 8 * 3600
    columns = {
        "label": label, "user": user, "item": item, "category": cat,
        "hour": (local // 3600) % 24, "weekday": (local // 86400) % 7,
        "log_history": np.log1p(hist_len).astype(np.float64),
        "log_gap_hours": np.log1p(np.maximum(ts - prev_ts, 0) / 3600.0),
    }
    schema = Schema(
        label="label",
        categorical=tuple((c, c) for c in ("user", "item", "category", "hour", "weekday")),
        numeric=("log_history", "log_gap_hours"),
        sequences=(SequenceSpec("history", item_vocab="item", event_vocab="behavior", side=(("category", "category"),)),),
        group="user",
        has_time=True,
    )
    events = {"history": {"item": item, "event": beh, "category": cat, "time": ts}}
    if file is None:
        frac = (idx - user_start) / user_count
        assign = np.where(frac < UB_SPLIT[0], 0, np.where(frac < UB_SPLIT[1], 1, 2))
        names = ["train", "valid", "test"]
        empty = [name for k, name in enumerate(names) if not (assign == k).any()]
        if empty:
            raise KunlunError(f"{path}: the {empty[0]} split is empty: users need more events for an 80/10/10 split "
                              f"(the most any user has is {int(user_count.max())})")
    else:
        assign, names = np.zeros(n, dtype=np.int64), ["file"]
    splits = {}
    for k, name in enumerate(names):
        m = assign == k
        splits[name] = RawSplit(columns={c: v[m] for c, v in columns.items()}, seq_start={"history": user_start[m]},
                                seq_end={"history": hist_end[m]}, time=ts[m], row=order[m])
    return RawData(schema=schema, splits=splits, events=events, source=str(path))
