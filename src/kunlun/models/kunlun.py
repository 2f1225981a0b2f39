"""Kunlun (Meta, "Kunlun: Establishing Scaling Laws for Massive-Scale Recommendation Systems through
Unified Architecture Design", arXiv 2602.10016, 2026) — first complete version.

Per layer, for every behaviour sequence:
  Transformer block: GDPA-PFFN (Q = sequence, K/V = personalised non-sequence summary) then
                     multi-head self-attention over the sequence.
  Interaction block: hierarchical seed pooling summarises the sequence into a few tokens; a Wukong
                     layer interacts the non-sequence tokens with those summaries (global interaction)
                     and returns the next layer's non-sequence tokens.
Output: MLP over the last non-sequence tokens and sequence summaries → one logit.
Datasets without sequences run the non-sequence path only (stacked Wukong layers).

Choices the paper leaves open, made here: one token width ``d_model`` everywhere; the candidate item
enters as a non-sequence token (so the sequence is conditioned on it through the summary K/V);
several sequences get their own blocks and concatenate their summaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kunlun.blocks.attention import SequenceSelfAttention
from kunlun.blocks.common import ACTIVATIONS, MLP
from kunlun.blocks.embeddings import EventTokens, FeatureInfo, FeatureTokens, embedding_tables
from kunlun.blocks.pffn import GDPAPFFN
from kunlun.blocks.summary import HierarchicalSeedPooling, NonSequenceSummary
from kunlun.blocks.wukong import WukongLayer
from kunlun.data.batches import Batch
from kunlun.errors import KunlunError
from kunlun.models.base import RankingModel, register


@dataclass
class KunlunConfig:
    d_model: int = 32  # token width everywhere (embeddings too)
    num_layers: int = 2
    num_heads: int = 2
    summary_tokens: int = 4  # non-sequence summary tokens = K/V rows of the GDPA-PFFN
    gdpa_activation: str = "silu"
    summary_gate: bool = True
    num_seeds: int = 8  # hierarchical seed pooling, stage 1
    seq_summary_tokens: int = 4  # stage 2 output tokens per sequence
    kron_rank: int = 2
    window: int = 0  # sliding-window self-attention half-width; 0 = full attention
    fm_rank: int = 8  # Wukong FMB low-rank projection
    fm_hidden: int = 128
    output_hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    position_embedding: bool = True
    time_buckets: int = 16  # log2-hour time-gap buckets added to event tokens; 0 = off

    def validate(self) -> None:
        for key in ["d_model", "num_layers", "num_heads", "summary_tokens", "num_seeds", "seq_summary_tokens",
                    "kron_rank", "fm_rank", "fm_hidden"]:
            if getattr(self, key) < 1:
                raise KunlunError(f"config key model.{key}: expected a positive integer, got {getattr(self, key)}")
        if self.d_model % self.num_heads:
            raise KunlunError(
                f"config key model.num_heads: {self.num_heads} heads do not divide model.d_model={self.d_model}"
            )
        if self.window < 0 or self.time_buckets < 0:
            raise KunlunError("config keys model.window and model.time_buckets must be >= 0")
        if any(h < 1 for h in self.output_hidden):
            raise KunlunError(f"config key model.output_hidden: sizes must be positive, got {self.output_hidden}")
        if not 0 <= self.dropout < 1:
            raise KunlunError(f"config key model.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if self.gdpa_activation not in ACTIVATIONS:
            raise KunlunError(
                f"config key model.gdpa_activation: unknown {self.gdpa_activation!r}; known: {', '.join(ACTIVATIONS)}"
            )


class KunlunLayer(nn.Module):
    """x: [B, N, D]; seqs: name → ([B, L, D], mask [B, L]) → (x' [B, N, D], seqs', summaries name → [B, T, D])."""

    def __init__(self, cfg: KunlunConfig, n_tokens: int, seq_names: list[str]):
        super().__init__()
        d = cfg.d_model
        self.seq_names = seq_names
        self.summary = NonSequenceSummary(n_tokens, cfg.summary_tokens, d, cfg.summary_gate) if seq_names else None
        self.pffn = nn.ModuleDict({n: GDPAPFFN(d, cfg.num_heads, cfg.gdpa_activation) for n in seq_names})
        self.attn = nn.ModuleDict({n: SequenceSelfAttention(d, cfg.num_heads, cfg.window) for n in seq_names})
        self.pool = nn.ModuleDict(
            {n: HierarchicalSeedPooling(d, cfg.num_heads, cfg.num_seeds, cfg.seq_summary_tokens, cfg.kron_rank) for n in seq_names}
        )
        n_in = n_tokens + len(seq_names) * cfg.seq_summary_tokens
        n_fmb = max(1, n_tokens // 2)
        self.interaction = WukongLayer(n_in, n_fmb, n_tokens - n_fmb, d, cfg.fm_rank, cfg.fm_hidden, cfg.dropout)

    def forward(self, x, seqs):
        summaries = {}
        if self.seq_names:
            x_sum = self.summary(x)
            new = {}
            for n in self.seq_names:
                s, mask = seqs[n]
                s = self.attn[n](self.pffn[n](s, x_sum, mask), mask)
                new[n] = (s, mask)
                summaries[n] = self.pool[n](s, mask)
            seqs = new
        x = self.interaction(torch.cat([x, *summaries.values()], dim=1))
        return x, seqs, summaries

    def flops(self, length: int, summary_tokens: int) -> dict[str, int]:
        out = {"interaction": self.interaction.flops()}
        if self.seq_names:
            out["nonseq_summary"] = self.summary.flops()
            out["gdpa_pffn"] = sum(self.pffn[n].flops(length, summary_tokens) for n in self.seq_names)
            out["self_attention"] = sum(self.attn[n].flops(length) for n in self.seq_names)
            out["seed_pooling"] = sum(self.pool[n].flops(length) for n in self.seq_names)
        return out


@register("kunlun", KunlunConfig)
class Kunlun(RankingModel):
    """Batch → logits [B]. See the module docstring for the architecture."""

    def __init__(self, cfg: KunlunConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        d = cfg.d_model
        self.tables = embedding_tables(info, d)
        self.features = FeatureTokens(info, d)
        self.events = nn.ModuleDict(
            {q.name: EventTokens(q, d, d, info.max_len, cfg.time_buckets, cfg.position_embedding) for q in info.sequences}
        )
        names = [q.name for q in info.sequences]
        n = info.n_tokens
        self.layers = nn.ModuleList(KunlunLayer(cfg, n, names) for _ in range(cfg.num_layers))
        out_in = (n + len(names) * cfg.seq_summary_tokens) * d
        self.output = MLP([out_in, *cfg.output_hidden, 1], act="relu", dropout=cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.features(self.tables, batch.cat, batch.num)
        seqs = {n: (self.events[n](self.tables, s), s.mask) for n, s in batch.seqs.items() if n in self.events}
        summaries = {}
        for layer in self.layers:
            x, seqs, summaries = layer(x, seqs)
        flat = torch.cat([x.flatten(1), *(v.flatten(1) for v in summaries.values())], dim=1)
        return self.output(flat).squeeze(-1)

    def flops_by_component(self) -> dict[str, int]:
        total = {"tokens": self.features.flops() + sum(e.flops() for e in self.events.values())}
        for layer in self.layers:
            for k, v in layer.flops(self.info.max_len, self.config.summary_tokens).items():
                total[k] = total.get(k, 0) + v
        total["output"] = self.output.flops()
        return total
