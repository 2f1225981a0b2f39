"""Training over several processes: ``torchrun --nproc-per-node N -m kunlun train …``.

One process per rank; torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address, and
``init_from_env`` joins the process group (gloo on CPUs, NCCL on GPUs, one GPU per rank). Without them — a plain
``kunlun train`` — nothing here runs and the single-process trainer is untouched.

Data: every rank draws the same epoch order (``seed + epoch``) and takes its share of every *global* batch
(``Batcher.iterate(rank=, world=)``): the ranks together train on exactly the batches one process would, so a
checkpoint's position (global steps) means the same at any world size, and data-parallel training equals
single-process training up to the order of float sums. ``train.batch_size`` must be a multiple of the world size.

Gradients: each rank's loss is Σ (its rows' losses) × W / N, N the rows of the global batch, and DDP (or FSDP2)
averages the W gradients: the result is the gradient of the global batch's mean loss, also for a last, shorter
batch that splits unevenly. A rank whose share is empty runs one stand-in row with weight 0 (every rank must take
part in every gradient reduction, and some models cannot run an empty batch).

Metrics: evaluation shards whole evaluation batches over the ranks (rank r scores batches r, r + W, …, the very
batches one process scores, so the probabilities are the same), gathers every rank's (probability, label, group)
to rank 0, puts them back in row order and scores them with the single-process ``MetricAccumulator``, then sends
the metrics to every rank (early stopping must decide the same everywhere). NE, AUC and gAUC are therefore those of
one process scoring the same predictions, bit for bit. Why not reduced sums: NE alone could be a reduced sum (as
TorchRec keeps it), but it would then differ from ``kunlun eval`` in the last bits (another order of float64
additions); AUC needs the joint ranking of all scores, and a reduced histogram of binned scores makes it
approximate (distinct scores in a bin count as ties). The accumulator's exact (group, score) count tables merge
exactly too, but are as large as the predictions in the worst case, so gathering the predictions (16 bytes a row)
costs no more and keeps every metric bit-identical.

Records: rank 0 alone writes the run record, logs and shows progress; every checkpoint of ``last`` is a
``torch.distributed.checkpoint`` (``kunlun.training.checkpoint.save_sharded``), which resumes at any world size,
one process included; ``best`` stays one safetensors file written by rank 0.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kunlun.config import TrainConfig
from kunlun.data.batches import Batch, Batcher
from kunlun.data.prepare import Prepared
from kunlun.errors import KunlunError
from kunlun.metrics import MetricAccumulator
from kunlun.models import RankingModel
from kunlun.training.step import TrainModel, autocast


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank ``rank`` of ``size`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run record and talks to the user."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank) if self.distributed else torch.device("cuda")
        return torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend}


SINGLE = World()


def current() -> World:
    """The world of this process: its process group's, or the single process when there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
    return SINGLE


def launched_size() -> int:
    """The world size the launcher (torchrun, SLURM via torchrun) asked for: ``WORLD_SIZE``, else 1."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise KunlunError(f"WORLD_SIZE={text!r} in the environment: expected a positive integer (torchrun sets it)")
    return int(text)


def init_from_env(timeout_minutes: float = 30.0) -> World:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE`` > 1): NCCL with one GPU per
    rank when there are GPUs, gloo otherwise. Does nothing for a single process, or when already joined."""
    if launched_size() == 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise KunlunError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise KunlunError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPU(s); start at most that "
                              f"many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=timeout_minutes), device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return current()


def leave(world: World) -> None:
    """Leave the process group together (a barrier, then destroy it): a rank that exits while another is still in a
    collective, or with the group's threads alive, may abort ("terminate called without an active exception")."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_world(t: TrainConfig, world: World) -> None:
    """KunlunError (one line, the same on every rank) when ``t`` cannot run on ``world``. (One process ignores
    ``train.distributed`` and ``train.embedding_sharding``.)"""
    if t.embedding_sharding == "torchrec" and importlib.util.find_spec("torchrec") is None:
        raise KunlunError('train.embedding_sharding=torchrec: TorchRec is not installed; pip install "kunlun[torchrec]" '
                          "(or use train.embedding_sharding=row)")
    if not world.distributed:
        return
    if t.embedding_sharding == "torchrec":
        from kunlun.training.torchrec_sharding import check_config

        check_config(t)
    elif t.embedding_optimizer.startswith("sparse_"):
        raise KunlunError(f"train.embedding_optimizer={t.embedding_optimizer} is for one process: data-parallel training "
                          f"reduces dense gradients (use adam or adagrad, or train.embedding_sharding=row for large tables)")
    if t.embedding_sharding != "none" and t.distributed == "fsdp":
        raise KunlunError(f"train.embedding_sharding={t.embedding_sharding} goes with train.distributed=ddp: with fsdp every "
                          f"parameter, the tables included, is sharded already")
    if t.batch_size % world.size:
        near = t.batch_size // world.size * world.size or world.size
        raise KunlunError(f"train.batch_size={t.batch_size} does not split over {world.size} processes: every rank takes an "
                          f"equal share of each batch, so use a multiple of {world.size} (e.g. {near})")


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank ``rank`` > 0 after the model is built (identical weights, independent dropout draws)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------ collectives


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_to_main(value: Any, world: World) -> list[Any] | None:
    """Every rank's ``value`` as a list in rank order on rank 0; None elsewhere."""
    if not world.distributed:
        return [value]
    out = [None] * world.size if world.main else None
    dist.gather_object(value, out, dst=0)
    return out


