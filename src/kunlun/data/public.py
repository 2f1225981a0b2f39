"""Public benchmarks users download themselves: Criteo (Kaggle Display Advertising), Taobao UserBehavior,
KuaiRand-Pure, and the BARS x1 CSV sets with per-row histories (AmazonElectronics_x1, TaobaoAd_x1, KuaiVideo_x1).

Each adapter reads the files exactly as published (put them in ``<data-dir>/<name>/``); errors are one line
naming the file, column and line (``kunlun.data.io``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kunlun.data.io import TableChunks, id_column, label_column, numeric_column, read_table, require_file
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.data.stream import Chunk
from kunlun.data.timeline import SPLITS, Positions, Timeline, TimelineSource, compact, missing_data_note, scoring_events
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


def criteo_layout(path: Path, labels: bool = True) -> dict[str, Any]:
    """How to read a Criteo file (``read_table``'s / ``TableChunks``' arguments), from its first line."""
    head = _first_line(path)
    if head.startswith("label,"):
        return {"required": CRITEO_COLUMNS, "text": CRITEO_CATEGORICAL}
    fields = head.rstrip("\r\n").count("\t") + 1
    has_label = fields == len(CRITEO_COLUMNS)
    if not has_label and (labels or fields != len(CRITEO_COLUMNS) - 1):
        raise KunlunError(f"{path}: line 1 has {fields} tab-separated fields, expected {len(CRITEO_COLUMNS)} "
                          "(label, I1-I13, C1-C26)" + ("" if labels else " or 39 without the label"))
    return {"names": CRITEO_COLUMNS if has_label else CRITEO_COLUMNS[1:], "delimiter": "\t", "text": CRITEO_CATEGORICAL}


def read_criteo_file(path: Path, labels: bool = True) -> tuple[RawSplit, bool]:
    """One Criteo file as a split. Two layouts: Kaggle's ``train.txt`` (no header, tab-separated: label, I1-I13,
    C1-C26; ``test.txt`` lacks the label) and DeepCTR's ``criteo_sample.txt`` (comma-separated, header
    ``label,I1..I13,C1..C26``). Empty cells are missing values.

    Numeric I1-I13: ``sign(v) * log(1 + |v|)``, missing → 0 (I2 can be negative; the log tames the heavy tails the
    usual CTR protocol transforms too); the encoder then standardises them. Categorical C1-C26: the hashed value as
    text, missing → its own id ``__missing__``."""
    return criteo_block(read_table(path, **criteo_layout(path, labels)), path)


def criteo_block(t: pa.Table, path: Path, first_row: int = 0) -> tuple[RawSplit, bool]:
    """``read_criteo_file`` of a table: a whole file, or a block of one (``first_row``: data rows before it)."""
    has_labels = "label" in t.column_names
    cols: dict[str, np.ndarray] = {
        "label": label_column(t, "label", path, first_row) if has_labels else np.zeros(t.num_rows, dtype=np.float32)
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
        v = numeric_column(t.set_column(t.column_names.index(c), c, filled), c, path, first_row=first_row)
        cols[c] = np.sign(v) * np.log1p(np.abs(v))
    for c in CRITEO_CATEGORICAL:
        arr = pc.if_else(pc.equal(t.column(c), ""), None, t.column(c)).fill_null(MISSING)
        cols[c] = id_column(pa.table({c: arr}), c, path, first_row)
    return RawSplit(columns=cols), has_labels


def criteo_split(n: int, seed: int = CRITEO_SEED) -> np.ndarray:
    """0 / 1 / 2 (train / valid / test) per row [n] int8: a random 8:1:1 split, the same for every run."""
    perm = np.random.default_rng(seed).permutation(n)
    assign = np.empty(n, dtype=np.int8)  # 1 byte per row: what the chunked prepare holds of the 45.8M rows
    a, b = int(round(0.8 * n)), int(round(0.9 * n))
    assign[perm[:a]], assign[perm[a:b]], assign[perm[b:]] = 0, 1, 2
    return assign


def _take(split: RawSplit, mask: np.ndarray, first_row: int = 0) -> RawSplit:
    rows = np.flatnonzero(mask)
    return RawSplit(columns={c: v[rows] for c, v in split.columns.items()}, row=first_row + rows)


class CriteoChunks:
    """``load_criteo(folder)`` as a ``kunlun.data.stream.ChunkSource``, ``rows`` lines at a time. Held besides a block:
    the split of every row (``criteo_split``: 1 byte per row; its permutation, 8 bytes per row, only while it is drawn),
    which needs the number of rows, counted in the pass that settles the column types (``TableChunks``)."""

    def __init__(self, folder: Path, rows: int):
        self.path = folder / CRITEO_FILES[0]
        self.file = TableChunks(self.path, **criteo_layout(self.path), rows=rows)
        self.schema, self.source = CRITEO_SCHEMA, str(self.path)
        self.assign = criteo_split(self.file.num_rows)

    def chunks(self) -> Iterator[Chunk]:
        for first, t in self.file:
            split, _ = criteo_block(t, self.path, first)
            assign = self.assign[first : first + len(split)]
            yield Chunk({name: _take(split, assign == k, first) for k, name in enumerate(("train", "valid", "test"))}, {})


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
UB_LAYOUT = {"names": ["user", "item", "category", "behavior", "ts"], "text": ["behavior"]}
UB_SCHEMA = Schema(
    label="label",
    categorical=tuple((c, c) for c in ("user", "item", "category", "hour", "weekday")),
    numeric=("log_history", "log_gap_hours"),
    sequences=(SequenceSpec("history", item_vocab="item", event_vocab="behavior", side=(("category", "category"),)),),
    group="user",
    has_time=True,
)


def user_behavior_fields(t: pa.Table, path: Path, first_row: int = 0) -> dict[str, np.ndarray]:
    """user, item, category, ts, behavior (code: index in ``BEHAVIORS``) and label of UserBehavior lines ``t``
    (``first_row`` lines into the file); lines without the behaviour (a file of candidates to score) get label 0 and
    behaviour pv as placeholders."""
    out = {c: numeric_column(t, c, path, integer=True, first_row=first_row) for c in ("user", "item", "category", "ts")}
    if "behavior" not in t.column_names:
        return out | {"behavior": np.zeros(t.num_rows, dtype=np.int8), "label": np.zeros(t.num_rows, dtype=np.float32)}
    behavior = np.asarray(pc.utf8_trim_whitespace(t.column("behavior")).to_numpy(zero_copy_only=False)).astype(str)
    bad = ~np.isin(behavior, BEHAVIORS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KunlunError(f"{path}: column 'behavior_type' (4th field) must be one of {'/'.join(BEHAVIORS)}, "
                          f"found {str(behavior[row])!r} on line {first_row + row + 1}")
    out["behavior"] = np.argmax(behavior[:, None] == np.asarray(BEHAVIORS), axis=1).astype(np.int8)
    out["label"] = (out["behavior"] > 0).astype(np.float32)  # not a page view
    return out


def _user_behavior(fields: dict[str, np.ndarray], source: str, split: bool, rows: int = 1 << 16) -> TimelineExamples:
    return TimelineExamples(UB_SCHEMA, fields, {"label": "label", "user": "user", "item": "item", "category": "category"},
                            {"item": "item", "event": "behavior", "category": "category"}, {"behavior": np.asarray(BEHAVIORS)},
                            source, split=split, rows=rows)


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
    events train, the next 10 % valid, the last 10 % test. ``file``: one file in the same layout to score
    (``score_file``: histories from the data set's events too; ``labels=False`` also reads lines without the
    behaviour: user, item, category, time)."""
    if file is None:
        path = folder / TAOBAO_UB_FILES[0]
        return _user_behavior(user_behavior_fields(read_table(path, **UB_LAYOUT), path), str(path), split=True).raw()
    layout = UB_LAYOUT
    if _fields_in_first_line(file) == 4:
        if not labels:
            layout = {"names": ["user", "item", "category", "ts"]}
        else:
            raise KunlunError(f"{file}: missing the behaviour field (lines of user, item, category, time; expected user, item, "
                              "category, behavior, time); `kunlun predict` scores rows without it, `kunlun eval` needs it")
    rows = user_behavior_fields(read_table(file, **layout), file)
    return score_file(_user_behavior, rows, "behavior" in layout["names"], [folder / TAOBAO_UB_FILES[0]],
                      lambda p: TableChunks(p, **UB_LAYOUT), user_behavior_fields, ("user", "item", "category", "behavior", "ts"),
                      str(file))


