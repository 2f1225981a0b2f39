"""Embedding tables split by rows over the ranks of a data-parallel run (``train.embedding_sharding=row``), with plain
``torch.distributed`` collectives.

Each vocabulary table (the ``EmbeddingTables`` of a model) becomes a ``RowShardedEmbedding``: rank r keeps rows
[r·c, min((r + 1)·c, R)), c = ⌈R / W⌉, as a DTensor sharded on dim 0 — so a distributed checkpoint records which rows
each rank has, and resumes at any world size (one process included), and the optimizer's state for a row lives
where the row does. A lookup gathers every rank's ids (all-gather), each rank fills in the rows it owns, and one
all-reduce gives every rank its vectors (exactly: every entry has one non-zero term). The backward all-gathers the
output gradients and each rank adds those of its own rows, divided by W: the other parameters' gradients are
averaged by DDP over a loss scaled W / N, so the table's gradient is the same global-batch mean.

What it costs: the all-reduce moves every rank's looked-up vectors to every rank (W × the vectors of one batch), the
price of two collectives that gloo has; TorchRec's all-to-all layouts (``train.embedding_sharding=torchrec``) move
each vector once. What it saves: a table of R rows takes R / W rows of memory per rank, and its optimizer state too.
Small tables that are not vocabularies (a model's time-gap buckets) stay replicated with the dense part.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from kunlun.blocks.embeddings import EmbeddingTables


class _RowLookup(torch.autograd.Function):
    """ids [n] (this rank's), local rows [r, D] → vectors [n, D]; a collective: every rank calls it together."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, local: torch.Tensor, lo: int, padding_idx: int | None, world: int):
        n = torch.tensor([ids.numel()], device=ids.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros(max(sizes), dtype=ids.dtype, device=ids.device)
        padded[: ids.numel()] = ids
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        every = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
        owned = (every >= lo) & (every < lo + local.shape[0])
        vectors = local.new_zeros(every.numel(), local.shape[1])
        vectors[owned] = local[every[owned] - lo]
        dist.all_reduce(vectors)
        rank = dist.get_rank()
        start = sum(sizes[:rank])
        ctx.save_for_backward(every, owned)
        ctx.meta = (sizes, start, lo, padding_idx, world, local.shape)
        return vectors[start : start + ids.numel()].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        every, owned = ctx.saved_tensors
        sizes, _, lo, padding_idx, world, shape = ctx.meta
        padded = grad.new_zeros(max(sizes), grad.shape[1])
        padded[: grad.shape[0]] = grad
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous())
        grads = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
        if padding_idx is not None:
            owned = owned & (every != padding_idx)  # nn.Embedding's padding row gets no gradient
        local = grad.new_zeros(shape)
        local.index_add_(0, every[owned] - lo, grads[owned])
        return None, local / world, None, None, None


class RowShardedEmbedding(nn.Embedding):
    """``nn.Embedding`` with its rows split over the ranks (see the module docstring): ids of any shape → [..., D],
    as the table it replaces, and a collective (every rank looks up together, in the same order).

    Example::

        sharded = RowShardedEmbedding(nn.Embedding(1000, 16, padding_idx=0), mesh)   # under torchrun, 2 ranks
        vectors = sharded(torch.tensor([[3, 999], [0, 5]]))                           # [2, 2, 16]
    """

    def __init__(self, table: nn.Embedding, mesh):
        from torch.distributed.tensor import Shard, distribute_tensor

        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim, self.padding_idx = table.num_embeddings, table.embedding_dim, table.padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        # every rank built the same table from the seed: each keeps its own rows (no communication)
        self.weight = nn.Parameter(distribute_tensor(table.weight.detach(), mesh, [Shard(0)], src_data_rank=None))
        self.world = mesh.size()
        rows = math.ceil(self.num_embeddings / self.world)
        self.lo = min(self.num_embeddings, mesh.get_local_rank() * rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = _RowLookup.apply(ids.reshape(-1), self.weight.to_local(), self.lo, self.padding_idx, self.world)
        return vectors.reshape(*ids.shape, self.embedding_dim)


def shard_rows(model: nn.Module, device: torch.device) -> list[str]:
    """Replace every vocabulary table of ``model`` by a ``RowShardedEmbedding`` over all ranks; the names of their
    weights (to keep them out of DDP, which would average and overwrite the shards)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, EmbeddingTables):
            for key, table in list(module.items()):
                if type(table) is nn.Embedding:
                    nn.ModuleDict.__setitem__(module, key, RowShardedEmbedding(table, mesh))
                    names.append(f"{prefix}.{key}.weight" if prefix else f"{key}.weight")
    return names


def clip_sharded_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over replicated parameters and row-sharded ones together: the squares of the
    shards are summed over the ranks (one all-reduce), those of replicated parameters counted once."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
    zero = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    shard_sq = sum((g.float().square().sum() for g in sharded), zero.clone())
    dist.all_reduce(shard_sq)
    total = torch.sqrt(sum((g.float().square().sum() for g in replicated), zero.clone()) + shard_sq)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in replicated + sharded:
        g.mul_(coef.to(g.dtype))
    return total
