"""BST, Behavior Sequence Transformer (Chen et al., "Behavior Sequence Transformer for E-commerce
Recommendation in Alibaba", DLP-KDD 2019, arXiv 1905.06874): the history plus the candidate item as
the last position, with a time-based position embedding (pos = t_candidate − t_event, bucketed), go
through a Transformer layer (multi-head self-attention and a LeakyReLU feed-forward, each with residual
+ LayerNorm); the flattened outputs and the other embeddings feed an MLP with LeakyReLU.

History and candidate tokens come from the block every sequence model shares (``EventTokens``): the
same projection of item, event type and side features; the time-gap bucket is BST's position (the
paper's only positional signal, so no learned position embedding); the candidate gets a "candidate"
event type and gap 0. ``target_in_sequence=false`` leaves the candidate out of the sequence (it is still a
non-sequence field): for ablations, not the paper's model. ``position_embedding`` and ``rotary_time`` (both off, as in
the paper) give BST the other history inputs Kunlun gets: a learned position embedding, and the rotary encoding of
log time gaps in self-attention."""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.attention import MultiHeadAttention
from kunlun.blocks.common import MLP
from kunlun.blocks.embeddings import FeatureInfo, Inputs, append_candidate, time_positions
from kunlun.data.batches import Batch
from kunlun.model_configs import BSTConfig
from kunlun.models.base import RankingModel, register
from kunlun.ops.dropout import Dropout


class TransformerLayer(nn.Module):
    """Post-norm Transformer layer as in BST. s: [B, L, D], mask: [B, L] → [B, L, D]."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float, rotary_base: float = 10.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, rotary_base=rotary_base)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = MLP([dim, ffn_mult * dim, dim], act="leaky_relu")
        self.drop = Dropout(dropout)

    def forward(self, s: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
        """``tau`` [B, L]: rotary positions (``rotary_time``), else None."""
        s = self.norm1(s + self.drop(self.attn(s, s, mask, tau)))
        return self.norm2(s + self.drop(self.ffn(s)))

    def flops(self, length: int) -> int:
        return self.attn.flops(length, length) + self.ffn.flops(length)


@register(BSTConfig)
class BST(RankingModel):
    """Batch → logits [B]."""

    requires_sequence = True

    def __init__(self, cfg: BSTConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        d = cfg.d_model
        self.inputs = Inputs(info, d, positions=cfg.position_embedding, time_buckets=cfg.time_buckets, candidates=cfg.target_in_sequence)
        self.blocks = nn.ModuleDict(
            {q.name: nn.ModuleList(TransformerLayer(d, cfg.num_heads, cfg.ffn_mult, cfg.dropout, cfg.rotary_base)
                                   for _ in range(cfg.num_layers))
             for q in info.sequences}
        )
        width = (info.n_tokens + len(info.sequences) * (info.max_len + int(cfg.target_in_sequence))) * d
        self.mlp = MLP([width, *cfg.hidden, 1], act="leaky_relu", dropout=cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        x, seqs = self.inputs(batch)
        targets = self.inputs.candidate_tokens(batch) if self.config.target_in_sequence else {}
        outs = [x.flatten(1)]
        for n, (s, m, gap) in seqs.items():
            if self.config.target_in_sequence:
                s, m, gap = append_candidate(s, m, gap, targets[n])
            tau = time_positions(gap, self.config.time_scale) if self.config.rotary_time else None
            for layer in self.blocks[n]:
                s = layer(s, m, tau) * m.unsqueeze(-1)
            outs.append(s.flatten(1))
        return self.mlp(torch.cat(outs, dim=1)).squeeze(-1)

    def token_counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {n: s.mask.sum(1) for n, s in batch.seqs.items() if n in self.blocks}

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:
        target = int(self.config.target_in_sequence)
        real = lambda n: (self.info.max_len if lengths is None else lengths[n]) + target  # noqa: E731  (+ the candidate)
        # the MLP reads every (flattened) sequence slot; only the real ones carry data
        width = (self.info.n_tokens + sum(real(n) for n in self.blocks)) * self.config.d_model
        return {"tokens": self.inputs.flops(lengths),
                "transformer": sum(layer.flops(real(n)) for n, layers in self.blocks.items() for layer in layers),
                "mlp": self.mlp.flops(d_in=width)}
