"""Embedding tables sharded by TorchRec (``train.embedding_sharding=torchrec``; ``pip install "kunlun[torchrec]"``).

The vocabulary tables of a model (its ``EmbeddingTables``) move into one TorchRec ``EmbeddingCollection``, planned by
TorchRec's ``EmbeddingShardingPlanner`` (row-wise: each rank holds ⌈R / W⌉ rows of every table, as with
``train.embedding_sharding=row``) and sharded by ``DistributedModelParallel`` with fbgemm's fused kernels; the dense
part stays with DDP. Each table's place in the model is taken by a ``TorchRecLookup`` with no parameters, so the
models keep calling ``tables[vocab](ids)``.

One lookup per forward: TorchRec's fused optimizer updates a table inside the backward of the lookup, so a table
looked up at several places of a forward (fields and sequences sharing a vocabulary) would be updated once per place.
A forward pre-hook on the model therefore sends, before the model runs, the distinct ids of every table in the
batch (categorical columns, every sequence and event-type window, and the out-of-vocabulary row the candidate tokens
may use) through the collection once; each ``tables[vocab](ids)`` then indexes those vectors. The padding id is never
sent: its vectors are zeros and get no gradient, as ``nn.Embedding(padding_idx=0)`` does.

The optimizer (fbgemm's, applied in the backward; TorchRec divides the gradients by the world size, as DDP averages
the dense ones over a loss scaled W / N, so a row's gradient is that of the global batch's mean loss):
``train.embedding_optimizer=sgd`` is fbgemm's EXACT_SGD and ``adagrad`` its EXACT_ADAGRAD (ε 1e-10, torch's) — the
updates of kunlun's plain SGD and Adagrad, which leave a row whose gradient is zero as it is — at
``train.embedding_lr`` on kunlun's warm-up and schedule. Ids the batch holds but the forward does not use get a zero
gradient, hence no change. What differs from one process:

- no ``adam`` / ``sparse_adam``: fbgemm's CPU kernels have no Adam (its GPU Adam is lazy, kunlun's ``adam`` is not),
  no ``sparse_*`` (the fused tables already touch only a batch's rows), no ``embedding_weight_decay`` or
  ``embedding_l2`` (fbgemm's exact SGD and Adagrad have no weight decay): each is a one-line error;
- ``train.grad_clip`` clips the gradients of the parameters outside TorchRec's tables only: the tables are updated
  inside the backward, before the global norm is known;
- ``train.compile`` is a one-line error (not built).

Checkpoints: the tables are in the model's ``state_dict`` under their usual names (``inputs.tables.<vocab>.weight``)
as TorchRec's ``ShardedTensor``s, so ``checkpoints/last`` (DCP) holds them, with the tables' optimizer state beside
the others (``Trainer.tables_state``), and resumes on any number of processes that shard the tables with TorchRec
(DCP reshards); ``checkpoints/best`` is one safetensors file of the whole tables. ``kunlun eval``, ``export`` and
``serve`` read either in one process, without TorchRec.

Tested on CPU processes over gloo (tests/test_distributed.py); on GPUs the planner and kernels are TorchRec's CUDA ones,
untried.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kunlun.blocks.embeddings import EmbeddingTables, FeatureInfo, table_key
from kunlun.config import TrainConfig
from kunlun.data.batches import Batch
from kunlun.data.prepare import OOV, PAD
from kunlun.errors import KunlunError

OPTIMIZERS = ("adagrad", "sgd")  # train.embedding_optimizer values with a fused fbgemm equivalent (module docstring)
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's (fbgemm's default is 1e-8)


def check_config(t: TrainConfig) -> None:
    """KunlunError (one line) for what TorchRec's fused tables cannot do as one process does (module docstring)."""
    if t.embedding_optimizer not in OPTIMIZERS:
        why = ("the fused tables update only the rows of each batch already" if t.embedding_optimizer.startswith("sparse_")
               else "fbgemm's CPU kernels have no Adam and its GPU Adam is lazy, unlike kunlun's adam")
        raise KunlunError(f"train.embedding_optimizer={t.embedding_optimizer} with train.embedding_sharding=torchrec: TorchRec "
                          f"updates its tables in the backward with fbgemm's fused optimizers, and {why}; use "
                          f"train.embedding_optimizer=adagrad or sgd")
    if t.embedding_weight_decay or t.embedding_l2:
        raise KunlunError("train.embedding_weight_decay / train.embedding_l2 with train.embedding_sharding=torchrec: fbgemm's "
                          "fused SGD and Adagrad have no weight decay; set them to 0")
    if t.compile:
        raise KunlunError("train.compile with train.embedding_sharding=torchrec: not built (the tables are looked up by "
                          "DistributedModelParallel in a forward pre-hook, which kunlun has not run under torch.compile)")


