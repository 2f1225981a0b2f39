"""Attention blocks: softmax multi-head attention (projections, rotary time, sliding window) over the
attention ops of ``kunlun.ops.attention`` (reference and fast paths behind one call)."""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import linear_flops
from kunlun.formats.gemm import MatMul
from kunlun.ops.attention import band_pairs, rotary, softmax_attention


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, D] → [..., H, L, D/H]."""
    *lead, length, d = x.shape
    return x.reshape(*lead, length, heads, d // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, dh] → [B, L, H·dh]."""
    b, h, length, dh = x.shape
    return x.transpose(1, 2).reshape(b, length, h * dh)


class MultiHeadAttention(nn.Module):
    """Softmax multi-head attention with key padding mask and optional sliding window.

    query: [B, Lq, D] (projected by W_q), or [Lq, D] learned queries used as is (shared by the batch);
    kv: [B, Lk, D]; key_mask: [B, Lk] bool → [B, Lq, D]. Queries with no visible key output 0.
    """

    def __init__(self, dim: int, heads: int, project_query: bool = True, window: int = 0, rotary_base: float = 10.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.window, self.rotary_base = dim, heads, window, rotary_base
        self.q = nn.Linear(dim, dim) if project_query else None
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.matmul = MatMul()

    def forward(self, query: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
        """``tau`` [B, L] (self-attention only): continuous rotary positions applied to q and k."""
        q = split_heads(self.q(query) if self.q is not None else query, self.heads)
        k, v = split_heads(self.k(kv), self.heads), split_heads(self.v(kv), self.heads)
        if tau is not None:
            q, k = rotary(tau, self.rotary_base, q, k)
        return self.o(merge_heads(softmax_attention(q, k, v, key_mask, self.window, self.matmul.emulated_or_none())))

    def flops(self, lq: int, lk: int) -> int:
        f = linear_flops(lk, self.dim, 2 * self.dim) + linear_flops(lq, self.dim, self.dim)  # k, v, o
        if self.q is not None:
            f += linear_flops(lq, self.dim, self.dim)
        # the model's work: the (query, key) pairs inside the band (the fast paths execute more: a dense
        # masked kernel all L², the blocked one 3b keys per query)
        pairs = band_pairs(lk, self.window) if self.window else lq * lk
        return f + 2 * 2 * pairs * self.dim  # scores and weighted values, all heads


class SequenceSelfAttention(nn.Module):
    """Pre-norm residual self-attention over a sequence: s + MHA(LN(s)). [B, L, D], mask [B, L],
    optional rotary positions tau [B, L] → [B, L, D]. ``rotary_base``: θ_i = base^(-2i/dh) of the rotary encoding.
    The attention output of a padding slot (a query) is zeroed, unless ``zero_padding=False`` (for a caller that
    never reads padding slots: one multiply fewer each way); padding keys are masked either way."""

    def __init__(self, dim: int, heads: int, window: int = 0, rotary_base: float = 10.0, zero_padding: bool = True):
        super().__init__()
        self.zero_padding = zero_padding
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, window=window, rotary_base=rotary_base)

    def forward(self, s: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(s)
        a = self.attn(h, h, mask, tau)
        return s + (a * mask.unsqueeze(-1) if self.zero_padding else a)

    def flops(self, length: int) -> int:
        return self.attn.flops(length, length)
