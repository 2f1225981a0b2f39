"""Preparing the file-based adapters chunk by chunk (``kunlun.data.stream``): the generic schema adapter (CSV blocks,
Parquet row groups), the BARS x1 sets, Criteo, Frappe and MovieLens write the very cache their whole-file path writes,
for chunks that cut files, users, same-second runs and CSV blocks anywhere; a bad value met in a later block is one
line naming the file, column and row, and leaves no cache behind."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA, needs_shared
from kunlun.data import io, movielens, public, registry, tabular
from kunlun.data.prepare import Encoder, save_prepared
from kunlun.data.registry import EMBEDDED, cache_root, prepare_dataset
from kunlun.data.stream import prepare_chunked
from kunlun.errors import KunlunError


def files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_cache(raw, source, tmp_path, sizes):
    """The cache of ``raw`` (whole-file path) equals the chunked cache of ``source(rows)`` for every chunk size."""
    save_prepared(Encoder.fit(raw).prepare(raw, "d"), tmp_path / "whole")
    reference = files(tmp_path / "whole")
    for rows in sizes:
        prepare_chunked(source(rows), "d", tmp_path / f"rows{rows}")
        assert files(tmp_path / f"rows{rows}") == reference, rows
    return reference


@pytest.fixture
def small_csv_blocks(monkeypatch):
    """CSV files parsed 512 bytes at a time: the tiny files below span many blocks, as real logs do."""
    monkeypatch.setattr(io, "CSV_BLOCK", 512)


# ----------------------------------------------------------------------------- the generic schema adapter

SCHEMA = """name: clicks
files: {train: train.%(ext)s, valid: valid.%(ext)s}
label: clicked
group: user_id
time: ts
categorical: [user_id, item_id, city]
numeric: [price]
sequences:
  - name: hist
    item: clicked_items
    item_vocab: item_id
    time: click_times
    side: {click_cats: city}
  - name: both
    item_vocab: item_id
    types:
      click: {item: clicks2, time: click_times2}
      like: {item: liked_items, time: like_times}