def _fields_in_first_line(path: Path) -> int:
    with open(require_file(path), "rb") as f:
        line = f.readline().rstrip(b"\r\n")
    return line.count(b",") + 1 if line else 0


def score_file(make: Callable[..., TimelineSource], rows: dict[str, np.ndarray], has_labels: bool, data_paths: list[Path],
               chunks: Callable[[Path], TableChunks], fields: Callable[..., dict[str, np.ndarray]], same: tuple[str, ...],
               source: str) -> RawData:
    """A file of a timeline data set to score (its ``rows``: fields as ``fields`` reads them) as split ``file``, in file
    order: a row's history is its user's events strictly before it, from the data set (``data_paths``, read a block at a
    time by ``chunks``, only the file's users' events kept) merged with the file's own labelled rows, a row equal to a
    data event in the fields ``same`` being that event (``kunlun.data.timeline.scoring_events``). When a data file is
    missing, the file's rows alone, and ``RawData.note`` says so. ``make(fields, source, split)``: the adapter's
    ``TimelineSource``."""
    missing = [p for p in data_paths if not p.is_file()]
    data = None
    if not missing:
        users = np.unique(rows["user"])
        kept = []
        for path in data_paths:
            for first, t in chunks(path):
                block = fields(t, path, first)
                keep = np.isin(block["user"], users)
                kept.append({k: compact(v[keep]) for k, v in block.items()})
        data = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    note = "" if data is not None else missing_data_note(missing[0], has_labels)
    ev = scoring_events(data, rows, has_labels, same)
    return make(ev, source, False).score_rows(rows, has_labels, note)


