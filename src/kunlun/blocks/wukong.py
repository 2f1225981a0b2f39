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


class WukongLayer(nn.Module):
    """X: [B, N, D] → [B, n_fmb + n_lcb, D]."""

    def __init__(self, n_in: int, n_fmb: int, n_lcb: int, dim: int, rank: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.n_in, self.n_fmb, self.n_lcb, self.dim, self.rank = n_in, n_fmb, n_lcb, dim, rank
        self.proj = nn.Parameter(torch.randn(n_in, rank) / n_in**0.5)
        self.fm_norm = nn.LayerNorm(n_in * rank)
        self.fm_mlp = MLP([n_in * rank, hidden, n_fmb * dim], act="relu", dropout=dropout)
        self.lcb = LinearCompress(n_in, n_lcb)
        n_out = n_fmb + n_lcb
        self.residual = LinearCompress(n_in, n_out) if n_out != n_in else None
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xtp = torch.einsum("bnd,nr->bdr", x, self.proj)  # Xᵀ·P
        fm = torch.einsum("bnd,bdr->bnr", x, xtp)  # X·(Xᵀ·P): [B, N, r]
        fmb = self.fm_mlp(self.fm_norm(fm.reshape(b, -1))).reshape(b, self.n_fmb, self.dim)
        out = torch.cat([fmb, self.lcb(x)], dim=1)
        res = self.residual(x) if self.residual is not None else x
        return self.norm(out + res)

    def flops(self) -> int:
        f = 2 * 2 * self.n_in * self.dim * self.rank + self.fm_mlp.flops() + self.lcb.flops(self.dim)
        return f + (self.residual.flops(self.dim) if self.residual is not None else 0)
