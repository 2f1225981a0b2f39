"""Does TorchRec's DistributedModelParallel, with its planner, shard a table row-wise and train on this machine's
CPUs over gloo? Run by tests/test_distributed.py (skipped where TorchRec is not installed) as
``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrec_probe.py``.

An EmbeddingCollection of one 100 × 8 table, planned and sharded row-wise over 2 ranks (fused kernel, fused SGD),
each rank looking up its own ids; a forward and a backward, then every rank checks that the rows it holds moved by
−lr × the gradient of all the ids of both ranks / world size. Prints ``torchrec probe ok`` on rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

LR = 0.5


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tables = [EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=100, feature_names=["item"])]
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints={"item": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])})
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    sharder = EmbeddingCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    plan = planner.collective_plan(EmbeddingCollection(tables=tables, device=torch.device("meta")), [sharder], dist.GroupMember.WORLD)
    assert plan.plan[""]["item"].sharding_type == ShardingType.ROW_WISE.value
    torch.manual_seed(0)
    model = DistributedModelParallel(EmbeddingCollection(tables=tables, device=torch.device("meta")), device=torch.device("cpu"),
                                     plan=plan, sharders=[sharder])
    before = {k: v for k, v in model.state_dict().items()}["embeddings.item.weight"]
    local_before = before.local_shards()[0].tensor.clone()
    offset = before.local_shards()[0].metadata.shard_offsets[0]
    ids = {0: torch.tensor([1, 2, 70, 2]), 1: torch.tensor([70, 99, 3])}
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=ids[rank], lengths=torch.ones(len(ids[rank]), dtype=torch.int64))
    out = model(kjt)["item"].values()
    weights = torch.arange(1, len(ids[rank]) + 1, dtype=torch.float32)[:, None]
    (out * weights).sum().backward()  # fused SGD: the rows are updated in the backward
    after = model.state_dict()["embeddings.item.weight"].local_shards()[0].tensor
    expected = torch.zeros(100, 8)
    for i in ids.values():
        expected.index_add_(0, i, torch.arange(1, len(i) + 1, dtype=torch.float32)[:, None].expand(-1, 8))
    rows = slice(offset, offset + local_before.shape[0])
    # TorchRec divides embedding gradients by the world size (its default gradient division), as DDP averages dense
    # ones: the same convention as kunlun's row sharding
    torch.testing.assert_close(after, local_before - LR * expected[rows] / world)
    dist.barrier()
    if rank == 0:
        print("torchrec probe ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
