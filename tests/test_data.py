import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, needs_shared
from kunlun.data.batches import Batcher
from kunlun.data.movielens import build, load_latest_small
from kunlun.data.prepare import OOV, PAD, Encoder, load_prepared, save_prepared
from kunlun.data.registry import EMBEDDED, prepare_dataset
from kunlun.errors import KunlunError


@pytest.fixture(scope="module")
def ml_raw():
    return load_latest_small(EMBEDDED / "ml-latest-small")


def test_split_is_per_user_chronological_80_10_10(ml_raw):
    s = ml_raw.splits
    n = {k: len(v) for k, v in s.items()}
    total = sum(n.values())
    assert total == 100836
    assert 0.78 < n["train"] / total < 0.82 and 0.08 < n["valid"] / total < 0.12
    # for every user, all train events are no later than any valid event, valid no later than test
    for a, b in (("train", "valid"), ("valid", "test")):
        ua, ta = s[a].columns["user"], s[a].time
        ub, tb = s[b].columns["user"], s[b].time
        last_a = {u: t for u, t in zip(ua[np.argsort(ta)], np.sort(ta))}
        first_b = {}
        for u, t in zip(ub, tb):
            first_b[u] = min(t, first_b.get(u, t))
        assert all(last_a[u] <= first_b[u] for u in first_b if u in last_a)


def test_history_is_the_users_strictly_earlier_events(ml_raw):
    ev = ml_raw.events["history"]
    for split in ml_raw.splits.values():
        rng = np.random.default_rng(0)
        for i in rng.choice(len(split), 300, replace=False):
            lo, hi = split.seq_start["history"][i], split.seq_end["history"][i]
            assert np.all(ev["time"][lo:hi] < split.time[i])
            # complete: the event right after the history is not earlier than the impression
            if hi < len(ev["time"]):
                assert ev["time"][hi] >= split.time[i] or hi == lo
    # the label of each event equals its event type
    assert set(np.unique(ev["event"])) == {"liked", "not_liked"}


def test_label_is_rating_at_least_4():
    from kunlun.data.movielens import ItemTable, Ratings

    r = Ratings(np.array([1, 1, 1]), np.array([10, 11, 12]), np.array([3.5, 4.0, 5.0]), np.array([1, 2, 3]))
    items = ItemTable(np.array([10]), np.array(["Drama"]), np.array([1999]), np.zeros((1, 1), np.float32), ["Drama"])
    raw = build(r, items, None, "t", split=False)
    assert raw.splits["file"].columns["label"].tolist() == [0.0, 1.0, 1.0]
    assert raw.splits["file"].columns["genre"].tolist() == ["Drama", "unknown", "unknown"]


def test_vocabulary_from_train_only(ml_raw):
    enc = Encoder.fit(ml_raw)
    train_items = set(ml_raw.splits["train"].columns["item"].tolist())
    test = ml_raw.splits["test"].columns["item"]
    unseen = np.array([i not in train_items for i in test])
    assert unseen.any()
    codes = enc.vocabs["item"].encode(test)
    assert np.all(codes[unseen] == OOV) and np.all(codes[~unseen] >= 2)


def test_cache_round_trip_and_reuse(tmp_path):
    p = prepare_dataset("ml-latest-small")
    save_prepared(p, tmp_path / "c")
    q = load_prepared(tmp_path / "c")
    for k in p.splits:
        for f in ("label", "cat", "num", "group", "time", "row"):
            np.testing.assert_array_equal(getattr(p.splits[k], f), getattr(q.splits[k], f))
    np.testing.assert_array_equal(p.events["history"].item, q.events["history"].item)
    assert q.train_ctr == p.train_ctr and q.schema == p.schema
    assert not list(tmp_path.glob(".c.*"))  # no temporary directory left behind


