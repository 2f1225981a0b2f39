"""DNN (the "deep" CTR baseline of Covington et al., RecSys 2016, as in the BARS benchmark): embeddings of
all fields concatenated and fed to an MLP. Behaviour sequences, when present, enter as one mean-pooled
token (the usual treatment of sequence features in non-sequential CTR models)."""

from __future__ import annotations

import torch

from kunlun.blocks.common import MLP
from kunlun.blocks.embeddings import FeatureInfo, Inputs, masked_mean
from kunlun.data.batches import Batch
from kunlun.model_configs import DNNConfig
from kunlun.models.base import RankingModel, register


def pooled_tokens(inputs: Inputs, batch: Batch) -> torch.Tensor:
    """Non-sequence tokens plus one mean-pooled token per sequence: [B, N + n_seq, D]."""
    x, seqs = inputs(batch)
    return torch.cat([x, *(masked_mean(s, m).unsqueeze(1) for s, m, _ in seqs.values())], dim=1)


@register(DNNConfig)
class DNN(RankingModel):
    """Batch → logits [B]."""

    def __init__(self, cfg: DNNConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        self.inputs = Inputs(info, cfg.d_model, embedding_std=cfg.embedding_std)
        n_tokens = info.n_tokens + len(info.sequences)
        self.mlp = MLP([n_tokens * cfg.d_model, *cfg.hidden, 1], dropout=cfg.dropout, batch_norm=cfg.batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.mlp(pooled_tokens(self.inputs, batch).flatten(1)).squeeze(-1)

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:  # no sequence-length term
        return {"tokens": self.inputs.flops(), "mlp": self.mlp.flops()}
