"""DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale
Learning to Rank Systems", WWW 2021, arXiv 2008.13535): a full-rank cross network and a deep MLP in
parallel over the concatenated embeddings, their outputs concatenated into a linear logit layer.
Sequences enter as one mean-pooled token each."""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import MLP, linear_flops
from kunlun.blocks.embeddings import FeatureInfo, Inputs
from kunlun.blocks.interaction import CrossNetV2
from kunlun.data.batches import Batch
from kunlun.model_configs import DCNv2Config
from kunlun.models.base import RankingModel, register
from kunlun.models.dnn import pooled_tokens


@register(DCNv2Config)
class DCNv2(RankingModel):
    """Batch → logits [B] (parallel structure)."""

    def __init__(self, cfg: DCNv2Config, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        self.inputs = Inputs(info, cfg.d_model, embedding_std=cfg.embedding_std)
        width = (info.n_tokens + len(info.sequences)) * cfg.d_model
        self.cross = CrossNetV2(width, cfg.cross_layers)
        self.deep = MLP([width, *cfg.hidden], dropout=cfg.dropout, last_activation=True, batch_norm=cfg.batch_norm)
        self.head = nn.Linear(width + cfg.hidden[-1], 1)
        self.width = width

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = pooled_tokens(self.inputs, batch).flatten(1)
        return self.head(torch.cat([self.cross(x0), self.deep(x0)], dim=1)).squeeze(-1)

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:  # no sequence-length term
        return {"tokens": self.inputs.flops(), "cross": self.cross.flops(), "deep": self.deep.flops(),
                "head": linear_flops(1, self.width + self.config.hidden[-1], 1)}