def test_batches_keep_most_recent_events_left_padded():
    p = prepare_dataset("ml-latest-small")
    split, ev = p.splits["test"], p.events["history"]
    b = Batcher(p, "test", max_len=5)
    rows = np.arange(50)
    batch = b.batch(rows)
    s = batch.seqs["history"]
    assert s.item.shape == (50, 5)
    for r in range(50):
        lo, hi = split.seq_start["history"][r], split.seq_end["history"][r]
        k = min(5, hi - lo)
        expect = ev.item[hi - k : hi]
        assert s.item[r, 5 - k :].tolist() == expect.tolist()
        assert not s.mask[r, : 5 - k].any() and s.mask[r, 5 - k :].all()
        assert (s.item[r, : 5 - k] == PAD).all()
        assert (s.gap[r, 5 - k :] >= 0).all()


def test_event_windows_hold_each_types_own_most_recent_events():
    """Per event type, the window is that type's own max_len most recent events before the request (explicit
    loops over the event table), left-padded, with their item, side features and time gaps."""
    p = prepare_dataset("ml-latest-small")
    split, ev = p.splits["test"], p.events["history"]
    rows = np.arange(0, len(split), 37)
    batch = Batcher(p, "test", max_len=6, event_windows=True).batch(rows)
    assert set(batch.windows["history"]) == {2, 3}  # liked, not_liked
    longer_than_merged = 0
    for code, w in batch.windows["history"].items():
        for i, r in enumerate(rows):
            lo, hi = split.seq_start["history"][r], split.seq_end["history"][r]
            pos = [j for j in range(lo, hi) if ev.event[j] == code][-6:]
            k = len(pos)
            assert w.mask[i].tolist() == [False] * (6 - k) + [True] * k
            assert w.item[i, 6 - k :].tolist() == ev.item[pos].tolist()
            assert (w.event[i, 6 - k :] == code).all() and (w.item[i, : 6 - k] == PAD).all()
            assert w.side[i, 6 - k :].tolist() == ev.side[pos].tolist()
            np.testing.assert_allclose(w.gap[i, 6 - k :].numpy(), (split.time[r] - ev.time[pos]).astype(np.float32))
            longer_than_merged += k > int((batch.seqs["history"].event[i] == code).sum())
    assert longer_than_merged  # the merged window of 6 would have held fewer of them
    assert not Batcher(p, "test", max_len=6).batch(rows).windows  # only when asked for


@needs_shared
def test_ml100k_and_frappe_load():
    p = prepare_dataset("ml-100k", SHARED_DATA)
    assert sum(len(s) for s in p.splits.values()) == 100000
    assert 0.55 < np.mean(np.concatenate([s.label for s in p.splits.values()])) < 0.56  # 55.4 % positive
    assert "occupation" in [c for c, _ in p.schema.categorical]
    f = prepare_dataset("frappe_x1", SHARED_DATA)
    assert (len(f.splits["train"]), len(f.splits["valid"])) == (202027, 57722)
    assert not f.schema.sequences and "test" not in f.splits


def write(path, text):
    path.write_text(text)
    return path


