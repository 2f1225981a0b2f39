"""The synthetic world: determinism, chunking invariance, the Bayes NE it writes, bounded memory, and training on it."""

import hashlib
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL
from kunlun.data import synthetic as S
from kunlun.data.registry import dataset_info, load_raw, prepare_dataset
from kunlun.errors import KunlunError
from kunlun.metrics import MetricAccumulator, binary_entropy

SMALL = S.World(items=2000, events_per_user=30)


def files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def rows(folder, columns=None):
    manifest = S.read_manifest(folder)
    return pq.read_table([folder / s["file"] for s in manifest["shards"]], columns=columns).to_pydict()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """30,000 impressions of a small world, in shards of 8,000 rows."""
    out = tmp_path_factory.mktemp("synth") / "w"
    S.generate(out, 30_000, seed=3, world=SMALL, shard_rows=8000)
    return out


def test_same_seed_same_bytes_for_any_chunking_and_another_seed_differs(world, tmp_path):
    manifest = S.read_manifest(world)
    assert manifest["examples"] == 30_000 and [s["rows"] for s in manifest["shards"]] == [8000, 8000, 8000, 6000]
    for chunk in (40, 333):  # users simulated together: a memory knob, not part of the data
        S.generate(tmp_path / f"c{chunk}", 30_000, seed=3, world=SMALL, chunk_users=chunk, shard_rows=8000)
        assert files(tmp_path / f"c{chunk}") == files(world)
    # other shard boundaries: the same rows, the same Bayes NE
    S.generate(tmp_path / "one", 30_000, seed=3, world=SMALL, shard_rows=10**6)
    assert rows(tmp_path / "one") == rows(world)
    assert (tmp_path / "one" / "bayes.json").read_text() == (world / "bayes.json").read_text()
    S.generate(tmp_path / "s4", 30_000, seed=4, world=SMALL, shard_rows=8000)
    assert rows(tmp_path / "s4", ["item"]) != rows(world, ["item"])
    # a prefix of a larger world is not promised, but the first users' timelines are the same
    S.generate(tmp_path / "big", 40_000, seed=3, world=SMALL, shard_rows=8000)
    assert files(tmp_path / "big")["part-00000.parquet"] == files(world)["part-00000.parquet"]


def test_bayes_ne_is_the_ne_of_the_true_probability_and_features_matter(world):
    bayes = json.loads((world / "bayes.json").read_text())
    r = rows(world)
    y, p, split = (np.asarray(r[c]) for c in ("label", "p_true", "split"))
    train_ctr = y[split == 0].mean()
    assert bayes["train_ctr"] == pytest.approx(train_ctr, rel=1e-12)
    prepared = prepare_dataset(str(world))
    assert prepared.train_ctr == pytest.approx(train_ctr, rel=1e-6)
    for k, name in enumerate(S.SPLITS):
        m = split == k
        acc = MetricAccumulator(train_ctr)  # the trainer's own metric code, fed p_true
        acc.update(y[m], p[m])
        ne = acc.compute()["ne"]
        assert ne == pytest.approx(bayes["splits"][name]["ne"], rel=1e-9)
        assert bayes["splits"][name]["ne_own_ctr"] == pytest.approx(ne * binary_entropy(train_ctr) / binary_entropy(y[m].mean()), rel=1e-9)
        assert bayes["splits"][name]["rows"] == m.sum() == len(prepared.splits[name])
        assert 0.6 < ne < 0.9
        # an estimate that ignores every feature (the training CTR) is much worse: NE 1 on train, about 1 elsewhere
        const = MetricAccumulator(train_ctr)
        const.update(y[m], np.full(m.sum(), train_ctr))
        assert const.compute()["ne"] > ne + 0.1
    # p_true minimises the expected log-loss: on the largest split, sharper, flatter or shifted versions of it lose
    m = split == 0
    logit = np.log(p[m]) - np.log1p(-p[m])
    for other in (0.8 * logit, 1.25 * logit, logit + 0.3, logit - 0.3):
        worse = MetricAccumulator(train_ctr)
        worse.update(y[m], 1 / (1 + np.exp(-other)))
        assert worse.compute()["ne"] > bayes["splits"]["train"]["ne"] + 0.002


