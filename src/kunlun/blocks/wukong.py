"""Wukong interaction layer (Zhang et al., "Wukong: Towards a Scaling Law for Large-Scale
Recommendation", arXiv 2403.02545): Y = LN(concat(FMB(X), LCB(X)) + residual(X)).

* FMB (factorisation machine block), optimised form: X·(Xᵀ·P) with a learned low-rank projection
  P: [N, r] — pairwise interactions at cost O(N·D·r) — then flatten → LN → MLP → n_fmb tokens.
* LCB (linear compression block): a learned linear recombination of the N tokens into n_lcb tokens.
* The residual is X itself when n_fmb + n_lcb = N, else a learned linear map over the token axis.
Stacking l layers captures interactions up to order 2^l. Kunlun's global interaction uses this layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import MLP
from kunlun.blocks.summary import LinearCompress
from kunlun.formats.gemm import MatMul


class WukongLayer(nn.Module):
    """X: [B, N, D] → [B, n_fmb + n_lcb, D]."""

    def __init__(self, n_in: int, n_fmb: int, n_lcb: int, dim: int, rank: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.n_in, self.n_fmb, self.n_lcb, self.dim, self.rank = n_in, n_fmb, n_lcb, dim, rank
        self.proj = nn.Parameter(torch.randn(n_in, rank) / n_in**0.5)
        self.fm_norm = nn.LayerNorm(n_in * rank)
        self.fm_mlp = MLP([n_in * rank, hidden, n_fmb * dim], act="relu", dropout=dropout)
        self.lcb = LinearCompress(n_in, n_lcb) if n_lcb else None
        n_out = n_fmb + n_lcb
        self.residual = LinearCompress(n_in, n_out) if n_out != n_in else None
        self.norm = nn.LayerNorm(dim)
        self.matmul = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xtp = self.matmul(x.transpose(1, 2), self.proj, ("activations", "weights"))  # Xᵀ·P: [B, D, r]
        fm = self.matmul(x, xtp)  # X·(Xᵀ·P): [B, N, r]
        fmb = self.fm_mlp(self.fm_norm(fm.reshape(b, -1))).reshape(b, self.n_fmb, self.dim)
        out = torch.cat([fmb, self.lcb(x)], dim=1) if self.lcb is not None else fmb
        res = self.residual(x) if self.residual is not None else x
        return self.norm(out + res)

    def flops(self) -> int:
        f = 2 * 2 * self.n_in * self.dim * self.rank + self.fm_mlp.flops()
        f += self.lcb.flops(self.dim) if self.lcb is not None else 0
        return f + (self.residual.flops(self.dim) if self.residual is not None else 0)


def split_counts(total: int, parts: int) -> list[int]:
    """``total`` items into ``parts`` near-equal counts (the first ones one larger)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class MixtureOfWukongExperts(nn.Module):
    """Kunlun's global interaction: E Wukong experts over interleaved partitions of the tokens.

    X: [B, N, D] → [B, n_out, D]. Expert e sees tokens e, e+E, e+2E, … (so each mixes fields and sequence
    summaries) and produces its share of the n_out output tokens. E = 1 is a single Wukong layer.
    Cost per expert shrinks with its partition: the FM and MLP terms scale with (N/E)².
    """

    def __init__(self, n_in: int, n_out: int, experts: int, dim: int, rank: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        if experts > min(n_in, n_out):
            raise ValueError(f"{experts} experts for {n_in} input / {n_out} output tokens: at most one token each")
        self.experts_n = experts
        outs = split_counts(n_out, experts)
        self.index = [list(range(e, n_in, experts)) for e in range(experts)]
        self.experts = nn.ModuleList(
            WukongLayer(len(idx), max(1, o // 2), o - max(1, o // 2), dim, rank, hidden, dropout) for idx, o in zip(self.index, outs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts_n == 1:
            return self.experts[0](x)
        # tokens e, e + E, …: a strided view (a list index would make an index tensor from Python data each call)
        return torch.cat([ex(x[:, e::self.experts_n]) for e, ex in enumerate(self.experts)], dim=1)

    def flops(self) -> int:
        return sum(ex.flops() for ex in self.experts)