def test_generic_schema_with_sequences(tmp_path):
    header = "click,user,item,price,ts,hist,hist_t\n"
    rows_train = "1,u1,a,1.5,100,b|c,50|60\n0,u1,b,2.0,200,a|b|c,50|60|100\n1,u2,c,0.5,150,,\n0,u2,a,1.0,160,c,150\n"
    rows_valid = "1,u1,c,1.0,300,a|b,100|200\n0,u3,z,3.0,310,q,10\n"
    write(tmp_path / "train.csv", header + rows_train)
    write(tmp_path / "valid.csv", header + rows_valid)
    schema = write(tmp_path / "s.yaml", """
name: toy
files: {train: train.csv, valid: valid.csv}
label: click
group: user
time: ts
categorical: [user, item]
numeric: [price]
sequences:
  - {name: hist, item: hist, item_vocab: item, time: hist_t, separator: "|"}
""")
    p = prepare_dataset(str(schema))
    tr = p.splits["train"]
    assert (tr.seq_end["hist"] - tr.seq_start["hist"]).tolist() == [2, 3, 0, 1]
    b = Batcher(p, "valid", max_len=3).batch(np.arange(2))
    s = b.seqs["hist"]
    assert s.mask.tolist() == [[False, True, True], [False, False, True]]
    assert s.item[1, 2].item() == OOV  # "q" never seen in training
    assert s.gap[0, 1:].tolist() == [200.0, 100.0]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("", "file is empty"),
        ("label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city\n", "no rows"),
        ("label,user,item\n1,2,3\n", "missing column 'daytime'"),
        ("label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city\n2,1,1,1,1,1,1,1,1,1,1\n",
         "must be 0 or 1, found 2 at data row 1"),
        ("label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city\nnan,1,1,1,1,1,1,1,1,1,1\n",
         "missing or NaN value at data row 1"),
        ("label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city\n1,1,1,1,1,1,1,1,1,1,1\n0,,1,1,1,1,1,1,1,1,1\n",
         "column 'user' has a missing or NaN value at data row 2"),
        ("label,user,item,daytime,weekday,isweekend,homework,cost,weather,country,city\nyes,1,1,1,1,1,1,1,1,1,1\n",
         "must be numeric"),
    ],
)
def test_bad_frappe_files_name_file_and_problem(tmp_path, content, needle):
    from kunlun.data.tabular import read_frappe_file

    f = write(tmp_path / "bad.csv", content)
    with pytest.raises(KunlunError) as e:
        read_frappe_file(f)
    assert needle in str(e.value) and str(f) in str(e.value)


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(KunlunError, match="unknown dataset 'nope'"):
        prepare_dataset("nope")
    with pytest.raises(KunlunError, match="data directory not found"):
        prepare_dataset("ml-100k", "/no/such/dir")


def test_generic_schema_over_parquet_with_list_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, n in (("train", 6), ("valid", 3)):
        pq.write_table(pa.table({
            "y": [i % 2 for i in range(n)],
            "item": [f"i{i % 3}" for i in range(n)],
            "hist": [[f"i{j}" for j in range(i % 4)] for i in range(n)],
            "kind": [["view"] * (i % 4) for i in range(n)],
        }), tmp_path / f"{name}.parquet")
    schema = write(tmp_path / "s.yaml", """
files: {train: train.parquet, valid: valid.parquet}
label: y
categorical: {item: items}
sequences:
  - {name: hist, item: hist, item_vocab: items, event: kind}
""")
    p = prepare_dataset(str(schema))
    assert p.name == "s" and set(p.splits) == {"train", "valid"}
    lengths = p.splits["train"].seq_end["hist"] - p.splits["train"].seq_start["hist"]
    assert lengths.tolist() == [0, 1, 2, 3, 0, 1]
    b = Batcher(p, "train", max_len=2).batch(np.arange(6))
    assert b.seqs["hist"].mask.sum().item() == 0 + 1 + 2 + 2 + 0 + 1
    assert (b.seqs["hist"].event[b.seqs["hist"].mask] >= 2).all()  # "view" is a known event type


def test_generic_schema_side_features_and_one_list_column_per_event_type(tmp_path):
    """Per-event side features (a CSV's separated strings here) sharing a categorical vocabulary, and a history built
    from one Parquet list column per event type, merged in time order (a tie: types in the order listed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "train.csv", "y,item,cat,hist,hist_cat\n1,a,x,b|c,y|x\n0,b,y,a,x\n1,c,x,,\n")
    write(tmp_path / "valid.csv", "y,item,cat,hist,hist_cat\n1,a,x,c|a,z|x\n")
    for name in ("train", "valid"):
        pq.write_table(pa.table({
            "y": [1, 0, 1], "item": ["a", "b", "c"], "cat": ["x", "y", "x"],
            "clicks": [["a", "b"], [], ["c"]], "click_t": [[10, 30], [], [5]],
            "likes": [["c"], ["a"], []], "like_t": [[20], [7], []],
        }), tmp_path / f"{name}.parquet")
    side = prepare_dataset(str(write(tmp_path / "side.yaml", """
