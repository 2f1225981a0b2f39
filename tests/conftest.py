"""Shared fixtures. Tests run on real data: the embedded MovieLens latest-small, and ../shared/data when present."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# numpy's BLAS threads on tiny scaling-fit matrices only contend with each other (3× slower on 2 cores)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# pytest-xdist runs one worker per core (addopts): each worker, and every subprocess it starts, computes on one thread,
# so that the workers do not oversubscribe the cores (set before torch starts its OpenMP pool); and each worker compiles
# into its own Inductor cache, since two processes compiling the same graph into one cache race
if _WORKER := os.environ.get("PYTEST_XDIST_WORKER"):
    import getpass
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{_WORKER}"))

import pytest  # noqa: E402

import kunlun  # noqa: E402

# subprocesses (`python -m kunlun …` from a temporary cwd) run the code under test, not whatever copy is installed
_SRC = str(Path(kunlun.__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join([_SRC, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SRC]])

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KUNLUN_SHARED_DATA", ROOT.parent / "shared" / "data"))

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")

# a model small enough that a test run takes seconds
TINY_MODEL = [
    "model.d_model=16", "model.num_layers=1", "model.num_heads=2", "model.num_seeds=4", "model.seq_summary_tokens=2",
    "model.summary_tokens=2", "model.fm_hidden=32", "model.output_hidden=[32]", "data.max_seq_len=8",
    "train.batch_size=512", "train.warmup_steps=5",
]


# what a test that checks a model *learned* adds to TINY_MODEL: a learning rate at which 30–40 steps move the test NE
# well below the untrained model's. Measured (tiny Kunlun, embedded ml-latest-small, 30 steps of 512, one thread),
# test NE untrained → trained for seeds 0 / 1 / 2: lr 1e-3 (the default then) 0.9946 → 0.9789, 1.0039 → 0.9789,
# 0.9993 → 0.9865 (too close to call); lr 1e-2 0.9946 → 0.9464, 1.0039 → 0.9308, 0.9993 → 0.9630; the same 30 steps in
# bf16 0.9945 → 0.9482, 1.0039 → 0.9346, 0.9992 → 0.9608. An untrained model scores ~1.0 (it predicts about the base
# rate); one that learned only the base rate scores 1.0.
LEARNS = ["train.lr=0.01", "train.embedding_lr=0.01"]
LEARNED_MARGIN = 0.02  # trained test NE must be this far below the same model's untrained NE (measured gaps ≥ 0.036)


def assert_learned(untrained_ne: float, trained_ne: float) -> None:
    assert trained_ne < untrained_ne - LEARNED_MARGIN, (
        f"test NE {trained_ne:.4f} after training is not clearly below the untrained model's {untrained_ne:.4f}")


def ml_rows(rows: int, max_len: int = 12, split: str = "valid"):
    """(FeatureInfo, Batch) of the first ``rows`` rows of the embedded MovieLens latest-small, histories of ``max_len``
    events with every per-event-type window: the small real batch the model tests run on."""
    import numpy as np

    from kunlun.blocks.embeddings import FeatureInfo
    from kunlun.data.batches import Batcher
    from kunlun.data.registry import prepare_dataset

    p = prepare_dataset("ml-latest-small")
    return FeatureInfo.from_encoder(p.encoder(), max_len), Batcher(p, split, max_len, event_windows=True).batch(np.arange(rows))


def resume_cfg(*extra):
    """The resume tests' run: 2 epochs of 40 steps, no early stop."""
    from kunlun.config import load_config

    return load_config(None, TINY_MODEL + ["train.max_steps=0", "train.epochs=2", "train.patience=0", "train.batch_size=2048", *extra])


