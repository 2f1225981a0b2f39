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
from kunlun.models import flop_count


class RankingModel(nn.Module):
    """A model maps a Batch to logits [B] and reports its forward FLOPs per example by component.

    FLOPs come in two kinds (docs/models.md#flops; matrix products only, 2 per multiply-add). *Useful* FLOPs are analytic,
    the model's work: ``flops_by_component`` at each example's real token counts (``token_counts``;
    ``useful_flops_per_example`` averages them over batches), i.e. what a jagged kernel would compute; at
    ``lengths=None`` the same formulas over every padded slot (a sliding window still counted as its band).
    *Executed* FLOPs are counted, not declared: the aten ops one real forward dispatches on the selected op
    implementation (``executed_flops_per_example``, ``kunlun.models.flop_count``) — every padded slot, and all the
    pairs a dense masked attention kernel scores (the blocked band: 3b keys per query). HFU is built on executed
    FLOPs, MFU and scaling compute on useful ones."""

    config: ModelConfig
    info: FeatureInfo
    requires_sequence = False  # DIN, BST, InterFormer: nothing to do without a behaviour sequence
    # the per-event-type windows a batch must carry: sequence name → event-type indices (Batcher(event_windows=...))
    event_windows: dict[str, tuple[int, ...]] = {}

    def forward(self, batch: Batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:  # pragma: no cover - abstract
        """Analytic forward FLOPs of one example by component. ``lengths``: real tokens per key of ``token_counts``
        (useful FLOPs of an example with those lengths); None: the same formulas at every padded slot (what the
        kernels execute beyond that is counted, not declared: ``executed_flops_per_example``)."""
        raise NotImplementedError

    def flops_per_example(self, lengths: dict[str, int] | None = None) -> int:
        """Analytic forward FLOPs of one example: at ``lengths`` real tokens (useful), or every padded slot (None)."""
        return sum(self.flops_by_component(lengths).values())

    def executed_flops_per_example(self, batch: Batch) -> float:
        """Executed forward FLOPs per example, counted from the ops one forward on ``batch`` dispatches (its padded
        length, the op implementation selected now) ÷ its size; counted once per configuration and batch shape."""
        return flop_count.executed_flops_per_example(self, batch)

    def config_notes(self) -> list[str]:
        """One line each for a configuration key that has no effect, or not the effect its name suggests, on this
        data set's features (the trainer logs them when the run starts). [] when every key does what it says."""
        return []

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