def test_labels_are_drawn_from_p_true(world):
    """Within each decile of p_true, clicks match Σ p_true to sampling noise: the labels come from p_true."""
    r = rows(world, ["label", "p_true", "event"])
    y, p = np.asarray(r["label"], dtype=float), np.asarray(r["p_true"])
    edges = np.quantile(p, np.linspace(0, 1, 11))
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p >= lo) & (p < hi)
        z = (y[m].sum() - p[m].sum()) / math.sqrt((p[m] * (1 - p[m])).sum())
        assert abs(z) < 4.5, (lo, hi, z)
    # every event type occurs; label = click or like
    event = np.asarray(r["event"])
    assert np.array_equal(y, (event > 0).astype(float)) and set(np.unique(event)) == {0, 1, 2}


def test_histories_are_each_users_earlier_impressions_with_event_types(world):
    raw = load_raw(str(world), None)
    ev = raw.events["history"]
    assert set(np.unique(ev["event"])) == {"skip", "click", "like"}
    assert "p_true" not in raw.splits["train"].columns  # the answer is never a feature
    # the event table is every impression in file order: "row" indexes it
    user_of = np.zeros(len(ev["item"]), dtype=np.int64)
    for split in raw.splits.values():
        user_of[split.row] = split.columns["user"]
        assert np.array_equal(ev["item"][split.row], split.columns["item"])
    for split in raw.splits.values():
        c = split.columns
        for i in np.random.default_rng(0).choice(len(split), 200, replace=False):
            lo, hi = split.seq_start["history"][i], split.seq_end["history"][i]
            assert hi == split.row[i]  # everything before the impression …
            assert np.all(user_of[lo:hi] == c["user"][i]) and (lo == 0 or user_of[lo - 1] != c["user"][i])  # … of this user
            assert np.all(ev["time"][lo:hi] < split.time[i])
            label_of_past = np.isin(ev["event"][lo:hi], ["click", "like"])
            assert np.array_equal(label_of_past, np.isin(np.arange(lo, hi), np.flatnonzero(np.isin(ev["event"], ["click", "like"]))))
    # per-user chronological split: a user's train impressions all come before their valid ones, valid before test
    s = raw.splits
    for a, b in (("train", "valid"), ("valid", "test")):
        last = {u: t for u, t in zip(s[a].columns["user"], s[a].time)}
        assert all(t > last.get(u, -1) for u, t in zip(s[b].columns["user"], s[b].time))


