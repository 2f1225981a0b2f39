"""Measure the pinned-quality checks of ``tests/test_pinned_quality.py``: one small model per pinned model (a DNN and
a Kunlun) on the embedded MovieLens latest-small with a short fixed budget, trained once per seed.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/pinned_quality.py --model dnn --seeds 0 1 2 3 4 5 6 7
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/pinned_quality.py --model kunlun --seeds 0 1 2 3 4 5 6 7

prints test NE per seed (and the same model's untrained test NE), then the pin (mean over seeds) and the tolerance
max(3 × sample std, MIN_TOLERANCE). Config keys given before the options change the pinned config — the same small
model with one component changed, for a seed-noise comparison (docs/results/quality.md):

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/pinned_quality.py model.summary_gate=none --model kunlun --seeds 0 1 2 3 4 5 6 7

The test imports ``OVERRIDES`` and ``train`` from here, so the pinned run and the measured runs are one config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from kunlun.config import load_config
from kunlun.data.registry import prepare_dataset
from kunlun.training.trainer import Trainer

OVERRIDES = {
    "dnn": [
        "data.dataset=ml-latest-small", "data.max_seq_len=20", "model.d_model=8", "model.hidden=[64, 64]",
        "train.batch_size=512", "train.epochs=2", "train.patience=0", "train.lr=0.003", "train.embedding_lr=0.003",
    ],
    # every component on (two layers, so CompSkip alternates in the full stream), at a width that trains in about a minute
    "kunlun": [
        "data.dataset=ml-latest-small", "data.max_seq_len=20", "model.d_model=16", "model.num_layers=2", "model.num_heads=2",
        "model.num_seeds=4", "model.seq_summary_tokens=2", "model.summary_tokens=2", "model.fm_hidden=32",
        "model.output_hidden=[32]", "train.batch_size=512", "train.epochs=1", "train.patience=0", "train.warmup_steps=20",
        "train.lr=0.003", "train.embedding_lr=0.003",
    ],
}
MIN_TOLERANCE = 0.005  # the floor of kunlun.bench.quality.pin_expected: 3σ from a few seeds can come out tiny by chance


def trainer(seed: int, run_dir: Path, model: str = "dnn", extra: list[str] | None = None) -> Trainer:
    cfg = load_config(None, [*OVERRIDES[model], *(extra or []), f"train.seed={seed}"], model=model)
    return Trainer(cfg, prepare_dataset(cfg.data.dataset), run_dir, progress=False, logger=lambda m: None)


def train(seed: int, run_dir: Path, model: str = "dnn") -> dict:
    """Train the pinned config of ``model`` with ``seed``; return its final.json."""
    return trainer(seed, run_dir, model).fit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(OVERRIDES), default="dnn")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    ap.add_argument("overrides", nargs="*", help="config keys on top of the pinned config, e.g. model.summary_gate=none")
    args = ap.parse_args()
    ne, untrained = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            t0 = time.perf_counter()
            t = trainer(s, Path(tmp) / f"seed{s}", args.model, args.overrides)
            t.start_record()
            untrained[s] = t.evaluate("test")["ne"]
            ne[s] = t.fit()["metrics"]["test"]["ne"]
            print(f"seed {s}: test NE {ne[s]:.5f} (untrained {untrained[s]:.5f})  ({time.perf_counter() - t0:.1f} s)", flush=True)
    values = list(ne.values())
    mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    tol = max(3 * std, MIN_TOLERANCE)
    print(f"mean {mean:.5f}  sample std {std:.5f}  3σ {3 * std:.5f}  tolerance {tol:.5f}")
    print(json.dumps({"model": args.model, "overrides": args.overrides, "seeds": args.seeds, "ne": [round(v, 5) for v in values],
                      "untrained_ne": [round(v, 5) for v in untrained.values()], "pin": round(mean, 5), "tolerance": round(tol, 5)}))


if __name__ == "__main__":
    main()