class TorchRecTables:
    """The vocabulary tables of one ``EmbeddingTables``, sharded row-wise over every rank by TorchRec (module docstring).

    ``lookup(batch, training)`` embeds the distinct ids of the batch (a collective: every rank calls it, once per
    forward); ``vectors(key, ids)`` then gives ids [...] → [..., D] of table ``key``. ``optimizer`` is the fused
    optimizer: a scheduler sets its learning rate, which each training lookup hands to fbgemm.
    """

    def __init__(self, tables: EmbeddingTables, info: FeatureInfo, t: TrainConfig, device: torch.device):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
        from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
        from torchrec.distributed.types import ShardingType

        self.info = info
        self.keys = list(tables.keys())  # module names (``table_key``), also the collection's table and feature names
        dims = {table.embedding_dim for table in tables.values()}
        if len(dims) != 1:  # every table of kunlun's Inputs has the model's width
            raise KunlunError(f"train.embedding_sharding=torchrec: TorchRec's EmbeddingCollection needs one width for all tables, "
                              f"these have {sorted(dims)}")
        self.dim = dims.pop()
        configs = [EmbeddingConfig(name=k, embedding_dim=self.dim, num_embeddings=tables[k].num_embeddings, feature_names=[k])
                   for k in self.keys]
        fused: dict[str, Any] = {"learning_rate": t.embedding_lr}
        if t.embedding_optimizer == "adagrad":
            fused.update(optimizer=EmbOptimType.EXACT_ADAGRAD, eps=ADAGRAD_EPS)
        else:
            fused.update(optimizer=EmbOptimType.EXACT_SGD)
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        # row-wise with the fused kernel: what the tests check, and what a vocabulary too large for one device needs
        constraints = {k: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value],
                                               compute_kernels=[EmbeddingComputeKernel.FUSED.value]) for k in self.keys}
        world = dist.get_world_size()
        topology = TopologyFactory.create_topology(
            TrainerConfig(world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world))),
            kernel_config=KernelConfig(compute_device=device.type))
        # TorchRec's default (heuristic) reservation for the dense part warns that it misjudges models it does not see:
        # the planner sees the tables alone, and keeps its default share (15%) of each device's memory for the rest
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                           storage_reservation=FixedPercentageStorageReservation(0.15))
        plan = planner.collective_plan(EmbeddingCollection(tables=configs, device=torch.device("meta")), [sharder],
                                       dist.GroupMember.WORLD)
        # DMP initialises the tables from torch's generator: keep the draws (dropout) of the run as one process has them
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.dmp = DistributedModelParallel(EmbeddingCollection(tables=configs, device=torch.device("meta")), device=device,
                                                plan=plan, sharders=[sharder])
        state = self.dmp.state_dict()
        self.weights = {k: state[f"embeddings.{k}.weight"] for k in self.keys}  # ShardedTensors: views of the fused tables
        for k in self.keys:  # every rank built the same tables from the seed: each copies in its rows
            self.load(k, tables[k].weight.detach())
        self.current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.dmp.fused_optimizer

    def load(self, key: str, weight: torch.Tensor) -> None:
        """Table ``key``'s rows held here from ``weight``: the whole table [R, D] (the ranks' shards of it are cut out), or
        a ShardedTensor laid out as this one."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        mine = self.weights[key]
        if weight is mine:
            return
        if isinstance(weight, ShardedTensor):
            if [s.metadata for s in weight.local_shards()] != [s.metadata for s in mine.local_shards()]:
                raise KunlunError(f"table {key}: a sharded weight laid out otherwise than this run's")
            with torch.no_grad():
                for src, dst in zip(weight.local_shards(), mine.local_shards()):
                    dst.tensor.copy_(src.tensor)
            return
        if tuple(weight.shape) != tuple(mine.size()):
            raise KunlunError(f"table {key}: a weight of shape {tuple(weight.shape)}, this run's is {tuple(mine.size())}")
        with torch.no_grad():  # the fused tables are buffers of fbgemm's module, updated by its kernels, not by autograd
            for shard in mine.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(weight[row : row + rows, col : col + cols])

    def lookup(self, batch: Batch, training: bool) -> None:
        """Embed the distinct non-padding ids of every table in ``batch`` (with each table's out-of-vocabulary row, which a
        candidate token may take without its id being in the batch); a collective."""
        from torchrec import KeyedJaggedTensor

        ids: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}

        def add(vocab: str | None, x: torch.Tensor) -> None:
            key = vocab and table_key(vocab)
            if key in ids:
                ids[key].append(x.reshape(-1))

        for i, vocab in enumerate(self.info.cat_vocabs):
            add(vocab, batch.cat[:, i])
        for q in self.info.sequences:
            views = [batch.seqs[q.name]] if q.name in batch.seqs else []
            views += list(batch.windows.get(q.name, {}).values())
            for s in views:
                add(q.item_vocab, s.item)
                add(q.event_vocab, s.event)
                for j, vocab in enumerate(q.side_vocabs):
                    add(vocab, s.side[..., j])
        device = batch.cat.device
        oov = torch.tensor([OOV], dtype=torch.long, device=device)
        distinct = [torch.unique(torch.cat([*ids[k], oov])) for k in self.keys]
        distinct = [u[u != PAD] for u in distinct]
        # one sample per feature holding all its ids: the collection gives them back in order, one vector each
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=torch.cat(distinct),
                                                  lengths=torch.tensor([len(u) for u in distinct], dtype=torch.int64, device=device))
        self.dmp.train(training)
        if training:  # fbgemm takes the learning rate of a step's update in its forward: the schedule's, set by zero_grad
            self.optimizer.zero_grad()
        out = self.dmp(kjt)
        self.current = {k: (u, out[k].values()) for k, u in zip(self.keys, distinct)}

    def vectors(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] of table ``key`` (from the batch of the last ``lookup``) → [..., D]; the padding id → zeros."""
        if key not in self.current:
            raise RuntimeError("TorchRecTables.vectors before lookup: the model's forward pre-hook did not run")
        known, vectors = self.current[key]
        flat = ids.reshape(-1).contiguous()  # a column of the batch's cat is strided
        at = torch.searchsorted(known, flat).clamp(max=len(known) - 1)
        hit = known[at] == flat
        # an id that is neither in the batch nor padding would silently read another row: a bug in lookup(), caught here
        if not bool((hit | (flat == PAD)).all()):
            raise RuntimeError(f"table {key}: the model looked up ids that TorchRecTables.lookup did not take from the batch")
        return (vectors[at] * hit.unsqueeze(1).to(vectors.dtype)).reshape(*ids.shape, self.dim)


