"""InterFormer (Zeng et al., "InterFormer: Effective Heterogeneous Interaction Learning for
Click-Through Rate Prediction", arXiv 2411.09852): Kunlun's predecessor.

Per layer, three arches with bidirectional information flow:
  Cross Arch:       X_sum = Gating(MLP(LCE(X))) summarises the non-sequence side for the sequence;
                    S_sum = Gating([CLS tokens, PMA tokens, K most recent tokens]) summarises the
                    sequence for the non-sequence side; Gating(Z) = σ(Z ⊙ MLP(Z)) per token, the
                    paper's form (section 4.4; ``summary_gate=glu``: Z ⊙ σ(W·Z), ``none``).
  Interaction Arch: the non-sequence tokens interact with S_sum — a DHEN-style layer of DOT (all
                    pairwise inner products) and DCN (cross network) modules, projected back to the N
                    non-sequence tokens, with residual and LayerNorm.
  Sequence Arch:    PFFN then multi-head self-attention; PFFN(X_sum, S) = S·W(X_sum), a per-example
                    D×D matrix generated from X_sum (a batched per-sample matmul — the op Kunlun
                    replaces with GDPA). The paper applies rotary position embeddings; here, as in
                    Kunlun, the rotary positions are log time gaps τ = log(1 + Δt / time_scale) (CLS
                    tokens at τ = 0; ``rotary_time=false`` turns it off).
Output: MLP over the last layer's non-sequence tokens and sequence summary.
``target_in_sequence`` (off by default, as in the paper, where the candidate is a non-sequence field; the quality
benchmark turns it on, for input parity) also
appends the candidate item as the newest sequence token, at time gap 0, built as Kunlun builds it
(``EventTokens.candidate``): the input Kunlun gets, for a comparison of architectures on the same inputs.

Shared with Kunlun: embeddings and history tokens (item, event type, side features, time-gap bucket,
position; ``EventTokens``), the non-sequence summary (LCE + MLP + gate), PMA, self-attention with
rotary time. Choices of ours where the paper leaves room: token width ``d_model`` everywhere; CLS
tokens are learned and prepended once at the input (the paper prepends X_sum of the first layer);
PFFN has a residual connection.
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.attention import SequenceSelfAttention
from kunlun.blocks.common import MLP, linear_flops
from kunlun.blocks.embeddings import FeatureInfo, Inputs, append_candidate, time_positions
from kunlun.blocks.interaction import CrossNetV2
from kunlun.blocks.summary import NonSequenceSummary, SeedPooling, SelfGate
from kunlun.data.batches import Batch
from kunlun.formats.gemm import MatMul
from kunlun.model_configs import InterFormerConfig
from kunlun.models.base import RankingModel, register


class PersonalizedFFN(nn.Module):
    """InterFormer's PFFN: s + s·W_b with W_b = reshape(Linear(flatten(X_sum))) ∈ R^{D×D} per example.
    s: [B, L, D], x_sum: [B, T, D], mask [B, L] → [B, L, D]."""

    def __init__(self, summary_tokens: int, dim: int):
        super().__init__()
        self.generate = nn.Linear(summary_tokens * dim, dim * dim)
        nn.init.normal_(self.generate.weight, std=0.02 / dim**0.5)
        self.dim, self.tokens = dim, summary_tokens
        self.matmul = MatMul()

    def forward(self, s: torch.Tensor, x_sum: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.generate(x_sum.flatten(1)).view(-1, self.dim, self.dim)
        return (s + self.matmul(s, w)) * mask.unsqueeze(-1)

    def flops(self, length: int) -> int:
        return linear_flops(1, self.tokens * self.dim, self.dim * self.dim) + linear_flops(length, self.dim, self.dim)


class SequenceSummary(nn.Module):
    """Cross Arch, sequence side: gated [CLS outputs, PMA tokens, most recent tokens].
    s: [B, n_cls + L, D] (CLS first), mask → [B, n_cls + n_pma + K, D]."""

    def __init__(self, cfg: InterFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.pma = SeedPooling(cfg.d_model, cfg.num_heads, cfg.pma_tokens)
        self.gate = SelfGate(cfg.d_model, cfg.summary_gate)

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c, k = self.cfg.cls_tokens, self.cfg.recent_tokens
        recent = s[:, -k:] * mask[:, -k:, None]  # a sequence shorter than K: its padded slots contribute zeros
        return self.gate(torch.cat([s[:, :c], self.pma(s, mask), recent], dim=1))

    def flops(self, length: int) -> int:
        return self.pma.flops(length) + self.gate.flops(self.cfg.seq_summary_tokens)


class DHENInteraction(nn.Module):
    """Interaction Arch: DOT + DCN over Z = [X; S_sum] → N tokens, + X, LayerNorm.
    x: [B, N, D], s_sum: [B, T, D] → [B, N, D]."""

    def __init__(self, n_tokens: int, seq_tokens: int, dim: int, cross_layers: int):
        super().__init__()
        self.n, self.nz, self.dim = n_tokens, n_tokens + seq_tokens, dim
        # a buffer, so it moves with the module (a plain attribute stays on the CPU: a copy and a sync each step)
        self.register_buffer("pairs", torch.triu_indices(self.nz, self.nz, offset=1), persistent=False)
        self.cross = CrossNetV2(self.nz * dim, cross_layers)
        self.combine = nn.Linear(self.pairs.shape[1] + self.nz * dim, n_tokens * dim)
        self.norm = nn.LayerNorm(dim)
        self.matmul = MatMul()

    def forward(self, x: torch.Tensor, s_sum: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, s_sum], dim=1)
        dots = self.matmul(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        mixed = self.combine(torch.cat([dots, self.cross(z.flatten(1))], dim=1))
        return self.norm(x + mixed.view(-1, self.n, self.dim))

    def flops(self) -> int:
        return 2 * self.nz * self.nz * self.dim + self.cross.flops() + linear_flops(1, self.combine.in_features, self.combine.out_features)


@register(InterFormerConfig)
class InterFormer(RankingModel):
    """Batch → logits [B]."""

    requires_sequence = True

    def __init__(self, cfg: InterFormerConfig, info: FeatureInfo):
        super().__init__()
        self.config, self.info = cfg, info
        d, n = cfg.d_model, info.n_tokens
        names = [q.name for q in info.sequences]
        self.inputs = Inputs(info, d, cfg.position_embedding, cfg.time_buckets, candidates=cfg.target_in_sequence)
        self.cls = nn.ParameterDict({q: nn.Parameter(torch.randn(cfg.cls_tokens, d) * 0.05) for q in names})
        t = len(names) * cfg.seq_summary_tokens
        self.x_summary = nn.ModuleList(NonSequenceSummary(n, cfg.summary_tokens, d, cfg.summary_gate) for _ in range(cfg.num_layers))
        self.s_summary = nn.ModuleList(
            nn.ModuleDict({q: SequenceSummary(cfg) for q in names}) for _ in range(cfg.num_layers + 1)
        )
        self.interaction = nn.ModuleList(DHENInteraction(n, t, d, cfg.cross_layers) for _ in range(cfg.num_layers))
        self.pffn = nn.ModuleList(nn.ModuleDict({q: PersonalizedFFN(cfg.summary_tokens, d) for q in names}) for _ in range(cfg.num_layers))
        self.attn = nn.ModuleList(
            nn.ModuleDict({q: SequenceSelfAttention(d, cfg.num_heads, rotary_base=cfg.rotary_base) for q in names})
            for _ in range(cfg.num_layers)
        )
        self.output = MLP([(n + t) * d, *cfg.output_hidden, 1], dropout=cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        cfg = self.config
        x, embedded = self.inputs(batch)
        candidates = self.inputs.candidate_tokens(batch) if cfg.target_in_sequence else {}
        seqs, taus = {}, {}
        for q, (s, m, gap) in embedded.items():
            if cfg.target_in_sequence:  # the candidate as the newest token, at time gap 0 (Kunlun's input)
                s, m, gap = append_candidate(s, m, gap, candidates[q])
            cls = self.cls[q].expand(s.shape[0], -1, -1)
            c = cls.shape[1]
            seqs[q] = (torch.cat([cls, s], dim=1), torch.cat([torch.ones_like(m[:, :c]), m], dim=1))
            if cfg.rotary_time:  # CLS tokens sit at the request time, τ = 0
                taus[q] = torch.cat([torch.zeros_like(gap[:, :c]), time_positions(gap, cfg.time_scale)], dim=1)
        for i in range(cfg.num_layers):
            x_sum = self.x_summary[i](x)
            s_sum = torch.cat([self.s_summary[i][q](s, m) for q, (s, m) in seqs.items()], dim=1)
            x = self.interaction[i](x, s_sum)
            seqs = {q: (self.attn[i][q](self.pffn[i][q](s, x_sum, m), m, taus.get(q)), m) for q, (s, m) in seqs.items()}
        s_sum = torch.cat([self.s_summary[-1][q](s, m) for q, (s, m) in seqs.items()], dim=1)
        return self.output(torch.cat([x.flatten(1), s_sum.flatten(1)], dim=1)).squeeze(-1)

    def token_counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {n: s.mask.sum(1) for n, s in batch.seqs.items() if n in self.cls}

    def flops_by_component(self, lengths: dict[str, int] | None = None) -> dict[str, int]:
        extra = self.config.cls_tokens + int(self.config.target_in_sequence)  # CLS tokens and the candidate slot
        real = lambda q: (self.info.max_len if lengths is None else lengths[q]) + extra  # noqa: E731
        layers = range(self.config.num_layers)
        return {
            "tokens": self.inputs.flops(lengths),
            "nonseq_summary": sum(m.flops() for m in self.x_summary),
            "seq_summary": sum(m.flops(real(q)) for d in self.s_summary for q, m in d.items()),
            "interaction": sum(m.flops() for m in self.interaction),
            "pffn": sum(m.flops(real(q)) for i in layers for q, m in self.pffn[i].items()),
            "self_attention": sum(m.flops(real(q)) for i in layers for q, m in self.attn[i].items()),
            "output": self.output.flops(),
        }
