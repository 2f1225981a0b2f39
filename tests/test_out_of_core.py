"""Out of core: the memory-mapped cache, preparing chunk by chunk in bounded memory, and training from the maps.

The chunked path must write the very bytes the in-memory path writes, a loaded dataset must hold maps (not copies),
and training from the maps — straight or resumed mid-epoch — must give the metrics of training from arrays in RAM.
"""

from __future__ import annotations

import hashlib
import mmap
import tracemalloc
from fractions import Fraction
from functools import partial

import numpy as np
import pytest

from conftest import TINY_MODEL, interrupt_at_step
from kunlun.config import load_config
from kunlun.data import prepare as P
from kunlun.data import synthetic as S
from kunlun.data.batches import Batcher, shuffled_rows
from kunlun.data.prepare import Encoder, NumericStats, _events_used, exact_sum, load_prepared, save_prepared
from kunlun.data.registry import cache_root, load_raw, prepare_dataset
from kunlun.data.stream import covered, merge_intervals, prepare_chunked
from kunlun.training.trainer import Trainer

SMALL = S.World(items=2000, events_per_user=30)


def quiet(m):
    return None


def files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """200,000 impressions of a small world in shards of 64,000 rows (users straddle shard and chunk boundaries)."""
    out = tmp_path_factory.mktemp("ooc") / "ooc-world"  # a name no other test's data set has: its cache is found by it
    S.generate(out, 200_000, seed=5, world=SMALL, shard_rows=64_000)
    return out


def in_memory_cache(world, target):
    raw = load_raw(str(world), None)
    save_prepared(Encoder.fit(raw).prepare(raw, "w"), target)


def test_chunked_prepare_writes_the_bytes_of_the_in_memory_path_in_bounded_memory(world, tmp_path):
    """Byte-identical caches for chunks that split users, row groups and shards anywhere; and the traced (numpy)
    peak of preparing in chunks of 5,000 rows is a fraction of the in-memory path's, which holds the whole set."""
    tracemalloc.start()
    in_memory_cache(world, tmp_path / "mem")
    whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    prepare_chunked(S.SyntheticChunks(world, 5_000), "w", tmp_path / "c5000")
    chunked = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    reference = files(tmp_path / "mem")
    assert "events.history/type.2.npy" in reference and "split.valid/cat.npy" in reference
    assert files(tmp_path / "c5000") == reference
    assert chunked < whole / 8 and chunked < 12e6, (chunked, whole)  # measured: whole 67 MB, chunked 4 MB
    for rows in (4_999, 64_000, 10**6):
        prepare_chunked(S.SyntheticChunks(world, rows), "w", tmp_path / f"c{rows}")
        assert files(tmp_path / f"c{rows}") == reference, rows


def test_a_loaded_dataset_holds_memory_maps_and_the_fingerprint_is_unchanged(world, tmp_path, monkeypatch):
    raw = load_raw(str(world), None)
    ram = Encoder.fit(raw).prepare(raw, "w")
    whole = ram.fingerprint()  # every array hashed in one piece (they are shorter than a block)
    save_prepared(ram, tmp_path / "c")
    p = load_prepared(tmp_path / "c")
    arrays = [a for sp in p.splits.values() for a in (sp.label, sp.cat, sp.num, sp.group, sp.time, sp.row, *sp.seq_start.values(),
                                                         *sp.seq_end.values())]
    arrays += [a for e in p.events.values() for a in (e.item, e.event, e.side, e.time, *e.type_positions.values())]
    for a in arrays:
        base = a
        while base is not None and not isinstance(base, mmap.mmap):
            assert not (isinstance(base, np.ndarray) and base.flags.owndata), "an array copied into RAM"
            base = base.base
        assert isinstance(base, mmap.mmap) and not a.flags.writeable
    monkeypatch.setattr(P, "_hash", partial(P._hash, rows=7_777))
    assert p.fingerprint() == whole  # the maps hashed a block at a time: the same digest
    np.testing.assert_array_equal(p.splits["train"].cat, ram.splits["train"].cat)


def test_a_damaged_cache_is_rebuilt(world):
    first = prepare_dataset(str(world), chunk_rows=50_000).fingerprint()  # before the damage: its maps see the file change
    [cache] = cache_root().glob("ooc-world-*")
    cat = cache / "split.train" / "cat.npy"
    cat.write_bytes(cat.read_bytes()[:-8])  # truncated: the map would be shorter than its header says
    logs = []
    again = prepare_dataset(str(world), log=logs.append)
    assert any("unreadable" in m and "cat.npy" in m for m in logs), logs
    assert again.fingerprint() == first