class TorchRecLookup(nn.Module):
    """Stands for one ``nn.Embedding`` of a model whose tables TorchRec holds: ids [...] → [..., D] (the vectors of the
    batch's ``TorchRecTables.lookup``). No parameters; its ``state_dict`` has the table's ``weight`` (a ShardedTensor),
    and ``load_state_dict`` takes the whole table or a ShardedTensor laid out as this run's.

    Example::

        tables = TorchRecTables(model.inputs.tables, model.info, train_config, torch.device("cpu"))   # under torchrun
        model.inputs.tables["item"] = TorchRecLookup(tables, "item")
        tables.lookup(batch, training=True); vectors = model.inputs.tables["item"](batch.cat[:, 0])   # [B, D]
    """

    def __init__(self, tables: TorchRecTables, key: str):
        super().__init__()
        self.tables, self.key = tables, key  # a plain object: its DMP module is not a submodule of the model (nor in DDP)
        self.weight = tables.weights[key]  # _get_fqns of torch.distributed.checkpoint finds the state by attribute
        self.num_embeddings, self.embedding_dim = self.weight.size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tables.vectors(self.key, ids)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        try:
            self.tables.load(self.key, state_dict[prefix + "weight"])
        except KunlunError as exc:
            error_msgs.append(str(exc))


def shard_with_torchrec(model: nn.Module, t: TrainConfig, device: torch.device) -> TorchRecTables | None:
    """Move the vocabulary tables of ``model`` (its ``EmbeddingTables``) into TorchRec, sharded over every rank, and
    look them up once per forward (a pre-hook on ``model``); None when the model has no such tables."""
    check_config(t)
    quiet_torchrec()
    found = [m for m in model.modules() if isinstance(m, EmbeddingTables)]
    if not found:
        return None
    if len(found) > 1:
        raise KunlunError("train.embedding_sharding=torchrec: this model has several sets of embedding tables; kunlun's "
                          "TorchRec path shards the one of its Inputs")
    tables = TorchRecTables(found[0], model.info, t, device)
    for key in tables.keys:
        nn.ModuleDict.__setitem__(found[0], key, TorchRecLookup(tables, key))
    model.register_forward_pre_hook(lambda module, args: tables.lookup(args[0], module.training))
    return tables


def quiet_torchrec() -> None:
    """Silence the warnings of TorchRec's internals that ask nothing of kunlun's users: ShardedTensor (TorchRec's
    sharded state, which torch deprecates for DTensor), the default device of a process group in torch's own
    state-dict gathering, and torch.fx's note on ``is_fx_tracing``, which TorchRec calls."""
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Multiple backends are registered with this ProcessGroup", category=UserWarning)
    warnings.filterwarnings("ignore", message="`_get_pg_default_device` will be deprecated", category=UserWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def sharded_tables(model: nn.Module) -> TorchRecTables | None:
    """The ``TorchRecTables`` that ``shard_with_torchrec`` put into ``model``, if any."""
    return next((m.tables for m in model.modules() if isinstance(m, TorchRecLookup)), None)