def all_gather(value: Any, world: World) -> list[Any]:
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


@dataclass
class Agreement:
    """What every rank learns at a synchronisation point of the training loop."""

    loss_sum: float  # Σ loss × rows over all ranks since the counters started
    first_bad: int | None  # the first step with a non-finite loss on any rank
    checkpoint: bool  # rank 0's clock says a checkpoint is due (train.checkpoint_every_minutes)
    every: int  # steps until the next synchronisation (rank 0's measure of SYNC_SECONDS)


def agree(world: World, device: torch.device, loss_sum: float, first_bad: int | None, checkpoint: bool, every: int) -> Agreement:
    """One all-gather of four numbers per rank: the sum of the ranks' loss sums (added in rank order, the same
    float64 result everywhere), the earliest non-finite step of any rank, and rank 0's timing decisions."""
    mine = torch.tensor([loss_sum, -1 if first_bad is None else first_bad, float(checkpoint), every], dtype=torch.float64, device=device)
    if not world.distributed:
        rows = mine[None]
    else:
        parts = [torch.empty_like(mine) for _ in range(world.size)]
        dist.all_gather(parts, mine)
        rows = torch.stack(parts)
    rows = rows.cpu().numpy()
    total = 0.0
    for r in range(len(rows)):
        total += float(rows[r, 0])
    bad = [int(b) for b in rows[:, 1] if b >= 0]
    return Agreement(total, min(bad) if bad else None, bool(rows[0, 2]), max(1, int(rows[0, 3])))


# ------------------------------------------------------------------------------------------------ training


