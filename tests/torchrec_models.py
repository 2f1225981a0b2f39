"""Every model with its tables in TorchRec against the same model with plain ``nn.Embedding`` tables, in one process
with a process group of one (gloo): ``python -m torch.distributed.run --standalone --nproc-per-node 1
tests/torchrec_models.py``, run by tests/test_distributed.py where TorchRec is installed.

Each model's TorchRec twin (``shard_with_torchrec`` on a copy) must give the same logits on a batch with every kind of
lookup (categorical fields, behaviour sequences with padding, per-event-type windows, candidate tokens with their
out-of-vocabulary side features), and after one backward its fused SGD (Adagrad) must leave the tables where a plain
SGD (Adagrad) step on the plain model's table gradients puts them. Prints ``torchrec models ok`` at the end.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import load_config, model_from_dict
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.models import build_model
from kunlun.training.torchrec_sharding import ADAGRAD_EPS, shard_with_torchrec

LR = 0.5
MODELS = [{"name": "dnn"}, {"name": "dcnv2"}, {"name": "wukong"}, {"name": "din"}, {"name": "bst"}, {"name": "interformer"},
          {"name": "kunlun"}, {"name": "kunlun", "event_split": True, "stream_window": "own", "target_in_sequence": False}]


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    p = prepare_dataset("ml-latest-small")
    info = FeatureInfo.from_encoder(p.encoder(), 9)
    batch = Batcher(p, "valid", 9, event_windows=True).batch(np.arange(64))
    for spec, optimizer in [(spec, "sgd") for spec in MODELS] + [(MODELS[-1], "adagrad")]:
        t = load_config(None, ["train.embedding_sharding=torchrec", f"train.embedding_optimizer={optimizer}",
                               f"train.embedding_lr={LR}"]).train
        torch.manual_seed(0)
        plain = build_model(model_from_dict(spec), info)
        twin = copy.deepcopy(plain)
        tables = shard_with_torchrec(twin, t, torch.device("cpu"))
        torch.manual_seed(1)  # the same dropout draws: the TorchRec lookup draws none
        a = plain(batch)
        torch.manual_seed(1)
        b = twin(batch)
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, s=spec: f"{s}: logits differ: {m}")
        a.sum().backward()
        b.sum().backward()  # fused SGD: the tables move in the backward
        with torch.no_grad():
            for key in tables.keys:
                weight = plain.inputs.tables[key].weight
                g = weight.grad
                expected = weight - LR * (g if optimizer == "sgd" else g / (g.square().sqrt() + ADAGRAD_EPS))
                got = twin.state_dict()[f"inputs.tables.{key}.weight"].local_shards()[0].tensor
                torch.testing.assert_close(got, expected, msg=lambda m, s=spec, k=key: f"{s}: table {k} after one step: {m}")
        print(spec, optimizer, "ok:", len(tables.keys), "tables")
    print("torchrec models ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
