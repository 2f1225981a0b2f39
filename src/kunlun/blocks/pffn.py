"""GDPA-PFFN: Kunlun's personalised feed-forward network over the sequence, written as attention.

InterFormer's PFFN multiplies each sequence by a per-example weight matrix generated from the
non-sequence summary. Kunlun rewrites it as GDPA cross-attention with Q = the sequence tokens and
K, V = projections of the T summary tokens: act(S·Kᵀ)·V is exactly a per-example two-layer FFN of
hidden width T·H whose input weights are K and output weights are V. Block (Meta's fused form):

    q_n = LayerNorm(s)
    h   = GDPA(q_n, K, V) + q_n
    out = RMSNorm(h) + s
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import RMSNorm, linear_flops
from kunlun.formats.gemm import MatMul
from kunlun.ops.attention import activation_heads, gdpa_heads


class GDPAPFFN(nn.Module):
    """s: [B, L, D], summary: [B, T, D_kv], mask: [B, L] bool → [B, L, D], padding slots 0. D_kv defaults to D
    (a narrower event sequence under event-level personalisation reads the full-width summary). Each slot is
    transformed on its own: the mask only zeroes the padding slots, and ``zero_padding=False`` leaves them as
    computed (for a caller that never reads them: one multiply fewer each way)."""

    def __init__(self, dim: int, heads: int, act: str | list[str] = "silu", kv_dim: int | None = None,
                 zero_padding: bool = True):
        super().__init__()
        self.zero_padding = zero_padding
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.act = dim, heads, act
        # which heads use which activation, built once (not a tensor made from a list in every forward)
        self.register_buffer("head_mask", activation_heads(act, heads), persistent=False)
        self.kv_dim = kv_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.k = nn.Linear(self.kv_dim, dim)
        self.v = nn.Linear(self.kv_dim, dim)
        self.norm_out = RMSNorm(dim)
        self.matmul = MatMul()

    def forward(self, s: torch.Tensor, summary: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q_n = self.norm_q(s)
        h = gdpa_heads(q_n, self.k(summary), self.v(summary), self.heads, self.act, matmul=self.matmul.emulated_or_none(),
                       head_mask=self.head_mask) + q_n
        out = self.norm_out(h) + s
        return out * mask.unsqueeze(-1) if self.zero_padding else out

    def flops(self, length: int, summary_tokens: int) -> int:
        return linear_flops(summary_tokens, self.kv_dim, 2 * self.dim) + 2 * 2 * length * summary_tokens * self.dim