def schema_dataset(folder, rows=3000, seed=0):
    """A small dataset described by a schema file (folder/s.yaml over train.csv, valid.csv), and a held-out file of
    the same columns beside the folder (folder.parent/test.csv)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir()

    def csv(path, n):
        lines = ["y,user,item,city,price,ts,clicks,click_times"]
        for _ in range(n):
            user, item, k = rng.integers(50), rng.integers(200), rng.integers(0, 6)
            clicks = rng.integers(200, size=k)
            y = int(rng.random() < (0.7 if item % 2 else 0.2))
            lines.append(f"{y},u{user},{item},c{user % 7},{rng.random() * 10:.2f},{1_000_000 + rng.integers(10_000)},"
                         f"{'|'.join(map(str, clicks))},{'|'.join(str(900_000 + t) for t in sorted(rng.integers(10_000, size=k)))}")
        path.write_text("\n".join(lines) + "\n")

    csv(folder / "train.csv", rows)
    csv(folder / "valid.csv", rows // 5)
    csv(folder.parent / "test.csv", rows // 5)
    (folder / "s.yaml").write_text("name: moved\nfiles: {train: train.csv, valid: valid.csv}\nlabel: y\ngroup: user\n"
                                   "time: ts\ncategorical: [user, item, city]\nnumeric: [price]\n"
                                   "sequences:\n  - {name: clicks, item: clicks, item_vocab: item, time: click_times}\n")
    return folder / "s.yaml"


_STRAIGHT = {}


@pytest.fixture
def straight(tmp_path_factory):
    """The resume tests' reference: ``resume_cfg()`` uninterrupted, trained once per session. (run dir, final.json).
    Function-scoped (with a session-wide result) so that it trains inside ``isolated_cache``."""
    if not _STRAIGHT:
        from kunlun.data.registry import prepare_dataset
        from kunlun.training.trainer import Trainer

        d = tmp_path_factory.mktemp("straight")
        t = Trainer(resume_cfg(), prepare_dataset(resume_cfg().data.dataset), d, progress=False, logger=lambda m: None)
        t.start_record()
        _STRAIGHT.update(dir=d, final=t.fit())
    return _STRAIGHT["dir"], _STRAIGHT["final"]


def assert_last_good_checkpoint_kept(ckpt: Path, after_epoch_1: dict[str, str], message: str) -> None:
    """A stop on a non-finite loss named ``ckpt`` and left it byte-identical to after epoch 1: the same files,
    none added (no half-written temporary directory)."""
    assert f"The last good checkpoint is in {ckpt}" in message
    assert {"best/model.safetensors", "last/model.safetensors", "last/trainer_state.pt"} <= set(after_epoch_1)
    assert checkpoint_files(ckpt) == after_epoch_1
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]


def interrupt_in_epoch(trainer, epoch: int = 1) -> None:
    """Make ``trainer.fit()`` raise KeyboardInterrupt as epoch ``epoch`` (0-based) starts — a kill at that
    boundary, after the previous epoch's checkpoints were written."""
    real = trainer.train_epoch

    def train_epoch(e):
        if e == epoch:
            raise KeyboardInterrupt
        return real(e)

    trainer.train_epoch = train_epoch


def interrupt_at_step(trainer, step: int) -> None:
    """Make ``trainer.fit()`` raise KeyboardInterrupt when ``step`` optimizer steps are done, before the next one —
    a kill anywhere inside an epoch (the weights in memory have moved past the last checkpoint)."""
    real = trainer.train_step

    def train_step(batch, **kw):
        if trainer.state.step == step:
            raise KeyboardInterrupt
        return real(batch, **kw)

    trainer.train_step = train_step


def checkpoint_files(ckpt_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``ckpt_dir``: equal dicts mean byte-identical checkpoints."""
    return {str(p.relative_to(ckpt_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}


# the modules holding the suite's longest tests (a compile of a minute, the serving package's), started first: with
# pytest-xdist each module goes to one worker (--dist loadscope, so its module fixtures are built once), and a long
# module started last would leave the other workers idle at the end
FIRST = ["test_training.py", "test_serving.py", "test_scaling.py", "test_cli.py", "test_reliability.py", "test_distributed.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: each module keeps its order


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own prepared-data cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "kunlun-cache"
    monkeypatch.setenv("KUNLUN_CACHE", str(cache))
    monkeypatch.delenv("KUNLUN_DATA", raising=False)
    yield


def run_cli(args, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``kunlun ARGS`` through the CLI's ``main``: (exit status, stdout, stderr). An exception that ``main``
    lets through (a bug: the user would see a traceback) fails the test."""
    import sys

    from kunlun.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["kunlun", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