"""


def click_rows(n, seed, text_ids=False, late_text_city=False, late_float_price=False):
    """Columns of a click log: histories as lists (random lengths, some empty), ids as integers or text."""
    rng = np.random.default_rng(seed)
    item = (lambda v: f"i{v}") if text_ids else int
    cols = {c: [] for c in ("user_id", "item_id", "city", "price", "clicked", "ts", "clicked_items", "click_times", "click_cats",
                            "clicks2", "click_times2", "liked_items", "like_times")}
    for r in range(n):
        late = r > 0.9 * n
        cols["user_id"].append(int(rng.integers(0, 40)))
        cols["item_id"].append(int(rng.integers(0, 60)))
        cols["city"].append(f"c{rng.integers(0, 5)}" if late and late_text_city else int(rng.integers(0, 5)))
        cols["price"].append(float(rng.integers(1, 99)) + (0.5 if late and late_float_price else 0.0))
        cols["clicked"].append(int(rng.random() < 0.4))
        cols["ts"].append(int(1_700_000_000 + r))
        for items, times, cats in (("clicked_items", "click_times", "click_cats"), ("clicks2", "click_times2", None),
                                   ("liked_items", "like_times", None)):
            k = int(rng.integers(0, 5))
            cols[items].append([item(v) for v in rng.integers(0, 70, k)])
            cols[times].append(sorted(int(t) for t in rng.integers(1_600_000_000, 1_600_000_050, k)))
            if cats:
                cols[cats].append([int(v) for v in rng.integers(0, 6, k)])
    return cols


def write_csv(path, cols, ints_price=False):
    names = list(cols)
    lines = [",".join(names)]
    for r in range(len(cols["user_id"])):
        cells = []
        for c in names:
            v = cols[c][r]
            if isinstance(v, list):
                cells.append("|".join(map(str, v)))
            elif c == "price" and ints_price and float(v).is_integer():
                cells.append(str(int(v)))
            else:
                cells.append(str(v))
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")


def schema_folder(tmp_path, ext):
    (tmp_path / "s.yaml").write_text(SCHEMA % {"ext": ext})
    return tmp_path / "s.yaml"


def test_generic_csv_in_blocks_writes_the_whole_file_cache(tmp_path, small_csv_blocks):
    """Column kinds that change after the first CSV block (integer cities that turn to text, integer prices that turn
    to decimals), text history ids in valid only (so training's integer ids become text too), merged event types:
    the types settled by the streaming pass are the whole file's, and the caches are byte-identical."""
    write_csv(tmp_path / "train.csv", click_rows(1500, 0, late_text_city=True, late_float_price=True), ints_price=True)
    write_csv(tmp_path / "valid.csv", click_rows(300, 1, text_ids=True))
    path = schema_folder(tmp_path, "csv")
    sf = tabular.SchemaFile(path)
    chunks = tabular.SchemaChunks(sf, 100)
    text = [c for s in sf.sequences for c in s.list_columns]
    whole = io.read_table(tmp_path / "train.csv", required=sf.columns(), text=text)
    types = chunks.files["train"].types
    assert {c: t for c, t in types.items() if c not in text} == {c: whole.schema.field(c).type for c in types if c not in text}
    assert chunks.files["train"].types["city"] == pa.string() and chunks.files["train"].types["price"] == pa.float64()
    assert chunks.ints["train"]["clicked_items"] and not chunks.ints["valid"]["clicked_items"]
    raw = sf.load()
    assert raw.events["hist"]["item"].dtype.kind == "U" and raw.splits["train"].columns["city"].dtype.kind == "U"
    assert_same_cache(raw, lambda rows: tabular.SchemaChunks(sf, rows), tmp_path, (7, 333, 10**6))


@pytest.mark.parametrize("stamp", ["2024-01-0%dT00:00:00Z", "2024-01-0%dT00:00:00.123456789Z", "2024-01-0%d 08:00:00"])
def test_csv_blocks_settle_timestamp_columns_that_turn_to_text_like_the_whole_file(tmp_path, small_csv_blocks, stamp):
    """Time-zone (and nanosecond) timestamps for many blocks, then text: each block gets the whole file's types."""
    lines = ["a,t,u"] + [f"{r},{stamp % (1 + r % 7) if r < 300 else 'unknown'},{stamp % (1 + r % 7)}" for r in range(400)]
    (tmp_path / "f.csv").write_text("\n".join(lines) + "\n")
    whole = io.read_table(tmp_path / "f.csv", required=["a", "t", "u"])
    blocks = list(io.TableChunks(tmp_path / "f.csv", rows=37, required=["a", "t", "u"]))
    assert whole.schema.field("t").type == pa.string() and pa.types.is_timestamp(whole.schema.field("u").type)
    for _, block in blocks:
        assert block.schema == whole.schema
    assert pa.concat_tables([b for _, b in blocks]).equals(whole)


def test_text_in_a_numeric_column_names_the_value_arrow_cannot_read(tmp_path):
    """Python's float() reads "1_000" and " 5", Arrow's cast does not: the message names that value and its row."""
    pq.write_table(pa.table({"p": ["1", "2", "1_000", "4"]}), tmp_path / "f.parquet")
    table = pq.read_table(tmp_path / "f.parquet")
    with pytest.raises(KunlunError, match=r"column 'p' must be numeric, found text '1_000' at data row 3$"):
        io.numeric_column(table, "p", tmp_path / "f.parquet")


def test_generic_parquet_in_row_groups_writes_the_whole_file_cache(tmp_path):
    """List columns of integers and of text (all integers in train: they become int64 there, as whole), row groups
    smaller and larger than the chunks."""
    for split, n, seed, text in (("train", 2000, 2, False), ("valid", 400, 3, True)):
        cols = click_rows(n, seed, text_ids=text)
        cols["clicks2"] = [[str(v) for v in x] for x in cols["clicks2"]]  # text lists of integer ids
        pq.write_table(pa.table(cols), tmp_path / f"{split}.parquet", row_group_size=150)
    sf = tabular.SchemaFile(schema_folder(tmp_path, "parquet"))
    assert_same_cache(sf.load(), lambda rows: tabular.SchemaChunks(sf, rows), tmp_path, (7, 400, 10**6))


# ----------------------------------------------------------------------------- BARS x1, Criteo, Frappe

def bars_csv(spec, n, seed):
    """A CSV in ``spec``'s layout: integer ids (text for TaobaoAd's pid), decimal prices, '^'-separated histories."""
    rng = np.random.default_rng(seed)
    seq = {c for q in spec.sequences for c in (q.item, *([q.event[0]] if q.event else []), *(c for c, _ in q.side))}
    names = list(dict.fromkeys([spec.label, spec.group, *spec.categorical, *spec.numeric, *spec.sequence_columns()]))
    lines = [",".join(names)]
    for _ in range(n):
        lengths = {q.name: int(rng.integers(0, 6)) for q in spec.sequences}
        length_of = {c: lengths[q.name] for q in spec.sequences for c in (q.item, *([q.event[0]] if q.event else []), *(c for c, _ in q.side))}
        cells = []
        for c in names:
            if c == spec.label:
                cells.append(str(int(rng.random() < 0.3)))
            elif c in seq:
                cells.append("^".join(str(v) for v in rng.integers(0, 40, length_of[c])))
            elif c in spec.numeric:
                cells.append(f"{rng.integers(1, 999) / 10:g}")
            elif c == "pid":
                cells.append(f"430548_{rng.integers(1000, 1010)}")
            else:
                cells.append(str(rng.integers(0, 30)))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", ["amazonelectronics_x1", "taobaoad_x1", "kuaivideo_x1"])
def test_bars_sets_in_blocks_write_the_whole_file_cache(tmp_path, name, small_csv_blocks):
    """train.csv's valid tenth drawn a block at a time is the one drawn at once; test.csv's events follow train.csv's."""
    spec = public.BARS_SETS[name]
    folder = tmp_path / name
    folder.mkdir()
    (folder / "train.csv").write_text(bars_csv(spec, 1200, 4))
    (folder / "test.csv").write_text(bars_csv(spec, 300, 5))
    raw = public.load_bars(spec, folder)
    assert len(raw.splits["valid"]) > 50
    assert_same_cache(raw, lambda rows: public.BarsChunks(spec, folder, rows), tmp_path, (7, 250, 10**6))


@needs_shared
def test_criteo_and_frappe_in_blocks_write_the_whole_file_cache(tmp_path, small_csv_blocks):
    """Criteo's DeepCTR sample (header, commas; columns empty on every row) and a Kaggle-layout file (no header, tabs)
    with the 8:1:1 split of the whole file; Frappe's first 3,000 rows of each split."""
    from test_public_datasets import kaggle_file

    for k, text in enumerate([(SHARED_DATA / "samples" / "criteo_sample.txt").read_text(), kaggle_file(900)]):
        folder = tmp_path / f"criteo{k}"
        folder.mkdir()
        (folder / "train.txt").write_text(text)
        assert_same_cache(public.load_criteo(folder), lambda rows, f=folder: public.CriteoChunks(f, rows), tmp_path / f"c{k}", (7, 100))
    folder = tmp_path / "frappe"
    folder.mkdir()
    for f in tabular.FRAPPE_SPLITS.values():
        lines = (SHARED_DATA / "frappe_x1" / f).read_text().splitlines()[:3001]
        (folder / f).write_text("\n".join(lines) + "\n")
    assert_same_cache(tabular.load_frappe(folder), lambda rows: tabular.FrappeChunks(folder, rows), tmp_path / "frappe", (333,))


# ----------------------------------------------------------------------------- MovieLens

def test_movielens_latest_small_in_blocks_writes_the_whole_file_cache(tmp_path):
    """Chunks of 4,999 sorted ratings cut users and same-second runs of ratings (whose histories end at the run's
    start, before the chunk)."""
    folder = EMBEDDED / "ml-latest-small"
    assert_same_cache(movielens.load_latest_small(folder), lambda rows: movielens.latest_small_chunks(folder, rows), tmp_path, (4_999,))


@needs_shared
def test_ml_1m_layout_and_ml_100k_in_blocks_write_the_whole_file_cache(tmp_path, small_csv_blocks):
    """The first 40,000 lines of ml-1m-first-half's ratings.dat (official '::' layout) with its movies and users;
    MovieLens-100K whole."""
    folder = tmp_path / "ml1m"
    folder.mkdir()
    lines = (SHARED_DATA / "ml-1m-first-half" / "ratings.dat").read_bytes().splitlines(keepends=True)[:40_000]
    (folder / "ratings.dat").write_bytes(b"".join(lines))
    for f in ("movies.dat", "users.dat"):
        shutil.copy(SHARED_DATA / "ml-1m-first-half" / f, folder / f)
    assert_same_cache(movielens.load_1m(folder), lambda rows: movielens.ml1m_chunks(folder, rows), tmp_path / "1m", (7_777,))
    ml100k = SHARED_DATA / "ml-100k"
    assert_same_cache(movielens.load_100k(ml100k), lambda rows: movielens.ml100k_chunks(ml100k, rows), tmp_path / "100k", (9_999,))


def test_the_whole_movielens_path_is_unchanged():
    """The in-memory path now goes through the same ``Impressions.block`` as the chunked one: its encoded data are
    those the earlier whole-array construction gave (fingerprint pinned from it)."""
    raw = movielens.load_latest_small(EMBEDDED / "ml-latest-small")
    assert Encoder.fit(raw).prepare(raw, "ml-latest-small").fingerprint()["sha256"] == LATEST_SMALL_SHA256


def test_user_behavior_and_kuairand_in_blocks_write_the_whole_file_cache(tmp_path, small_csv_blocks):
    """Events in random file order with many same-second ties (ordered by file position), users cut by the chunks."""
    from test_public_datasets import KR_HEAD

    rng = np.random.default_rng(8)
    behaviors = np.asarray(public.BEHAVIORS)
    lines = [f"{rng.integers(0, 30)},{rng.integers(0, 200)},{rng.integers(0, 9)},{behaviors[rng.integers(0, 4)]},{rng.integers(0, 400)}"
             for _ in range(3000)]
    folder = tmp_path / "ub"
    folder.mkdir()
    (folder / "UserBehavior.csv").write_text("\n".join(lines) + "\n")
    assert_same_cache(public.load_user_behavior(folder), lambda rows: public.user_behavior_chunks(folder, rows), tmp_path / "ub-c",
                      (7, 1000))
    folder = tmp_path / "kr"
    folder.mkdir()
    for f in public.KUAIRAND_LOGS:
        rows = [f"{rng.integers(0, 25)},{rng.integers(0, 90)},20220408,1000,{rng.integers(0, 300) * 1000 + rng.integers(0, 999)},"
                f"{int(rng.random() < 0.4)},{int(rng.random() < 0.1)},0,0,0,0,0,0,0,0,0,0,0,{rng.integers(0, 3)}" for _ in range(1500)]
        (folder / f).write_text(KR_HEAD + "\n".join(rows) + "\n")
    assert_same_cache(public.load_kuairand_pure(folder), lambda rows: public.kuairand_chunks(folder, rows), tmp_path / "kr-c", (7, 1000))


# ----------------------------------------------------------------------------- the registry and the command line

def test_prepare_dataset_goes_chunked_with_chunk_rows_or_above_the_size_threshold(tmp_path, monkeypatch):
    logs = []
    whole = prepare_dataset("ml-latest-small", use_cache=False).fingerprint()
    chunked = prepare_dataset("ml-latest-small", use_cache=False, chunk_rows=30_000, log=logs.append).fingerprint()
    monkeypatch.setattr(registry, "STREAM_BYTES", 1000)
    auto = prepare_dataset("ml-latest-small", use_cache=False, log=logs.append).fingerprint()
    assert whole == chunked == auto
    assert [m for m in logs if "chunk by chunk" in m] == [
        "preparing ml-latest-small chunk by chunk (30,000 rows at a time; cached afterwards)",
        "preparing ml-latest-small chunk by chunk (65,536 rows at a time; cached afterwards)"]


def test_chunk_rows_is_refused_for_a_dataset_that_is_read_whole(tmp_path, monkeypatch):
    spec = registry.DATASETS["ml-latest-small"]
    monkeypatch.setitem(registry.DATASETS, "ml-latest-small", replace(spec, chunks=None))
    with pytest.raises(KunlunError, match=r"^--chunk-rows: ml-latest-small is read whole; only datasets with a chunked reader"):
        prepare_dataset("ml-latest-small", chunk_rows=1000)


def no_cache_left(name):
    """Neither a cache of ``name`` (``<name>-<key>``) nor a temporary directory of one (``.<name>-<key>.tmp…``)."""
    pattern = re.compile(rf"\.?{re.escape(name)}-[0-9a-f]{{16}}(\.tmp.*)?")
    return not cache_root().is_dir() or not [p for p in cache_root().iterdir() if pattern.fullmatch(p.name)]


def test_a_bad_value_in_a_later_block_names_file_column_and_row_and_leaves_no_cache(tmp_path, small_csv_blocks, monkeypatch, capsys):
    """Through the command line: exit status 2, one line naming the file, the column and the data row of the whole file
    (not of the block), and neither the cache nor a temporary directory left behind."""
    from test_input_errors import assert_user_error, kunlun

    cols = click_rows(1500, 6)
    cols["clicked"][1234] = 2
    write_csv(tmp_path / "train.csv", cols)
    write_csv(tmp_path / "valid.csv", click_rows(100, 7))
    path = schema_folder(tmp_path, "csv")
    result = kunlun(["data", "prepare", "--dataset", path, "--chunk-rows", "100"], monkeypatch, capsys)
    assert_user_error(result, f"{tmp_path / 'train.csv'}: label column 'clicked' must be 0 or 1, found 2 at data row 1235")
    assert no_cache_left("clicks")

    cols = click_rows(1500, 6)
    cols["clicked_items"][1400], cols["click_times"][1400], cols["click_cats"][1400] = [5], ["x"], [1]
    write_csv(tmp_path / "train.csv", cols)
    with pytest.raises(KunlunError, match=r"train.csv: column 'click_times' must hold integer times, found 'x' at data row 1401$"):
        prepare_dataset(str(path), chunk_rows=100)
    assert no_cache_left("clicks")


@pytest.mark.parametrize("damage, needle", [
    (lambda lines: lines.__setitem__(1300, lines[1300] + ",7"), "line 1301 has 14 fields, expected 13 like the header"),
    (lambda lines: lines.__setitem__(1400, lines[1400].replace(",", ",\udcff", 1)),  # a byte 0xff in item_id
     "column 'item_id' has text that is not valid UTF-8 at data row 1400"),
    (lambda lines: lines.__setitem__(1450, lines[1450].replace("|", "||x|", 1)), "data row 1450"),  # one list one longer
])
def test_a_damaged_csv_gives_the_whole_file_paths_message_from_a_later_block(tmp_path, small_csv_blocks, damage, needle):
    """A ragged line, bytes that are not UTF-8, a list that no longer matches its neighbour: met in a late block, the
    chunked path says what the whole-file path says (file, column, line or data row of the file)."""
    write_csv(tmp_path / "train.csv", click_rows(1500, 9))
    write_csv(tmp_path / "valid.csv", click_rows(100, 10))
    lines = (tmp_path / "train.csv").read_text().split("\n")
    damage(lines)
    (tmp_path / "train.csv").write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    sf = tabular.SchemaFile(schema_folder(tmp_path, "csv"))
    with pytest.raises(KunlunError) as whole:
        sf.load()
    with pytest.raises(KunlunError) as chunked:
        prepare_chunked(tabular.SchemaChunks(sf, 100), "d", tmp_path / "cache")
    assert str(chunked.value) == str(whole.value) and needle in str(whole.value), (str(chunked.value), str(whole.value))
    assert not (tmp_path / "cache").exists() and not list(tmp_path.glob(".cache*"))


@needs_shared
def test_a_bad_line_late_in_ratings_dat_names_its_line_and_leaves_no_cache(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    lines = (SHARED_DATA / "ml-1m-first-half" / "ratings.dat").read_bytes().splitlines(keepends=True)[:30_000]
    lines[25_000] = b"1::2::3\n"
    (folder / "ratings.dat").write_bytes(b"".join(lines))
    for f in ("movies.dat", "users.dat"):
        shutil.copy(SHARED_DATA / "ml-1m-first-half" / f, folder / f)
    with pytest.raises(KunlunError, match=r"ratings.dat: line 25001 has 3 '::'-separated fields, expected 4"):
        prepare_dataset("ml-1m", tmp_path, chunk_rows=5_000)
    assert no_cache_left("ml-1m")


LATEST_SMALL_SHA256 = "010df11fc4bd3802dbe89c9a092a3ecaf535bf03dd202fee6598b83dfae5ddf1"  # main at 6cb13ca, before the refactor
