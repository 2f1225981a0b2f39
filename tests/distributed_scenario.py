"""What tests/test_distributed.py runs on 2 processes: ``python -m torch.distributed.run --standalone --nproc-per-node 2
tests/distributed_scenario.py ROOT`` (ROOT holds the synthetic world ``w`` and the 2-rank CLI run ``cli``).

1. the metric reduction: random predictions scored by shares (``predict_shard`` order, gathered) against one process;
2. the CLI run's config killed at step 14 (inside epoch 2, after the checkpoint of step 12), a copy kept for the
   one-process resume, then resumed on these 2 ranks;
3. right after loading the checkpoint on 2 ranks: the validation metrics and the optimizer states;
4. the same run with FSDP2 (``train.distributed=fsdp``) in ``ROOT/fsdp``, and with row-sharded embedding tables
   (``train.embedding_sharding=row``) in ``ROOT/row``.

Rank 0 writes ``ROOT/scenario.json`` and ``ROOT/optimizers-2.pt``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import interrupt_at_step
from kunlun.config import load_config
from kunlun.data.registry import prepare_dataset
from kunlun.metrics import MetricAccumulator
from kunlun.training import distributed as D
from kunlun.training.runner import train_run
from kunlun.training.trainer import Trainer

KILL_AT = 14


def quiet(message: str) -> None:
    pass


def metric_reduction(world: D.World) -> dict:
    """Random (probability, label, group) rows of a 1,000-row split, each rank holding the rows of its evaluation
    batches in order (batches of 96: rank r has batches r, r + 2, …, the last one short, one share empty), gathered by
    ``gather_predictions`` and scored; against the whole split scored at once. Ties included (rounded scores)."""
    rng = np.random.default_rng(7)
    n, batch = 1000, 96
    probs = np.round(rng.random(n), 2).astype(np.float32)
    labels = (rng.random(n) < probs).astype(np.float32)
    groups = rng.integers(0, 40, n)
    mine = np.concatenate([np.arange(min(n, g + world.rank * batch), min(n, g + (world.rank + 1) * batch))
                           for g in range(0, n, batch * world.size)])
    joined = D.gather_predictions((probs[mine], labels[mine], groups[mine]), batch, world)
    if joined is None:
        return {}
    acc = MetricAccumulator(0.4)
    acc.update(joined[1], joined[0], joined[2])
    one = MetricAccumulator(0.4)
    one.update(labels, probs, groups)
    in_order = all(np.array_equal(a, b) for a, b in zip(joined, (probs, labels, groups)))
    return {"sharded": acc.compute(), "single": one.compute(), "rows_in_order": in_order}


def main(root: Path) -> None:
    torch.set_num_threads(1)
    world = D.init_from_env()
    out: dict = {"metric_reduction": metric_reduction(world)}
    # a checkpoint at step 12 (how often a run checkpoints changes nothing it computes: the CLI run made none inside epochs)
    cfg = load_config(root / "cli" / "config.yaml", ["train.checkpoint_every_steps=12"])
    data = prepare_dataset(cfg.data.dataset)

    killed = root / "killed"
    t = Trainer(cfg, data, killed, progress=False, logger=quiet)
    t.start_record()
    interrupt_at_step(t, KILL_AT)
    try:
        t.fit()
    except KeyboardInterrupt:
        pass
    D.barrier(world)
    if world.main:
        shutil.copytree(killed, root / "killed-for-1-rank")
    D.barrier(world)

    loaded = Trainer(cfg, data, root / "scratch", progress=False, logger=quiet)
    loaded.resume(killed / "checkpoints" / "last")
    out["after_load"] = {"step": loaded.state.step, "valid": loaded.evaluate("valid")}
    if world.main:
        torch.save([o.state_dict() for o in loaded.optimizers], root / "optimizers-2.pt")

    out["resumed"] = train_run(cfg, killed, resume=True, progress=False, logger=quiet)["metrics"]
    fsdp = load_config(root / "cli" / "config.yaml", ["train.distributed=fsdp"])  # no checkpoint inside epochs
    out["fsdp"] = train_run(fsdp, root / "fsdp", progress=False, logger=quiet)["metrics"]

    row = load_config(root / "cli" / "config.yaml", ["train.embedding_sharding=row"])
    t = Trainer(row, data, root / "row", progress=False, logger=quiet)
    t.start_record()
    out["row"] = t.fit()["metrics"]
    item = t.model.inputs.tables["item"]
    out["row_item_rows"] = D.all_gather([item.num_embeddings, item.weight.to_local().shape[0]], world)
    if world.main:
        (root / "scenario.json").write_text(json.dumps(out))
    D.barrier(world)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
