"""Logistic regression on the non-sequence features: logit = b + Σ_f w_f[x_f] + wᵀ·numeric.

One weight per (field, value): one-hot encoding of every categorical field, as in the classical CTR
baseline (BARS "LR"). Behaviour sequences are not used.
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.data.batches import Batch
from kunlun.model_configs import LogisticRegressionConfig
from kunlun.models.base import RankingModel, register


@register(LogisticRegressionConfig)
class LogisticRegression(RankingModel):
    """Batch → logits [B]."""

    def __init__(self, cfg: LogisticRegressionConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        self.weights = nn.ModuleList(nn.Embedding(info.vocab_sizes[v], 1, padding_idx=0) for v in info.cat_vocabs)
        for w in self.weights:
            nn.init.zeros_(w.weight)
        self.dense = nn.Linear(info.n_numeric, 1, bias=False) if info.n_numeric else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> torch.Tensor:
        logit = self.bias + sum(w(batch.cat[:, i]).squeeze(-1) for i, w in enumerate(self.weights))
        if self.dense is not None:
            logit = logit + self.dense(batch.num).squeeze(-1)
        return logit

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:  # no sequence-length term
        return {"linear": 2 * self.info.n_numeric}