class ShardTrainModel(TrainModel):
    """``TrainModel`` for one rank's share of a global batch: Batch, scale → (Σ losses × scale, logits).

    With ``scale`` = W / N (W ranks, N rows in the global batch), the average over ranks that DDP / FSDP take of the
    gradients is the gradient of the global batch's mean loss; ``scale`` = 0 makes a stand-in row count for nothing.

    Example::

        model = DistributedDataParallel(ShardTrainModel(ranking_model, world_size=2))
        loss, logits = model(batch, scale=2 / 512)
    """

    def __init__(self, model: RankingModel, bf16: bool = False, world_size: int = 1):
        super().__init__(model, bf16)
        self.world_size = world_size
        self.sum_loss = nn.BCEWithLogitsLoss(reduction="sum")

    def forward(self, batch: Batch, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        with autocast(batch.label.device, self.bf16):
            logits = self.model(batch)
        return self.sum_loss(logits.float(), batch.label) * scale, logits


def wrap_for_training(model: RankingModel, t: TrainConfig, world: World) -> nn.Module:
    """The module a rank's ``TrainStep`` runs: ``model`` (already on its device) in a ``ShardTrainModel``, replicated
    with DDP or sharded in place with FSDP2's ``fully_shard`` (``train.distributed``), its vocabulary tables split by
    rows (``train.embedding_sharding=row``) or moved into TorchRec (``torchrec``). Build the optimizers after this call:
    their parameters are the sharded ones (fsdp), or no longer hold the tables (torchrec)."""
    inner = ShardTrainModel(model, t.bf16, world.size)
    device = next(model.parameters()).device
    if t.embedding_sharding == "row":
        from kunlun.training.sharding import shard_rows

        sharded = shard_rows(model, device)  # each rank keeps its rows: DDP must neither average nor broadcast them
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(inner, [f"model.{n}" for n in sharded])
    elif t.embedding_sharding == "torchrec":
        from kunlun.training.torchrec_sharding import shard_with_torchrec

        shard_with_torchrec(model, t, device)  # the tables leave the model's parameters: DDP never sees them
    if t.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # one group, the whole model: parameters are gathered for the forward and freed after the backward, while the
        # gradients and optimizer states stay sharded. (Sharding sub-blocks too would cut the peak, but FSDP2 gathers a
        # group in its module's forward, and the embedding tables are reached by indexing, never through a forward.)
        fully_shard(model)
        # models return their logits as a view (a squeeze); nothing changes them in place (loss and sigmoid are out of place)
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return inner
    # a parameter with a size-1 dimension may get a gradient whose stride along it differs from the bucket's: harmless
    # (a stride along a size-1 dimension is never used), but DDP warns at every step
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(inner, device_ids=[device.index] if device.type == "cuda" else None)


def shard_scale(step_in_epoch: int, rows: int, t: TrainConfig, world: World) -> tuple[float, int, int]:
    """(loss scale W / N, this rank's rows, N) for the ``step_in_epoch``-th global batch (N rows) of a split of ``rows``
    rows, as ``Batcher.iterate(rank=, world=)`` shares it out."""
    n = min(t.batch_size, rows - step_in_epoch * t.batch_size)
    share = t.batch_size // world.size
    mine = max(0, min(share, n - world.rank * share))
    return world.size / n, mine, n


# ------------------------------------------------------------------------------------------------ evaluation


def shares(rows: int, batch_size: int, world: World) -> np.ndarray:
    """Rows of each rank in each global evaluation batch of a split of ``rows`` rows: [G, W] int64, G = ⌈rows / (B·W)⌉
    (global batch g holds rank 0's ``batch_size`` rows, then rank 1's, …; a short last one leaves later ranks fewer)."""
    starts = np.arange(0, rows, batch_size * world.size, dtype=np.int64)
    return np.clip(rows - starts[:, None] - np.arange(world.size)[None, :] * batch_size, 0, batch_size)


@torch.no_grad()
def predict_shard(model: RankingModel, batcher: Batcher, batch_size: int, world: World, bf16: bool = False) -> tuple[np.ndarray, ...]:
    """(probabilities, labels, groups) of this rank's rows of the split, [n_r] float32, float32, int64: those of its
    evaluation batches rank, rank + W, … of ``batch_size`` rows, in order. Written into arrays of this rank's row count
    as batches come (16 bytes per row), as ``trainer.predict`` does, for the same reason (memory)."""
    model.eval()
    device = next(model.parameters()).device
    n = int(shares(len(batcher), batch_size, world)[:, world.rank].sum())
    probs, labels, groups = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.int64)
    done = 0
    for batch in batcher.iterate(batch_size * world.size, rank=world.rank, world=world.size):
        k = len(batch)
        # an empty share still runs the model, on a stand-in row: under FSDP every forward is a collective
        run = batch if k else batcher.batch(np.zeros(1, np.int64))
        with autocast(device, bf16):
            logits = model(run.to(device))
        probs[done : done + k] = torch.sigmoid(logits.float()).cpu().numpy()[:k]
        labels[done : done + k] = batch.label.numpy()
        groups[done : done + k] = batch.group.numpy()
        done += k
    return probs, labels, groups


def gather_predictions(parts: tuple[np.ndarray, ...], batch_size: int, world: World) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Every rank's ``predict_shard`` output, put back in row order on rank 0 (interleaving the ranks' rows batch by
    batch: global batch g holds rank 0's g-th batch, then rank 1's, …); None on the other ranks."""
    gathered = gather_to_main(pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL), world)
    if gathered is None:
        return None
    by_rank = [pickle.loads(g) for g in gathered]
    counts = shares(sum(len(p[0]) for p in by_rank), batch_size, world)
    ends = np.cumsum(counts, axis=0)  # [G, W]: where each rank's g-th batch ends in its own arrays
    out = tuple(np.empty(int(counts.sum()), by_rank[0][i].dtype) for i in range(3))
    at = 0
    for g in range(len(counts)):
        for r in range(world.size):
            k = int(counts[g, r])
            for i in range(3):
                out[i][at : at + k] = by_rank[r][i][ends[g, r] - k : ends[g, r]]
            at += k
    return out  # type: ignore[return-value]


def evaluate_sharded(model: RankingModel, data: Prepared, split: str, max_len: int, batch_size: int, world: World,
                     bf16: bool = False) -> dict[str, float]:
    """Metrics of ``split``, every rank scoring its share of the evaluation batches; the same numbers, bit for bit,
    as ``kunlun.training.trainer.evaluate`` of one process, returned on every rank."""
    parts = predict_shard(model, Batcher(data, split, max_len, model.event_windows), batch_size, world, bf16)
    joined = gather_predictions(parts, batch_size, world)
    metrics = None
    if joined is not None:
        probs, labels, groups = joined
        acc = MetricAccumulator(data.train_ctr)
        acc.update(labels, probs, groups)
        metrics = acc.compute()
    return broadcast(metrics, world)