def cfg(*extra):
    return load_config(None, [*TINY_MODEL, "model.event_split=true", "model.stream_window=own", "model.primary_events=[like]", "train.threads=1",
                              "train.batch_size=1024", "train.shuffle_block_rows=3000", "train.shuffle_window_blocks=3",
                              "train.max_steps=0", "train.epochs=2", "train.patience=0",
                              f"data.dataset={extra[0]}", *extra[1:]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """30,000 impressions: small enough to train on in a test."""
    out = tmp_path_factory.mktemp("ooc") / "tiny"
    S.generate(out, 30_000, seed=3, world=SMALL, shard_rows=8_000)
    return out


def test_training_from_the_maps_matches_training_from_ram_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """Kunlun with per-event-type windows (read from the cache's type positions), seed and threads fixed: the metrics
    from the chunk-prepared, memory-mapped cache are those from arrays encoded in RAM, bit for bit; a run killed
    mid-epoch and resumed from the maps (block-wise shuffling, batches straddling its windows) ends with them too;
    ``kunlun eval`` of the run scores the maps (the raw
    files are not read again) and reproduces them."""
    raw = load_raw(str(tiny), None)
    ram = Encoder.fit(raw).prepare(raw, "tiny")
    maps = prepare_dataset(str(tiny), chunk_rows=7_000)
    c = cfg(str(tiny))
    straight = Trainer(c, ram, tmp_path / "ram", progress=False, logger=quiet)
    assert straight.model.event_windows and not ram.events["history"].type_positions  # the Batcher computes them in RAM
    straight.start_record()
    reference = straight.fit()

    c = cfg(str(tiny), "train.checkpoint_every_steps=5")
    t = Trainer(c, maps, tmp_path / "maps", progress=False, logger=quiet)
    cached = maps.events["history"].type_positions
    assert all(p is cached[c] for c, p in t.train_batches.type_index["history"].items())  # the maps, not copies
    t.start_record()
    interrupt_at_step(t, t.steps_per_epoch + 7)  # inside epoch 2, past its last checkpoint
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    t2 = Trainer(c, prepare_dataset(str(tiny)), tmp_path / "maps", progress=False, logger=quiet)
    t2.resume(tmp_path / "maps" / "checkpoints" / "last")
    assert t2.state.epoch == 1 and 0 < t2.state.epoch_step < 7  # resumed mid-epoch
    assert t2.fit()["metrics"] == reference["metrics"]

    from kunlun.training import runner

    def no_raw(*a, **k):
        raise AssertionError("re-read the raw files")

    monkeypatch.setattr(runner, "load_raw", no_raw)
    assert runner.evaluate_run(tmp_path / "ram") == reference["metrics"]


def test_numeric_statistics_are_exact_and_do_not_depend_on_the_chunking():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(3.0, 2.0, 5000), rng.standard_cauchy(3000) * 1e6, [0.0, -0.0, 1e-30, 7.5]])
    assert Fraction(exact_sum(x), 1 << 1127) == sum(Fraction(float(v)) for v in x)
    mean_exact = sum(Fraction(float(v)) for v in x) / len(x)
    var_exact = sum((Fraction(float(v)) - mean_exact) ** 2 for v in x) / len(x)
    results = []
    for step in (len(x), 1000, 7):
        st = NumericStats(2)
        for i in range(0, len(x), step):
            st.add(np.stack([x[i : i + step], -x[i : i + step]], axis=1))
        results.append(tuple(np.concatenate(st.result()).tolist()))
    assert results[0] == results[1] == results[2]
    mean, std = results[0][0], results[0][2]
    assert mean == float(mean_exact) and std == pytest.approx(float(var_exact) ** 0.5, rel=1e-15)


def test_merged_history_intervals_cover_the_events_training_histories_use():
    rng = np.random.default_rng(1)
    for _ in range(50):
        start = rng.integers(0, 300, 40)
        end = start + rng.integers(-3, 30, 40)
        s, e = merge_intervals(start, end)
        assert np.all(s[1:] > e[:-1]) and np.all(s < e)  # disjoint, sorted, not touching, none empty
        np.testing.assert_array_equal(covered(np.arange(340), s, e), _events_used(start, np.maximum(end, start), 340))


def test_block_shuffle_visits_every_row_once_window_by_window_and_resumes_at_any_batch(tiny):
    n, block, window = 10_007, 1000, 3
    pieces = list(shuffled_rows(n, np.random.default_rng(4), block, window))
    order = np.concatenate(pieces)
    assert sorted(order.tolist()) == list(range(n)) and len(pieces) == 4  # 11 blocks, windows of 3
    for piece in pieces:  # each window holds whole blocks only, and not in order
        assert len(np.unique(piece // block)) * block >= len(piece) > (len(np.unique(piece // block)) - 1) * block
        assert not np.all(np.diff(piece) > 0)
    again = np.concatenate(list(shuffled_rows(n, np.random.default_rng(4), block, window)))
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, np.concatenate(list(shuffled_rows(n, np.random.default_rng(5), block, window))))

    b = Batcher(prepare_dataset(str(tiny)), "train", 8, block_rows=2500, window_blocks=2)
    full = [x.group for x in b.iterate(1000, np.random.default_rng(1))]
    tail = [x.group for x in b.iterate(1000, np.random.default_rng(1), start=7)]
    assert len(full) == -(-len(b) // 1000) and all(len(x) == 1000 for x in full[:-1])
    assert all(np.array_equal(x, y) for x, y in zip(full[7:], tail, strict=True))
