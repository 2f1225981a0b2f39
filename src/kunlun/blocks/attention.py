"""Attention: softmax multi-head attention and GDPA (generalised dot-product attention).

Both are plain PyTorch reference implementations (explicit matmuls, so the FLOP counter sees them);
fused kernels, when added, must match these in parity tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kunlun.blocks.common import activation, linear_flops


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, D] → [..., H, L, D/H]."""
    *lead, length, d = x.shape
    return x.reshape(*lead, length, heads, d // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, dh] → [B, L, H·dh]."""
    b, h, length, dh = x.shape
    return x.transpose(1, 2).reshape(b, length, h * dh)


def window_mask(length: int, window: int, device=None) -> torch.Tensor:
    """[L, L] bool, True where |i - j| <= window (sliding-window attention)."""
    i = torch.arange(length, device=device)
    return (i[:, None] - i[None, :]).abs() <= window


def gdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, act: str = "silu", scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised dot-product attention, reference implementation.

    O = (act(Q·Kᵀ) · scale) · V — the softmax is replaced by an element-wise activation and rows are not
    normalised. q: [B, H, Lq, dh]; k, v: [B, H, Lk, dh]; key_mask: [B, Lk] bool or None → [B, H, Lq, dh].
    ``scale`` defaults to 1/√dh.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    a = activation(act)(q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    return a @ v


class MultiHeadAttention(nn.Module):
    """Softmax multi-head attention with key padding mask and optional sliding window.

    query: [B, Lq, D] (projected by W_q), or [Lq, D] learned queries used as is (shared by the batch);
    kv: [B, Lk, D]; key_mask: [B, Lk] bool → [B, Lq, D]. Queries with no visible key output 0.
    """

    def __init__(self, dim: int, heads: int, project_query: bool = True, window: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.window = dim, heads, window
        self.q = nn.Linear(dim, dim) if project_query else None
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(query) if self.q is not None else query, self.heads)
        k, v = split_heads(self.k(kv), self.heads), split_heads(self.v(kv), self.heads)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.dim // self.heads)  # [B, H, Lq, Lk]
        visible = key_mask[:, None, None, :]
        if self.window:
            visible = visible & window_mask(kv.shape[1], self.window, kv.device)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * visible.to(scores.dtype)
        return self.o(merge_heads(attn @ v))

    def flops(self, lq: int, lk: int) -> int:
        f = linear_flops(lk, self.dim, 2 * self.dim) + linear_flops(lq, self.dim, self.dim)  # k, v, o
        if self.q is not None:
            f += linear_flops(lq, self.dim, self.dim)
        return f + 2 * 2 * lq * lk * self.dim  # scores and weighted values, all heads


class SequenceSelfAttention(nn.Module):
    """Pre-norm residual self-attention over a sequence: s + MHA(LN(s)). [B, L, D] → [B, L, D]."""

    def __init__(self, dim: int, heads: int, window: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, window=window)

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(s)
        return s + self.attn(h, h, mask) * mask.unsqueeze(-1)

    def flops(self, length: int) -> int:
        return self.attn.flops(length, length)
