"""Training-step time against vocabulary size, dense vs sparse embedding optimizers: the measurement behind
``train.embedding_optimizer=sparse_adam`` (README "Speed").

    PYTHONPATH=src python benchmarks/embedding_optimizer.py [--threads 1] [--rows 10000,100000,1000000,4000000]

The default Kunlun on the embedded ml-latest-small, with its item table grown to ``rows`` rows (the batches
still look up only the real items, as a large catalogue's batch touches a tiny share of its rows). For each size
and optimizer (``adam``: fused dense Adam, every row every step; ``sparse_adam``: only the rows a batch touched)
it prints the median seconds of a training step (forward, backward, clipping, optimizer) over ``--steps`` steps,
the two optimizers' steps alternating so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import load_config
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.training.step import TrainModel, TrainStep, make_optimizers, make_schedulers
from kunlun.training.trainer import build_from_info

OPTIMIZERS = ("adam", "sparse_adam")


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="10000,100000,1000000,4000000")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = prepare_dataset("ml-latest-small")
    cfg = load_config(None, [])
    batcher = Batcher(data, "train", cfg.data.max_seq_len)
    rng = np.random.default_rng(0)
    batches = [batcher.batch(rng.choice(len(batcher), cfg.train.batch_size, replace=False)) for _ in range(4)]
    print(f"median seconds per training step, default Kunlun, batch {cfg.train.batch_size}, {args.threads} thread(s)")
    print("| item rows | " + " | ".join(OPTIMIZERS) + " | adam / sparse_adam |")
    print("|---:|" + "---:|" * (len(OPTIMIZERS) + 1))
    for rows in (int(r) for r in args.rows.split(",")):
        got = step_seconds(rows, data, batches, args.steps)
        print(f"| {rows:,} | " + " | ".join(f"{got[o]:.4f}" for o in OPTIMIZERS) + f" | {got['adam'] / got['sparse_adam']:.2f}× |",
              flush=True)


if __name__ == "__main__":
    main()
