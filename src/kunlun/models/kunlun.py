"""Kunlun (Meta, "Kunlun: Establishing Scaling Laws for Massive-Scale Recommendation Systems through
Unified Architecture Design", arXiv 2602.10016, 2026).

Per layer, for every behaviour sequence:
  Transformer block: GDPA-PFFN (Q = sequence, K/V = personalised non-sequence summary, one activation
                     per head) then multi-head self-attention over the sequence (sliding window,
                     rotary encoding of log time gaps).
  Interaction block: hierarchical seed pooling (PMA + SumKronLinear) summarises the sequence; a
                     Mixture of Wukong Experts interacts the non-sequence tokens with those summaries and
                     returns the next layer's non-sequence tokens.
CompSkip alternates the work: even layers run GDPA-PFFN + a fresh summary and skip self-attention; odd
layers run self-attention and reuse the previous summary (a final summary is pooled after the last
layer when it is an odd one, so its attention output is not wasted).
Output: MLP over the last non-sequence tokens and sequence summaries → one logit.
Datasets without sequences run the non-sequence path only (stacked Wukong experts).

Every component is on by default and switchable in the config (an ablation is a config change):
``window`` (0 = full attention), ``rotary_time``, ``gdpa_activation`` (one name = same for all heads),
``seq_pooling`` (hsp | pma), ``personalized`` (False = static learned K/V), ``wukong_experts`` (1 =
a single Wukong layer), ``compskip``.

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
from kunlun.blocks.embeddings import FeatureInfo, Inputs
from kunlun.blocks.pffn import GDPAPFFN
from kunlun.blocks.summary import HierarchicalSeedPooling, NonSequenceSummary, SeedPooling
from kunlun.blocks.wukong import MixtureOfWukongExperts
from kunlun.data.batches import Batch
from kunlun.errors import KunlunError
from kunlun.models.base import RankingModel, register


@dataclass
class KunlunConfig:
    d_model: int = 32  # token width everywhere (embeddings too)
    num_layers: int = 2
    num_heads: int = 2
    summary_tokens: int = 4  # non-sequence summary tokens = K/V rows of the GDPA-PFFN
    gdpa_activation: list[str] = field(default_factory=lambda: ["silu", "gelu"])  # per head, or one for all
    personalized: bool = True  # K/V from the example's own summary; False: static learned K/V tokens
    summary_gate: bool = True
    seq_pooling: str = "hsp"  # hsp (seed pooling + SumKronLinear) | pma (seed pooling only)
    num_seeds: int = 8  # HSP stage 1 seeds
    seq_summary_tokens: int = 4  # summary tokens per sequence (HSP stage 2 output, or PMA seeds)
    kron_rank: int = 2
    window: int = 16  # sliding-window self-attention half-width; 0 = full attention
    rotary_time: bool = True  # rotary encoding of τ = log(1 + Δt / time_scale) in self-attention
    time_scale: float = 3600.0  # seconds
    rotary_base: float = 10.0
    compskip: bool = True
    wukong_experts: int = 2
    fm_rank: int = 8  # Wukong FMB low-rank projection
    fm_hidden: int = 128
    output_hidden: list[int] = field(default_factory=lambda: [128, 64])
    dropout: float = 0.0
    position_embedding: bool = True
    time_buckets: int = 16  # log2-hour time-gap buckets added to event tokens; 0 = off

    def validate(self) -> None:
        for key in ["d_model", "num_layers", "num_heads", "summary_tokens", "num_seeds", "seq_summary_tokens",
                    "kron_rank", "fm_rank", "fm_hidden", "wukong_experts"]:
            if getattr(self, key) < 1:
                raise KunlunError(f"config key model.{key}: expected a positive integer, got {getattr(self, key)}")
        if self.d_model % self.num_heads:
            raise KunlunError(
                f"config key model.num_heads: {self.num_heads} heads do not divide model.d_model={self.d_model}"
            )
        if self.rotary_time and (self.d_model // self.num_heads) % 2:
            raise KunlunError("config key model.rotary_time: needs an even head width (d_model / num_heads)")
        if self.window < 0 or self.time_buckets < 0:
            raise KunlunError("config keys model.window and model.time_buckets must be >= 0")
        if not self.time_scale > 0 or not self.rotary_base > 1:
            raise KunlunError("config keys model.time_scale must be > 0 and model.rotary_base > 1")
        if any(h < 1 for h in self.output_hidden):
            raise KunlunError(f"config key model.output_hidden: sizes must be positive, got {self.output_hidden}")
        if not 0 <= self.dropout < 1:
            raise KunlunError(f"config key model.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if len(self.gdpa_activation) not in (1, self.num_heads):
            raise KunlunError(
                f"config key model.gdpa_activation: give 1 activation or one per head ({self.num_heads}), got {len(self.gdpa_activation)}"
            )
        for a in self.gdpa_activation:
            if a not in ACTIVATIONS:
                raise KunlunError(f"config key model.gdpa_activation: unknown {a!r}; known: {', '.join(ACTIVATIONS)}")
        if self.seq_pooling not in ("hsp", "pma"):
            raise KunlunError(f"config key model.seq_pooling: expected hsp or pma, got {self.seq_pooling!r}")

    @property
    def activations(self) -> str | list[str]:
        return self.gdpa_activation[0] if len(self.gdpa_activation) == 1 else list(self.gdpa_activation)


def layer_plan(cfg: KunlunConfig, index: int) -> tuple[bool, bool, bool]:
    """(run GDPA-PFFN, run self-attention, pool a fresh summary) for layer ``index``."""
    if not cfg.compskip:
        return True, True, True
    even = index % 2 == 0
    return even, not even, even


class KunlunLayer(nn.Module):
    """x: [B, N, D]; seqs: name → ([B, L, D], mask [B, L], tau [B, L] | None); summaries: name → [B, T, D]
    (the previous layer's, reused under CompSkip) → (x', seqs', summaries')."""

    def __init__(self, cfg: KunlunConfig, index: int, n_tokens: int, seq_names: list[str], n_experts: int, last: bool):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.seq_names = cfg, seq_names
        self.use_pffn, self.use_attn, self.use_pool = layer_plan(cfg, index) if seq_names else (False, False, False)
        # an attention-only last layer pools once more after its interaction, for the output head
        self.final_pool = last and self.use_attn and not self.use_pool
        self.summary = None
        if self.use_pffn:
            if cfg.personalized:
                self.summary = NonSequenceSummary(n_tokens, cfg.summary_tokens, d, cfg.summary_gate)
            else:
                self.static_kv = nn.Parameter(torch.randn(cfg.summary_tokens, d) * 0.05)
        self.pffn = nn.ModuleDict({n: GDPAPFFN(d, cfg.num_heads, cfg.activations) for n in seq_names} if self.use_pffn else {})
        self.attn = nn.ModuleDict({n: SequenceSelfAttention(d, cfg.num_heads, cfg.window) for n in seq_names} if self.use_attn else {})
        self.pool = nn.ModuleDict({n: make_pooling(cfg) for n in seq_names} if (self.use_pool or self.final_pool) else {})
        n_in = n_tokens + len(seq_names) * cfg.seq_summary_tokens
        self.interaction = MixtureOfWukongExperts(n_in, n_tokens, n_experts, d, cfg.fm_rank, cfg.fm_hidden, cfg.dropout)

    def forward(self, x, seqs, summaries):
        if self.seq_names:
            if self.use_pffn:
                x_sum = self.summary(x) if self.summary is not None else self.static_kv.expand(x.shape[0], -1, -1)
            new_seqs, new_sums = {}, dict(summaries)
            for n in self.seq_names:
                s, mask, tau = seqs[n]
                if self.use_pffn:
                    s = self.pffn[n](s, x_sum, mask)
                if self.use_attn:
                    s = self.attn[n](s, mask, tau)
                new_seqs[n] = (s, mask, tau)
                if self.use_pool:
                    new_sums[n] = self.pool[n](s, mask)
            seqs = new_seqs
            x = self.interaction(torch.cat([x, *new_sums.values()], dim=1))
            if self.final_pool:
                new_sums = {n: self.pool[n](seqs[n][0], seqs[n][1]) for n in self.seq_names}
            return x, seqs, new_sums
        return self.interaction(x), seqs, summaries

    def flops(self, length: int) -> dict[str, int]:
        cfg = self.cfg
        out = {"interaction": self.interaction.flops()}
        if self.use_pffn:
            if self.summary is not None:
                out["nonseq_summary"] = self.summary.flops()
            out["gdpa_pffn"] = sum(m.flops(length, cfg.summary_tokens) for m in self.pffn.values())
        if self.use_attn:
            out["self_attention"] = sum(m.attn.flops(length, length) for m in self.attn.values())
        if self.use_pool or self.final_pool:
            out["seed_pooling"] = sum(m.flops(length) for m in self.pool.values())
        return out


def make_pooling(cfg: KunlunConfig) -> nn.Module:
    d = cfg.d_model
    if cfg.seq_pooling == "pma":
        return SeedPooling(d, cfg.num_heads, cfg.seq_summary_tokens)
    return HierarchicalSeedPooling(d, cfg.num_heads, cfg.num_seeds, cfg.seq_summary_tokens, cfg.kron_rank)


@register("kunlun", KunlunConfig)
class Kunlun(RankingModel):
    """Batch → logits [B]. See the module docstring for the architecture."""

    def __init__(self, cfg: KunlunConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        d = cfg.d_model
        self.inputs = Inputs(info, d, cfg.position_embedding, cfg.time_buckets)
        names = [q.name for q in info.sequences]
        n = info.n_tokens
        experts = min(cfg.wukong_experts, n)
        self.layers = nn.ModuleList(KunlunLayer(cfg, i, n, names, experts, i == cfg.num_layers - 1) for i in range(cfg.num_layers))
        out_in = (n + len(names) * cfg.seq_summary_tokens) * d
        self.output = MLP([out_in, *cfg.output_hidden, 1], act="relu", dropout=cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        cfg = self.config
        x, embedded = self.inputs(batch)
        seqs = {n: (s, mask, torch.log1p(gap / cfg.time_scale) if cfg.rotary_time else None) for n, (s, mask, gap) in embedded.items()}
        summaries: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            x, seqs, summaries = layer(x, seqs, summaries)
        flat = torch.cat([x.flatten(1), *(v.flatten(1) for v in summaries.values())], dim=1)
        return self.output(flat).squeeze(-1)

    def flops_by_component(self) -> dict[str, int]:
        total = {"tokens": self.inputs.flops()}
        for layer in self.layers:
            for k, v in layer.flops(self.info.max_len).items():
                total[k] = total.get(k, 0) + v
        total["output"] = self.output.flops()
        return total