def test_memory_does_not_grow_with_the_number_of_examples(tmp_path):
    """A cheap proxy for bounded memory: the peak of traced (numpy) allocations at 4× the examples stays put.
    (Timelines are capped at 60 impressions here, so that every chunk of 60 users holds about as many rows.)"""
    import tracemalloc

    capped = S.World(items=2000, events_per_user=30, max_events=60)
    peaks = []
    for n in (5_000, 20_000):
        tracemalloc.start()
        S.generate(tmp_path / f"n{n}", n, seed=0, world=capped, chunk_users=60, shard_rows=5000)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_cache_covers_every_shard_and_a_missing_shard_is_named(world, tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    p = prepare_dataset(str(copy))
    assert p.name == "w" and sum(len(s) for s in p.splits.values()) == 30_000
    t = pq.read_table(copy / "part-00003.parquet").slice(0, 5000)
    pq.write_table(t, copy / "part-00003.parquet")  # a changed shard is read again, not served from the cache
    assert sum(len(s) for s in prepare_dataset(str(copy)).splits.values()) == 29_000
    (copy / "part-00001.parquet").unlink()
    with pytest.raises(KunlunError, match=r"part-00001.parquet: shard listed in .*synth.json not found"):
        prepare_dataset(str(copy))


def test_found_by_name_under_data_dir_and_info_reports_bayes_ne(world):
    info = dataset_info("w", world.parent)
    assert info["bayes"]["splits"]["test"]["ne"] == json.loads((world / "bayes.json").read_text())["splits"]["test"]["ne"]
    assert info["synthetic"]["seed"] == 3 and info["splits"]["train"]["rows"] == info["bayes"]["splits"]["train"]["rows"]
    by_event = info["splits"]["test"]["history_by_event"]
    assert set(by_event) == {"click", "like", "skip"}
    assert sum(v["max"] for v in by_event.values()) >= info["splits"]["test"]["history_length"]["max"]


@pytest.mark.parametrize("kwargs,needle", [
    ({"examples": 0}, "--examples must be at least 1"),
    ({"examples": 10, "shard_rows": 0}, "--shard-rows must be at least 1"),
    ({"examples": 10, "chunk_users": -1}, "--chunk-users must be at least 1"),
])
def test_bad_parameters_are_one_line_errors(tmp_path, kwargs, needle):
    with pytest.raises(KunlunError, match=needle):
        S.generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
    with pytest.raises(KunlunError, match=r"synthetic world: items is out of range \(1\)"):
        S.World(items=1)


def test_refuses_to_overwrite_and_parses_counts(world):
    with pytest.raises(KunlunError, match="already exists and is not an empty directory"):
        S.generate(world, 100)
    assert [S.parse_count(x) for x in ("250000", "250_000", "250k", "1M", "1.5M", "1e8", "2G")] == [
        250_000, 250_000, 250_000, 10**6, 1_500_000, 10**8, 2 * 10**9]
    with pytest.raises(KunlunError, match="'ten' is not a count"):
        S.parse_count("ten")
    with pytest.raises(KunlunError, match="not a whole number"):
        S.parse_count("1.5")


def test_a_tiny_synthetic_world_trains_end_to_end(tmp_path):
    from kunlun.config import load_config
    from kunlun.training.runner import evaluate_file, evaluate_run, train_run

    out = tmp_path / "tiny"
    S.generate(out, 10_000, seed=0, world=SMALL, shard_rows=4000)
    cfg = load_config(None, [*TINY_MODEL, "train.epochs=1"], dataset=str(out))
    final = train_run(cfg, tmp_path / "run", progress=False, logger=lambda m: None)
    bayes = json.loads((out / "bayes.json").read_text())
    test = final["metrics"]["test"]
    assert test["examples"] == bayes["splits"]["test"]["rows"]
    assert test["ne"] > bayes["splits"]["test"]["ne"] - 3 * bayes["splits"]["test"]["ne_std"]
    # and it trained: this model scores test NE 1.1245 untrained and 1.0667 after its epoch (seeds 1, 2: 1.128 → 1.071,
    # 1.116 → 1.043; 12 steps on 6,000 rows learn little more than the base rate, but they move the NE clearly)
    assert test["ne"] < 1.09
    assert evaluate_run(tmp_path / "run", ["test"])["test"]["ne"] == pytest.approx(test["ne"])
    # one shard scored as a file: every row, histories from the file itself
    shard = tmp_path / "part-00000.parquet"
    shard.write_bytes((out / "part-00000.parquet").read_bytes())
    scored = evaluate_file(tmp_path / "run", shard)
    assert scored["examples"] == 4000
    # the same after the world's folder is moved: scoring a file reads the run and the file alone
    out.rename(tmp_path / "moved")
    assert evaluate_file(tmp_path / "run", shard) == scored


def test_world_parameters_as_key_value_overrides():
    w = S.world_with(["drift_days=20", "max_events=1k", "device_bias=0,-0.5,0.5"], S.World(items=500))
    assert (w.items, w.drift_days, w.max_events, w.device_bias) == (500, 20.0, 1000, (0.0, -0.5, 0.5))
    assert isinstance(w.max_events, int) and S.world_with([]) == S.World()
    for bad, needle in [("drift=3", r"'drift=3' is not key=value with a known key; keys: items, "),
                        ("drift_days", "not key=value"), ("drift_days=soon", "key drift_days: expected a number, got 'soon'"),
                        ("max_events=2.5", "key max_events: expected a number"), ("drift_days=nan", "expected a finite number"),
                        ("device_bias=0,x", "key device_bias: expected numbers, comma-separated"),
                        ("device_bias=0,1", r"device_bias is out of range")]:
        with pytest.raises(KunlunError, match=needle):
            S.world_with([bad])
