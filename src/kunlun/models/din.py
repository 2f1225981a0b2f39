"""DIN (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018,
arXiv 1706.06978): the history is pooled by target attention — each event weighted by an activation
unit MLP of (event, candidate, difference, product), without softmax normalisation — and concatenated
with the other embeddings into an MLP with Dice activations.

As in the paper, the activation unit compares two embeddings of the same kind: each behaviour's token
and the candidate's token come from one block (``EventTokens``) — the same projection of item and side
features, the candidate with a "candidate" event type and time gap 0. History tokens carry the same
inputs as in the other sequence models (time-gap bucket and position embeddings; ``time_buckets=0``
and ``position_embedding=false`` give the paper's id-only inputs). ``target_in_sequence`` (off by default: the
paper pools the history only; the quality benchmark turns it on, for input parity) also puts the candidate's token
among the pooled ones, as Kunlun's newest stream token."""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import linear_flops
from kunlun.blocks.embeddings import FeatureInfo, Inputs, append_candidate
from kunlun.blocks.interaction import Dice, TargetAttention
from kunlun.data.batches import Batch
from kunlun.model_configs import DINConfig
from kunlun.models.base import RankingModel, register
from kunlun.ops.dropout import Dropout


@register(DINConfig)
class DIN(RankingModel):
    """Batch → logits [B]."""

    requires_sequence = True

    def __init__(self, cfg: DINConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        d = cfg.d_model
        self.inputs = Inputs(info, d, cfg.position_embedding, cfg.time_buckets, candidates=True)
        self.attention = nn.ModuleDict({q.name: TargetAttention(d, cfg.attention_hidden) for q in info.sequences})
        dims = [(info.n_tokens + len(info.sequences)) * d, *cfg.hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(Dice(b) for b in cfg.hidden)
        self.drop = Dropout(cfg.dropout)
        self.out = nn.Linear(dims[-1], 1)
        self.dims = [*dims, 1]

    def forward(self, batch: Batch) -> torch.Tensor:
        x, seqs = self.inputs(batch)
        targets = self.inputs.candidate_tokens(batch)
        pooled = []
        for n, (s, m, gap) in seqs.items():
            if self.config.target_in_sequence:  # the candidate among the pooled tokens too (Kunlun's input)
                s, m, _ = append_candidate(s, m, gap, targets[n])
            pooled.append(self.attention[n](s, targets[n], m))
        h = torch.cat([x.flatten(1), *pooled], dim=1)
        for layer, act in zip(self.layers, self.acts):
            h = self.drop(act(layer(h)))
        return self.out(h).squeeze(-1)

    def token_counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {n: s.mask.sum(1) for n, s in batch.seqs.items() if n in self.attention}

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:
        target = int(self.config.target_in_sequence)
        real = lambda n: (self.info.max_len if lengths is None else lengths[n]) + target  # noqa: E731
        return {"tokens": self.inputs.flops(lengths), "target_attention": sum(a.flops(real(n)) for n, a in self.attention.items()),
                "mlp": sum(linear_flops(1, a, b) for a, b in zip(self.dims[:-1], self.dims[1:]))}
