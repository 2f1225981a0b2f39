"""What every ranking model provides, and the registry that builds one from a config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import dataclass_from_dict
from kunlun.data.batches import Batch
from kunlun.errors import KunlunError


class RankingModel(nn.Module):
    """A model maps a Batch to logits [B] and reports its forward FLOPs per example by component."""

    config: Any
    info: FeatureInfo
    requires_sequence = False  # DIN, BST, InterFormer: nothing to do without a behaviour sequence

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_by_component(self) -> dict[str, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_per_example(self) -> int:
        return sum(self.flops_by_component().values())

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)]

    def dense_parameters(self) -> list[nn.Parameter]:
        emb = {id(p) for p in self.embedding_parameters()}
        return [p for p in self.parameters() if id(p) not in emb]

    def num_parameters(self) -> dict[str, int]:
        emb = sum(p.numel() for p in self.embedding_parameters())
        dense = sum(p.numel() for p in self.dense_parameters())
        return {"embedding": emb, "dense": dense, "total": emb + dense}


@dataclass
class ModelEntry:
    cls: type[RankingModel]
    config_cls: type


MODELS: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type):
    def wrap(cls):
        MODELS[name] = ModelEntry(cls, config_cls)
        return cls

    return wrap


def model_config(model: dict[str, Any]) -> Any:
    """Validate a ``model`` config section against the named model's config dataclass."""
    import kunlun.models  # noqa: F401  (registers the models)

    name = model.get("name")
    if name not in MODELS:
        raise KunlunError(f"config key model.name: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    cfg = dataclass_from_dict(MODELS[name].config_cls, {k: v for k, v in model.items() if k != "name"}, "model")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def build_model(model: dict[str, Any], info: FeatureInfo) -> RankingModel:
    cfg = model_config(model)
    entry = MODELS[model["name"]]
    if entry.cls.requires_sequence and not info.sequences:
        raise KunlunError(
            f"config key model.name: {model['name']} models a behaviour sequence and this dataset has none; "
            "choose a non-sequence model (kunlun, dnn, dcnv2, wukong, logistic_regression)"
        )
    return entry.cls(cfg, info)
