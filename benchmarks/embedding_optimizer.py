"""The embedding optimizer (issue 24, item 3): dense Adam against the optimizers that update only the rows a batch
touched (``train.embedding_optimizer=sparse_adam | sparse_adagrad``), on speed and on quality.

Speed, training-step time against vocabulary size:

    PYTHONPATH=src python benchmarks/embedding_optimizer.py [--threads 1] [--rows 10000,100000,1000000,4000000] [--json F]

The default Kunlun on the embedded ml-latest-small, with its item table grown to ``rows`` rows (the batches
still look up only the real items, as a large catalogue's batch touches a tiny share of its rows). For each size
and optimizer (``adam``: fused dense Adam, every row every step; ``sparse_adam``, ``sparse_adagrad``: only the rows a
batch touched) it prints the median seconds of a training step (forward, backward, clipping, optimizer) over
``--steps`` steps, the optimizers' steps alternating so machine noise hits all alike.

Quality, from the sweeps ``benchmarks/sweeps/embedding-optimizers-*.yaml`` (the packaged Kunlun, the embedding optimizer
and its learning rate the only change): per data set and optimizer, every seed's test and valid NE at the best
checkpoint, its epoch, and training examples/s, as JSON:

    PYTHONPATH=src python benchmarks/embedding_optimizer.py --quality SWEEP_OUT... > quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import load_config
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.runs import code_version, read_json, run_code
from kunlun.training.step import TrainModel, TrainStep, make_optimizers, make_schedulers
from kunlun.training.trainer import build_from_info

OPTIMIZERS = ("adam", "sparse_adam", "sparse_adagrad")


def stepper(optimizer: str, rows: int, data, steps: int) -> TrainStep:
    cfg = load_config(None, [f"train.embedding_optimizer={optimizer}", "train.warmup_steps=0"])
    info = FeatureInfo.from_encoder(data.encoder(), cfg.data.max_seq_len)
    info = dataclasses.replace(info, vocab_sizes={**info.vocab_sizes, "item": max(rows, info.vocab_sizes["item"])})
    torch.manual_seed(0)
    model = build_from_info(cfg, info)
    opts = make_optimizers(model, cfg.train)
    return TrainStep(TrainModel(model), opts, make_schedulers(opts, cfg.train, steps + 2), cfg.train.grad_clip)


def step_seconds(rows: int, data, batches: list, steps: int) -> dict[str, float]:
    """Median seconds per step of each optimizer, their steps alternating."""
    steppers = {o: stepper(o, rows, data, steps) for o in OPTIMIZERS}
    for step in steppers.values():
        step(batches[0])  # optimizer state allocated
    times: dict[str, list[float]] = {o: [] for o in OPTIMIZERS}
    for i in range(steps):
        for o, step in steppers.items():
            t0 = time.perf_counter()
            step(batches[(i + 1) % len(batches)])
            times[o].append(time.perf_counter() - t0)
    return {o: statistics.median(t) for o, t in times.items()}


def quality(dirs: list[str]) -> dict:
    """Every finished run under the sweep outputs ``dirs``, grouped by data set, optimizer and learning rate."""
    groups: dict[tuple, list[dict]] = {}
    for d in dirs:
        for final_path in sorted(Path(d).glob("points/*/seed*/final.json")):
            run = final_path.parent
            final, cfg = read_json(final_path), load_config(run / "config.yaml")
            key = (final["dataset"], cfg.train.embedding_optimizer, cfg.train.embedding_lr)
            groups.setdefault(key, []).append({
                "seed": final["seed"], "test_ne": final["metrics"]["test"]["ne"], "valid_ne": final["metrics"]["valid"]["ne"],
                "best_epoch": final["best_epoch"], "epochs_run": final["epochs_run"],
                "train_examples_per_s": final["train_examples_per_s"], "code": [c["label"] for c in run_code(run, final)],
                "run": str(run.relative_to(Path(d).parent))})
    rows = []
    for (dataset, optimizer, lr), runs in sorted(groups.items()):
        ne = [r["test_ne"] for r in runs]
        rows.append({"dataset": dataset, "embedding_optimizer": optimizer, "embedding_lr": lr, "seeds": len(runs),
                     "test_ne_mean": statistics.mean(ne), "test_ne_std": statistics.stdev(ne) if len(ne) > 1 else None,
                     "runs": sorted(runs, key=lambda r: r["seed"])})
    return {"rows": rows}


def speed(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = prepare_dataset("ml-latest-small")
    cfg = load_config(None, [])
    batcher = Batcher(data, "train", cfg.data.max_seq_len)
    rng = np.random.default_rng(0)
    batches = [batcher.batch(rng.choice(len(batcher), cfg.train.batch_size, replace=False)) for _ in range(4)]
    print(f"median seconds per training step, default Kunlun, batch {cfg.train.batch_size}, {args.threads} thread(s)")
    print("| item rows | " + " | ".join(OPTIMIZERS) + " | " + " | ".join(f"adam / {o}" for o in OPTIMIZERS[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(OPTIMIZERS) - 1))
    rows = []
    for n in (int(r) for r in args.rows.split(",")):
        got = step_seconds(n, data, batches, args.steps)
        rows.append({"item_rows": n, "seconds_per_step": got})
        print(f"| {n:,} | " + " | ".join(f"{got[o]:.4f}" for o in OPTIMIZERS) + " | "
              + " | ".join(f"{got['adam'] / got[o]:.2f}×" for o in OPTIMIZERS[1:]) + " |", flush=True)
    return {"threads": args.threads, "steps": args.steps, "batch_size": cfg.train.batch_size, "rows": rows,
            "code": code_version()["label"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="10000,100000,1000000,4000000")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="also write the speed table as JSON to this file")
    ap.add_argument("--quality", nargs="+", metavar="SWEEP_OUT", help="summarise these sweep outputs instead of timing")
    args = ap.parse_args()
    if args.quality:
        print(json.dumps(quality(args.quality), indent=1))
        return
    result = speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
