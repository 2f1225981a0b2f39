"""Wukong (Zhang et al., "Wukong: Towards a Scaling Law for Large-Scale Recommendation", ICML 2024,
arXiv 2403.02545): embeddings → a stack of Wukong layers (FMB + LCB, residual, LayerNorm) → MLP.
The layer is the same block Kunlun uses for its global interaction. Sequences enter as one mean-pooled
token each."""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import MLP
from kunlun.blocks.embeddings import FeatureInfo, Inputs
from kunlun.blocks.wukong import WukongLayer
from kunlun.data.batches import Batch
from kunlun.model_configs import WukongConfig
from kunlun.models.base import RankingModel, register
from kunlun.models.dnn import pooled_tokens


@register(WukongConfig)
class Wukong(RankingModel):
    """Batch → logits [B]."""

    def __init__(self, cfg: WukongConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        self.inputs = Inputs(info, cfg.d_model)
        n = info.n_tokens + len(info.sequences)
        layers = []
        for _ in range(cfg.num_layers):
            layers.append(WukongLayer(n, cfg.fmb_tokens, cfg.lcb_tokens, cfg.d_model, cfg.fm_rank, cfg.fm_hidden, cfg.dropout))
            n = cfg.fmb_tokens + cfg.lcb_tokens
        self.layers = nn.ModuleList(layers)
        self.mlp = MLP([n * cfg.d_model, *cfg.hidden, 1], dropout=cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = pooled_tokens(self.inputs, batch)
        for layer in self.layers:
            x = layer(x)
        return self.mlp(x.flatten(1)).squeeze(-1)

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:  # no sequence-length term
        return {"tokens": self.inputs.flops(), "interaction": sum(m.flops() for m in self.layers), "mlp": self.mlp.flops()}
