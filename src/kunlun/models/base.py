"""What every ranking model provides, and the table (``MODELS``) each model module registers itself in.

Building a model from a config is ``kunlun.models.registry``, which imports every model module first. A model's
config class (its keys, defaults and checks) is in ``kunlun.model_configs``, below the models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.data.batches import Batch
from kunlun.model_configs import ModelConfig


class RankingModel(nn.Module):
    """A model maps a Batch to logits [B] and reports its forward FLOPs per example by component.

    FLOPs come in two kinds. *Executed* FLOPs (``lengths=None``) count every padded sequence slot, as the
    dense kernels compute them; *useful* FLOPs count only the real tokens of each example
    (``token_counts``), i.e. what a jagged kernel would compute. They differ only for sequence models."""

    config: ModelConfig
    info: FeatureInfo
    requires_sequence = False  # DIN, BST, InterFormer: nothing to do without a behaviour sequence
    # the per-event-type windows a batch must carry: sequence name → event-type indices (Batcher(event_windows=...))
    event_windows: dict[str, tuple[int, ...]] = {}

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:  # pragma: no cover - abstract
        """Forward FLOPs of one example by component. ``lengths``: real tokens per key of ``token_counts``
        (useful FLOPs of an example with those lengths); None: every padded slot (executed FLOPs)."""
        raise NotImplementedError

    def flops_per_example(self, lengths: dict[str, int] | None = None) -> int:
        return sum(self.flops_by_component(lengths).values())

    def token_counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Real (unpadded) tokens per example, by the keys ``flops_by_component`` reads: here the real
        events of each behaviour sequence. {} for a model whose FLOPs do not depend on sequence lengths."""
        return {}

    def useful_flops_per_example(self, batches) -> float:
        """Mean useful forward FLOPs per example over ``batches`` (an iterable of Batch): the analytic count
        evaluated at each example's own sequence lengths (grouped by distinct lengths, so it costs one
        evaluation per distinct combination, not per example)."""
        import numpy as np

        counts: dict[tuple, int] = {}
        keys: list[str] = []
        n = 0
        for batch in batches:
            tc = self.token_counts(batch)
            keys = sorted(tc)
            n += len(batch)
            if not keys:  # no sequence-length term: useful = executed
                break
            rows, freq = np.unique(np.stack([tc[k].cpu().numpy() for k in keys], axis=1), axis=0, return_counts=True)
            for row, c in zip(map(tuple, rows.tolist()), freq.tolist()):
                counts[row] = counts.get(row, 0) + c
        if not counts:
            return float(self.flops_per_example())
        total = sum(c * self.flops_per_example(dict(zip(keys, row))) for row, c in counts.items())
        return total / max(n, 1)

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
    config_cls: type[ModelConfig]


MODELS: dict[str, ModelEntry] = {}


def register(config_cls: type[ModelConfig]):
    """Register the decorated model as the one built from ``config_cls`` (under its ``name``)."""

    def wrap(cls):
        MODELS[config_cls.name] = ModelEntry(cls, config_cls)
        return cls

    return wrap
