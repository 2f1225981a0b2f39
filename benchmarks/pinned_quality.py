"""Measure the pinned-quality check of ``tests/test_pinned_quality.py``: one small DNN on the embedded
MovieLens latest-small with a short fixed budget, trained once per seed.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/pinned_quality.py --seeds 0 1 2 3 4 5 6 7

prints test NE per seed, then the pin (mean over seeds) and the tolerance max(3 × sample std, MIN_TOLERANCE).
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

MODEL = "dnn"
OVERRIDES = [
    "data.dataset=ml-latest-small", "data.max_seq_len=20", "model.d_model=8", "model.hidden=[64, 64]",
    "train.batch_size=512", "train.epochs=2", "train.patience=0", "train.lr=0.003", "train.embedding_lr=0.003",
]
MIN_TOLERANCE = 0.005  # the floor of kunlun.bench.quality.pin_expected: 3σ from a few seeds can come out tiny by chance


def train(seed: int, run_dir: Path) -> dict:
    """Train the pinned config with ``seed``; return its final.json."""
    cfg = load_config(None, [*OVERRIDES, f"train.seed={seed}"], model=MODEL)
    data = prepare_dataset(cfg.data.dataset)
    return Trainer(cfg, data, run_dir, progress=False, logger=lambda m: None).fit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    args = ap.parse_args()
    ne = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            t0 = time.perf_counter()
            ne[s] = train(s, Path(tmp) / f"seed{s}")["metrics"]["test"]["ne"]
            print(f"seed {s}: test NE {ne[s]:.5f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    values = list(ne.values())
    mean, std = statistics.mean(values), statistics.stdev(values)
    tol = max(3 * std, MIN_TOLERANCE)
    print(f"mean {mean:.5f}  sample std {std:.5f}  3σ {3 * std:.5f}  tolerance {tol:.5f}")
    print(json.dumps({"seeds": args.seeds, "ne": [round(v, 5) for v in values], "pin": round(mean, 5), "tolerance": round(tol, 5)}))


if __name__ == "__main__":
    main()