def user_behavior_chunks(folder: Path, rows: int) -> TimelineExamples:
    """``load_user_behavior(folder)`` as a ChunkSource: UserBehavior.csv read a block of lines at a time into compact
    columns (≈ 25 bytes per event held: the sort by user and time needs them all)."""
    path = folder / TAOBAO_UB_FILES[0]
    blocks = TableChunks(path, **UB_LAYOUT, rows=rows)
    return _user_behavior(_compact_blocks(user_behavior_fields(t, path, first) for first, t in blocks), str(path), True, rows)


def _compact_blocks(blocks) -> dict[str, np.ndarray]:
    """Fields of blocks of a file (each a dict of columns) joined, integers held as int32 where they fit."""
    parts = [{k: compact(v) for k, v in b.items()} for b in blocks]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class TimelineExamples(TimelineSource):
    """Events (one example each) on per-user timelines, the MovieLens construction (``kunlun.data.timeline``): sorted by
    user, time and file order; history = the user's events strictly earlier in time; hour and weekday in Beijing time
    (UTC+8); log history length and log hours since the previous event; split per user 80/10/10 in time order (or one
    ``file`` split). ``fields`` (file order; ``user`` and ``ts`` among them) are held sorted; ``columns`` and ``events``
    name the field of each example column and event column; text fields are held as codes into ``names``.
    ``raw()`` makes every example at once, ``chunks()`` ``rows`` at a time (a ChunkSource): the same rows."""

    def __init__(self, schema: Schema, fields: dict[str, np.ndarray], columns: dict[str, str], events: dict[str, str],
                 names: dict[str, np.ndarray], source: str, *, split: bool = True, rows: int = 1 << 16):
        self.timeline = Timeline(fields["user"], fields["ts"], {k: v for k, v in fields.items() if k not in ("user", "ts")}, split=split)
        self.timeline.check_splits(source, "events")
        self.schema, self.columns, self.events, self.names, self.source, self.rows = schema, columns, events, names, source, rows
        self.split_names = list(SPLITS) if split else ["file"]

    def _value(self, name: str, v: np.ndarray) -> np.ndarray:
        """Field ``name``'s values ``v`` as examples and events hold them: text fields' codes as their names."""
        if name in self.names:
            return self.names[name][v]
        return v.astype(np.int64) if v.dtype.kind in "iu" else v

    def block(self, i: int, j: int) -> tuple[dict[str, RawSplit], dict[str, dict[str, np.ndarray]]]:
        """Sorted rows ``[i, j)``: their examples per split (history ranges index the whole event table) and events."""
        tl = self.timeline
        p = tl.positions(i, j)
        seq = self.schema.sequences[0].name
        values = {"user": tl.user[i:j]} | {k: v[i:j] for k, v in tl.fields.items()}
        events = {k: self._value(f, values[f]) for k, f in self.events.items()} | {"time": p.ts}
        return self.splits_of(i, j, p, self.example_columns(values, p), seq), {seq: events}

    def example_columns(self, values: dict[str, np.ndarray], p: Positions) -> dict[str, np.ndarray]:
        """The examples of events ``values`` (``user`` and the fields, one per row) at positions ``p``."""
        ts = p.ts
        columns = {c: self._value(f, values[f]) for c, f in self.columns.items()}
        local = ts + 8 * 3600
        return columns | {
            "hour": (local // 3600) % 24, "weekday": (local // 86400) % 7,
            "log_history": np.log1p(p.hist_end - p.user_start).astype(np.float64),
            "log_gap_hours": np.log1p(np.maximum(ts - p.prev_ts, 0) / 3600.0),
        }


# ----------------------------------------------------------------------------- KuaiRand-Pure

KUAIRAND_LOGS = ("log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv")
KUAIRAND_COLUMNS = ["user_id", "video_id", "time_ms", "is_click", "is_like", "tab"]
EXPOSURES = ("liked", "clicked", "skipped")
KUAIRAND_SCHEMA = Schema(
    label="label",
    categorical=tuple((c, c) for c in ("user", "video", "tab", "hour", "weekday")),
    numeric=("log_history", "log_gap_hours"),
    sequences=(SequenceSpec("history", item_vocab="video", event_vocab="exposure", side=(("tab", "tab"),)),),
    group="user",
    has_time=True,
)


def kuairand_fields(t: pa.Table, path: Path, first_row: int = 0) -> dict[str, np.ndarray]:
    """user, video, tab, ts (whole seconds), label (is_click) and kind (code into ``EXPOSURES``) of log rows ``t``; rows
    without is_click (a file of candidates to score) get label 0 and kind skipped as placeholders."""
    out = {c: numeric_column(t, c, path, integer=True, first_row=first_row) for c in ("user_id", "video_id", "time_ms", "tab")}
    if "is_click" in t.column_names:
        click, like = label_column(t, "is_click", path, first_row), label_column(t, "is_like", path, first_row)
    else:
        click = like = np.zeros(t.num_rows, dtype=np.float32)
    kind = np.where(like > 0, 0, np.where(click > 0, 1, 2)).astype(np.int8)
    return {"user": out["user_id"], "video": out["video_id"], "tab": out["tab"], "ts": out["time_ms"] // 1000, "label": click, "kind": kind}


def _kuairand(fields: dict[str, np.ndarray], source: str, split: bool, rows: int = 1 << 16) -> TimelineExamples:
    return TimelineExamples(KUAIRAND_SCHEMA, fields, {"label": "label", "user": "user", "video": "video", "tab": "tab"},
                            {"item": "video", "event": "kind", "tab": "tab"}, {"kind": np.asarray(EXPOSURES)}, source,
                            split=split, rows=rows)


def load_kuairand_pure(folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
    """KuaiRand-Pure (Kuaishou, 2022-04-08 to 05-08: 27,285 users, 7,583 videos), the standard-recommendation logs.

    Download (no account needed)::

        cd <data-dir> && curl -LO https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz
        tar xzf KuaiRand-Pure.tar.gz && mv KuaiRand-Pure/data kuairand-pure

    Protocol: one example per logged exposure of the two ``log_standard_*`` files (joined, one timeline); label =
    ``is_click``. History = the user's exposures strictly earlier in time (``time_ms`` in whole seconds), each with its
    video, its type (liked / clicked / skipped: exposed, not clicked) and the tab it was shown in. Fields: user, video,
    tab, hour and weekday (Beijing time); numeric: log history length, log hours since the previous exposure. Split per
    user chronologically 80/10/10. Not read: ``log_random_4_22_to_5_08_pure.csv`` (randomly exposed videos, an
    unbiased test set of its own) and the user / video feature files. ``file``: one log to score (``score_file``:
    histories from the data set's logs too; ``labels=False`` also reads a log without is_click and is_like)."""
    if file is None:
        logs = [kuairand_fields(read_table(p, required=KUAIRAND_COLUMNS), p) for p in (folder / f for f in KUAIRAND_LOGS)]
        return _kuairand({c: np.concatenate([g[c] for g in logs]) for c in logs[0]}, str(folder), split=True).raw()
    t = read_table(file, required=[c for c in KUAIRAND_COLUMNS if labels or c not in ("is_click", "is_like")],
                   optional=["is_click", "is_like"])
    has_labels = "is_click" in t.column_names
    if has_labels != ("is_like" in t.column_names):
        raise KunlunError(f"{file}: has one of the columns is_click and is_like; a log to score has both, or neither")
    return score_file(_kuairand, kuairand_fields(t, file), has_labels, [folder / f for f in KUAIRAND_LOGS],
                      lambda p: TableChunks(p, required=KUAIRAND_COLUMNS), kuairand_fields, ("user", "video", "ts"), str(file))


def kuairand_chunks(folder: Path, rows: int) -> TimelineExamples:
    """``load_kuairand_pure(folder)`` as a ChunkSource: both logs read a block at a time into compact columns."""
    def blocks():
        for p in (folder / f for f in KUAIRAND_LOGS):
            for first, t in TableChunks(p, required=KUAIRAND_COLUMNS, rows=rows):
                yield kuairand_fields(t, p, first)

    return _kuairand(_compact_blocks(blocks()), str(folder), True, rows)


# ----------------------------------------------------------------------------- BARS x1 sets with per-row histories


@dataclass(frozen=True)
class BarsSequence:
    name: str
    item: str  # the '^'-separated column of item ids
    item_vocab: str
    event: tuple[str, str] | None = None  # (column, vocabulary) of per-event types
    side: tuple[tuple[str, str], ...] = ()  # (column, vocabulary), each as long as ``item`` on every row


@dataclass(frozen=True)
class BarsSet:
    """The layout of one BARS x1 CSV set (column names as in BARS's FuxiCTR dataset configs)."""

    name: str
    label: str
    group: str
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    sequences: tuple[BarsSequence, ...]
    files: tuple[str, ...] = ("train.csv", "test.csv")

    @property
    def schema(self) -> Schema:
        return Schema(
            label=self.label,
            categorical=tuple((c, c) for c in self.categorical),
            numeric=self.numeric,
            sequences=tuple(SequenceSpec(q.name, item_vocab=q.item_vocab, event_vocab=q.event[1] if q.event else None,
                                         side=tuple((c, v) for c, v in q.side), has_time=False) for q in self.sequences),
            group=self.group,
        )

    def sequence_columns(self) -> list[str]:
        return [c for q in self.sequences for c in (q.item, *([q.event[0]] if q.event else []), *(c for c, _ in q.side))]


SEPARATOR = "^"
AMAZON_ELECTRONICS_X1 = BarsSet(
    "amazonelectronics_x1", label="label", group="user_id", categorical=("item_id", "cate_id"), numeric=(),
    sequences=(BarsSequence("history", "item_history", "item_id", side=(("cate_history", "cate_id"),)),),
)
TAOBAOAD_X1 = BarsSet(
    "taobaoad_x1", label="clk", group="userid",
    categorical=("userid", "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level", "shopping_level",
                 "occupation", "new_user_class_level", "adgroup_id", "cate_id", "campaign_id", "customer", "brand", "pid",
                 "btag"),
    numeric=("price",),
    # the behaviour log has no item ids: an event is its category, with its brand and behaviour type (btag)
    sequences=(BarsSequence("behavior", "cate_his", "cate_id", event=("btag_his", "btag"), side=(("brand_his", "brand"),)),),
)
KUAIVIDEO_X1 = BarsSet(
    "kuaivideo_x1", label="is_click", group="user_id", categorical=("user_id", "item_id"), numeric=(),
    sequences=(BarsSequence("pos_items", "pos_items", "item_id"), BarsSequence("neg_items", "neg_items", "item_id")),
)
BARS_SETS = {s.name: s for s in (AMAZON_ELECTRONICS_X1, TAOBAOAD_X1, KUAIVIDEO_X1)}


def _split_lists(t: pa.Table, column: str, path: Path, first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A '^'-separated column → (flat values as str, per-row lengths); an empty cell is an empty history."""
    col = t.column(column).combine_chunks()
    col = pc.if_else(pc.equal(col, ""), None, col)
    lists = pc.split_pattern(col, SEPARATOR)
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = np.asarray(pc.list_flatten(lists).to_numpy(zero_copy_only=False)).astype(str)
    empty = flat == ""
    if empty.any():
        row = int(np.searchsorted(np.cumsum(lengths), int(np.flatnonzero(empty)[0]), side="right"))
        raise KunlunError(f"{path}: column {column!r} has an empty item between '{SEPARATOR}' separators at data row {first_row + row + 1}")
    return flat, lengths


def bars_layout(spec: BarsSet, labels: bool = True) -> dict[str, Any]:
    """How to read a CSV of ``spec`` (``read_table``'s / ``TableChunks``' arguments)."""
    seq_cols = spec.sequence_columns()
    required = [spec.group, *spec.categorical, *spec.numeric, *seq_cols]
    return {"required": list(dict.fromkeys(([spec.label] if labels else []) + required)), "optional": [spec.label], "text": seq_cols}


def read_bars_file(spec: BarsSet, path: Path, labels: bool = True) -> tuple[RawSplit, dict[str, dict[str, np.ndarray]], bool]:
    """One CSV of a BARS x1 set: the split (histories as ranges into its own event tables) and those tables."""
    return bars_block(spec, read_table(path, **bars_layout(spec, labels)), path)


def bars_block(spec: BarsSet, t: pa.Table, path: Path, first_row: int = 0) -> tuple[RawSplit, dict[str, dict[str, np.ndarray]], bool]:
    """``read_bars_file`` of a table: a whole file, or a block of one (``first_row``: data rows before it)."""
    has_labels = spec.label in t.column_names
    cols: dict[str, np.ndarray] = {
        spec.label: label_column(t, spec.label, path, first_row) if has_labels else np.zeros(t.num_rows, dtype=np.float32)
    }
    for c in dict.fromkeys([spec.group, *spec.categorical]):
        cols[c] = id_column(t, c, path, first_row).astype(str)  # as text: history cells are text and share these vocabularies
    for c in spec.numeric:
        cols[c] = numeric_column(t, c, path, float32=True, first_row=first_row)
    split = RawSplit(columns=cols)
    events: dict[str, dict[str, np.ndarray]] = {}
    for q in spec.sequences:
        item, lengths = _split_lists(t, q.item, path, first_row)
        ev = {"item": item}
        for key, (c, _) in ([("event", q.event)] if q.event else []) + [(c, (c, v)) for c, v in q.side]:
            values, other = _split_lists(t, c, path, first_row)
            if (other != lengths).any():
                row = int(np.flatnonzero(other != lengths)[0])
                raise KunlunError(f"{path}: column {c!r} has {other[row]} values at data row {first_row + row + 1}, "
                                  f"but {q.item!r} has {lengths[row]}; they must be equally long")
            ev[key] = values
        end = np.cumsum(lengths)
        split.seq_start[q.name], split.seq_end[q.name] = end - lengths, end
        events[q.name] = ev
    return split, events, has_labels


BARS_VALID_SHARE, BARS_VALID_SEED = 0.1, 2018  # valid: a fixed random tenth of train.csv's rows


def _rows(split: RawSplit, mask: np.ndarray, first_row: int = 0) -> RawSplit:
    """The rows of ``split`` where ``mask`` holds, with their history ranges (source rows kept in ``row``; ``first_row``:
    the file's rows before ``split``)."""
    rows = np.flatnonzero(mask)
    return RawSplit(columns={c: v[rows] for c, v in split.columns.items()},
                    seq_start={k: v[rows] for k, v in split.seq_start.items()},
                    seq_end={k: v[rows] for k, v in split.seq_end.items()}, row=first_row + rows)


def load_bars(spec: BarsSet, folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
    """Read every file of ``spec`` (or only ``file``) and join their per-row event tables into one."""
    paths = {"file": file} if file is not None else {"train": folder / spec.files[0], "test": folder / spec.files[1]}
    read: dict[Path, tuple] = {}
    for p in dict.fromkeys(paths.values()):
        read[p] = read_bars_file(spec, p, labels)
    events: dict[str, dict[str, list]] = {q.name: {} for q in spec.sequences}
    offsets = {}
    for p, (_, ev, _) in read.items():
        for q in spec.sequences:
            offsets[p, q.name] = sum(len(a) for a in events[q.name].get("item", []))
            for k, v in ev[q.name].items():
                events[q.name].setdefault(k, []).append(v)
    splits = {}
    for name, p in paths.items():
        split = read[p][0]
        splits[name] = RawSplit(
            columns=split.columns,
            seq_start={k: v + offsets[p, k] for k, v in split.seq_start.items()},
            seq_end={k: v + offsets[p, k] for k, v in split.seq_end.items()},
        )
    if file is None:  # a validation split held out of train.csv: test.csv is never seen by model selection
        full = splits.pop("train")
        is_valid = np.random.default_rng(BARS_VALID_SEED).random(len(full)) < BARS_VALID_SHARE
        splits = {"train": _rows(full, ~is_valid), "valid": _rows(full, is_valid), "test": splits["test"]}
    joined = {q: {k: np.concatenate(v) for k, v in ev.items()} for q, ev in events.items()}
    has_labels = all(r[2] for r in read.values())
    return RawData(spec.schema, splits, joined, source=str(file or folder), has_labels=has_labels)


class BarsChunks:
    """``load_bars(spec, folder)`` as a ``kunlun.data.stream.ChunkSource``: train.csv then test.csv, ``rows`` rows at a
    time, histories appended to the event tables as they come; a train.csv row goes to valid by the same draws
    (``BARS_VALID_SEED``'s generator, one draw per row in file order, so the blocks draw what one call draws)."""

    def __init__(self, spec: BarsSet, folder: Path, rows: int):
        self.spec, self.schema, self.source = spec, spec.schema, str(folder)
        self.files = [TableChunks(folder / f, **bars_layout(spec), rows=rows) for f in spec.files]

    def chunks(self) -> Iterator[Chunk]:
        offset = {q.name: 0 for q in self.spec.sequences}
        draws = np.random.default_rng(BARS_VALID_SEED)
        for k, f in enumerate(self.files):
            for first, t in f:
                split, events, _ = bars_block(self.spec, t, f.path, first)
                for q in self.spec.sequences:
                    split.seq_start[q.name] += offset[q.name]
                    split.seq_end[q.name] += offset[q.name]
                    offset[q.name] += len(events[q.name]["item"])
                if k == 0:
                    is_valid = draws.random(len(split)) < BARS_VALID_SHARE
                    splits = {"train": _rows(split, ~is_valid, first), "valid": _rows(split, is_valid, first)}
                else:
                    splits = {"test": split}
                yield Chunk(splits, events)


def _bars_loader(spec: BarsSet, download: str):
    def load(folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
        return load_bars(spec, folder, file, labels)

    load.__doc__ = f"""BARS {spec.name} (reczoo/Datasets): train.csv and test.csv. BARS early-stops on test.csv ("no
    validation data split in original paper"); here ``valid`` is a fixed random tenth of train.csv (seed 2018) and
    ``train`` the rest, so model selection never sees test.csv — our test numbers are therefore held-out numbers,
    trained on 90 % of BARS's training rows, and not directly BARS's protocol.

    Each row carries its own histories as '^'-separated columns ({', '.join(spec.sequence_columns())}); they become
    that row's own event range (no shared timeline, no times: time gaps are 0). Download::

        {download}
    """
    load.__name__ = f"load_{spec.name}"
    return load


def _hf(repo: str, folder: str, md5: str) -> str:
    """The download command of one BARS x1 set (reczoo/Datasets points to these Hugging Face dataset repositories)."""
    return (f"huggingface-cli download reczoo/{repo} --repo-type dataset --local-dir <data-dir>/{folder}\n"
            f"        # (unzip there if the repository holds a zip); BARS's checksums: {md5}")


load_amazonelectronics_x1 = _bars_loader(AMAZON_ELECTRONICS_X1, _hf(
    "AmazonElectronics_x1", "amazonelectronics_x1", "train.csv e9bf80b92985e463db18fdc753d347b5, test.csv 57a20e82fe736dd495f2eaf0669bf6d0"))
load_taobaoad_x1 = _bars_loader(TAOBAOAD_X1, _hf(
    "TaobaoAd_x1", "taobaoad_x1", "train.csv eaabfc8629f23519b04593e26c7522fc, test.csv f5ae6197e52385496d46e2867c1c8da1"))
load_kuaivideo_x1 = _bars_loader(KUAIVIDEO_X1, _hf(
    "KuaiVideo_x1", "kuaivideo_x1", "train.csv 16f13734411532cc313caf2180bfcd56, test.csv ba26c01caaf6c65c272af11aa451fc7a; "
    "the item_visual_emb_dim64.h5 of pretrained embeddings is not used"))