files: {train: train.csv, valid: valid.csv}
label: y
categorical: {item: item, cat: category}
sequences:
  - {name: hist, item: hist, item_vocab: item, side: {hist_cat: category}}
""")))
    assert side.schema.sequences[0].side == (("hist_cat", "category"),)
    cats = side.vocabs["category"]
    np.testing.assert_array_equal(side.events["hist"].side[:, 0], cats.encode(np.array(["y", "x", "x", "z", "x"])))
    assert side.events["hist"].side[3, 0] == OOV  # "z": seen only in a validation history
    b = Batcher(side, "valid", max_len=3).batch(np.arange(1))
    assert b.seqs["hist"].side.shape == (1, 3, 1)

    typed = prepare_dataset(str(write(tmp_path / "typed.yaml", """
files: {train: train.parquet, valid: valid.parquet}
label: y
categorical: [item]
sequences:
  - name: hist
    item_vocab: item
    types: {click: {item: clicks, time: click_t}, like: {item: likes, time: like_t}}
""")))
    tr, ev = typed.splits["train"], typed.events["hist"]
    assert (tr.seq_end["hist"] - tr.seq_start["hist"]).tolist() == [3, 1, 1]
    items, kinds = typed.vocabs["item"], typed.vocabs["event_hist"]
    row0 = slice(tr.seq_start["hist"][0], tr.seq_end["hist"][0])
    assert ev.time[row0].tolist() == [10, 20, 30]  # click a, like c, click b
    np.testing.assert_array_equal(ev.item[row0], items.encode(np.array(["a", "c", "b"])))
    np.testing.assert_array_equal(ev.event[row0], kinds.encode(np.array(["click", "like", "click"])))
    b = Batcher(typed, "train", max_len=4, event_windows=True).batch(np.arange(3))
    assert b.windows["hist"][int(kinds.encode(np.array(["like"]))[0])].mask.sum().item() == 2


@pytest.mark.parametrize("sequence,needle", [
    ("{name: h, item_vocab: item, types: {click: {item: clicks}}}", "event type 'click' needs a time list column"),
    ("{name: h, item: clicks, item_vocab: item, types: {click: {item: clicks, time: click_t}}}",
     "key 'item' and key 'types' exclude each other"),
    ("{name: h, item: clicks, item_vocab: item, side: [time]}", "side column 'time' has the name of an event's own field"),
    ("{name: h, item: clicks, item_vocab: item, side: [clicks]}", "feature 'clicks' is listed as item of sequence 'h'"),
])
def test_schema_file_sequence_key_errors(tmp_path, sequence, needle):
    from kunlun.data.tabular import SchemaFile

    schema = write(tmp_path / "s.yaml", f"files: {{train: t.csv, valid: v.csv}}\nlabel: y\ncategorical: [item]\nsequences:\n  - {sequence}\n")
    with pytest.raises(KunlunError) as e:
        SchemaFile(schema)
    assert needle in str(e.value) and str(schema) in str(e.value) and "\n" not in str(e.value)


def test_bad_side_and_typed_lists_name_file_column_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "t.csv", "y,item,hist,hist_cat\n1,a,b|c,y|x\n0,b,a|c,x\n")
    write(tmp_path / "s.yaml", "files: {train: t.csv, valid: t.csv}\nlabel: y\ncategorical: [item]\n"
                               "sequences:\n  - {name: h, item: hist, item_vocab: item, side: [hist_cat]}\n")
    with pytest.raises(KunlunError, match=r"t.csv: column 'hist_cat' must have as many entries per row as 'hist'; data row 2 has 1 and 2"):
        prepare_dataset(str(tmp_path / "s.yaml"))
    pq.write_table(pa.table({"y": [1, 0], "item": ["a", "b"], "clicks": [["a"], ["b", "c"]], "click_t": [[1], [2, None]]}),
                   tmp_path / "t.parquet")
    write(tmp_path / "p.yaml", "files: {train: t.parquet, valid: t.parquet}\nlabel: y\ncategorical: [item]\nsequences:\n"
                               "  - {name: h, item_vocab: item, types: {click: {item: clicks, time: click_t}}}\n")
    with pytest.raises(KunlunError, match=r"t.parquet: column 'click_t' has a missing value inside its list at data row 2"):
        prepare_dataset(str(tmp_path / "p.yaml"))


def test_schema_file_errors_name_the_key(tmp_path):
    bad = write(tmp_path / "s.yaml", "files: {train: a.csv}\nlabel: y\ncategorical: [a]\n")
    with pytest.raises(KunlunError, match="must map at least train and valid"):
        prepare_dataset(str(bad))
    bad = write(tmp_path / "t.yaml", "files: {train: a.csv, valid: b.csv}\nlabel: y\ncategorical: [a]\ncolour: red\n")
    with pytest.raises(KunlunError, match="unknown key 'colour'"):
        prepare_dataset(str(bad))


@needs_shared
def test_frappe_splits_are_exactly_train_and_valid(tmp_path):
    # a test.csv beside the BARS files is held out: never loaded, never part of the cache key
    folder = tmp_path / "frappe_x1"
    folder.mkdir()
    for name in ("train", "valid", "test"):
        src = (SHARED_DATA / "frappe_x1" / ("valid.csv" if name == "test" else f"{name}.csv")).read_text().splitlines()
        (folder / f"{name}.csv").write_text("\n".join(src[:401]) + "\n")
    p = prepare_dataset("frappe_x1", tmp_path)
    assert sorted(p.splits) == ["train", "valid"]
    (folder / "test.csv").write_text("garbage that would fail to parse\n")
    assert sorted(prepare_dataset("frappe_x1", tmp_path).splits) == ["train", "valid"]


def test_schema_cache_key_covers_every_named_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        pq.write_table(pa.table({"y": rng.integers(0, 2, 50), "u": rng.integers(0, 5, 50)}), tmp_path / f"{split}.parquet")
    schema = tmp_path / "s.yaml"
    schema.write_text("files: {train: train.parquet, valid: valid.parquet, test: test.parquet}\nlabel: y\ncategorical: [u]\n")
    assert len(prepare_dataset(str(schema)).splits["test"]) == 50
    pq.write_table(pa.table({"y": rng.integers(0, 2, 20), "u": rng.integers(0, 5, 20)}), tmp_path / "test.parquet")
    assert len(prepare_dataset(str(schema)).splits["test"]) == 20  # a changed test file is not served from the cache
    (tmp_path / "test.parquet").unlink()
    with pytest.raises(KunlunError, match="test: .*test.parquet"):
        prepare_dataset(str(schema))


def test_prefetcher_yields_the_same_batches_in_order_and_raises_producer_errors():
    from kunlun.data.batches import Prefetcher

    p = prepare_dataset("ml-latest-small")
    b = Batcher(p, "valid", 8)
    plain = list(b.iterate(500, np.random.default_rng(3)))
    fetched = list(Prefetcher(b.iterate(500, np.random.default_rng(3)), depth=3))
    assert len(fetched) == len(plain) > 3
    for x, y in zip(fetched, plain):
        assert torch.equal(x.label, y.label) and torch.equal(x.seqs["history"].item, y.seqs["history"].item)

    def broken():
        yield plain[0]
        raise ValueError("bad row 7")

    it = iter(Prefetcher(broken()))
    assert torch.equal(next(it).label, plain[0].label)
    with pytest.raises(ValueError, match="bad row 7"):
        next(it)
    early = Prefetcher(b.iterate(100), depth=1)
    for _ in zip(range(2), early):
        pass
    early.close()
    early.thread.join(timeout=5)
    assert not early.thread.is_alive()  # leaving the loop early stops the producer
