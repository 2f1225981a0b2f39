"""What tests/test_distributed.py runs on 2 processes for ``train.embedding_sharding=torchrec`` (where TorchRec is
installed): ``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrec_scenario.py ROOT``, ROOT
holding the synthetic world ``w`` and the configs ``sgd.yaml`` and ``adagrad.yaml``.

1. each config trained into ``ROOT/sgd`` and ``ROOT/adagrad``, with each rank's rows of the ``item`` table;
2. the Adagrad run's tables' accumulators at the end, gathered whole (``ROOT/adagrad-momentum.pt``);
3. the Adagrad config killed at step 14 (after the checkpoint of step 12), a copy kept, and resumed on these 2 ranks.

Rank 0 writes ``ROOT/torchrec.json``. With ``resume`` after ROOT (on 4 processes): the copy resumed, its metrics in
``ROOT/resumed-4.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from conftest import interrupt_at_step
from kunlun.config import load_config
from kunlun.data.registry import prepare_dataset
from kunlun.training import distributed as D
from kunlun.training.runner import train_run
from kunlun.training.trainer import Trainer

KILL_AT = 14


def quiet(message: str) -> None:
    pass


def train(cfg, data, run: Path, world: D.World) -> tuple[Trainer, dict]:
    t = Trainer(cfg, data, run, progress=False, logger=quiet)
    t.start_record()
    metrics = t.fit()["metrics"]
    item = t.model.inputs.tables["item"]
    rows = D.all_gather([item.num_embeddings, item.weight.local_shards()[0].tensor.shape[0]], world)
    return t, {"metrics": metrics, "item_rows": rows}


def gathered_optimizer_state(t: Trainer, world: D.World) -> dict[str, torch.Tensor]:
    """TorchRec's fused optimizer state (ShardedTensors), each gathered whole on rank 0."""
    out = {}
    for states in t.tables.optimizer.state_dict()["state"].values():
        for name, sharded in states.items():
            whole = torch.empty(sharded.size()) if world.main else None
            sharded.gather(dst=0, out=whole)
            out[name] = whole
    return out


def main(root: Path) -> None:
    torch.set_num_threads(1)
    world = D.init_from_env()
    out = {}
    sgd = load_config(root / "sgd.yaml")
    data = prepare_dataset(sgd.data.dataset)
    _, out["sgd"] = train(sgd, data, root / "sgd", world)

    adagrad = load_config(root / "adagrad.yaml")
    t, out["adagrad"] = train(adagrad, data, root / "adagrad", world)
    momentum = gathered_optimizer_state(t, world)
    if world.main:
        torch.save(momentum, root / "adagrad-momentum.pt")

    # a checkpoint at step 12 (how often a run checkpoints changes nothing it computes)
    every = load_config(root / "adagrad.yaml", ["train.checkpoint_every_steps=12"])
    killed = Trainer(every, data, root / "killed", progress=False, logger=quiet)
    killed.start_record()
    interrupt_at_step(killed, KILL_AT)
    try:
        killed.fit()
    except KeyboardInterrupt:
        pass
    D.barrier(world)
    if world.main:
        shutil.copytree(root / "killed", root / "killed-for-4-ranks")
    D.barrier(world)
    out["resumed"] = train_run(every, root / "killed", resume=True, progress=False, logger=quiet)["metrics"]
    if world.main:
        (root / "torchrec.json").write_text(json.dumps(out))
    D.barrier(world)
    torch.distributed.destroy_process_group()


def resume(root: Path) -> None:
    torch.set_num_threads(1)
    world = D.init_from_env()
    every = load_config(root / "adagrad.yaml", ["train.checkpoint_every_steps=12"])
    metrics = train_run(every, root / "killed-for-4-ranks", resume=True, progress=False, logger=quiet)["metrics"]
    if world.main:
        (root / "resumed-4.json").write_text(json.dumps(metrics))
    D.leave(world)


if __name__ == "__main__":
    (resume if sys.argv[2:] == ["resume"] else main)(Path(sys.argv[1]))
