"""Attention: softmax multi-head attention and GDPA (generalised dot-product attention).

Both are plain PyTorch reference implementations (explicit matmuls, so the FLOP counter sees them);
fused kernels, when added, must match these in parity tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kunlun.blocks.common import activation, linear_flops
from kunlun.formats.gemm import MatMul


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


def rotary(x: torch.Tensor, tau: torch.Tensor, base: float = 10.0) -> torch.Tensor:
    """Rotary encoding with continuous positions: rotate channel pairs of x by angle τ·θ_i, θ_i = base^(-2i/dh).

    x: [B, H, L, dh] (dh even); tau: [B, L] float → [B, H, L, dh]. Used with τ = log(1 + Δt / t_scale)
    (rotary temporal encoding of log time gaps): q·k then depends on the difference of the two events' τ.
    """
    dh = x.shape[-1]
    theta = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)  # [dh/2]
    angle = (tau.float()[:, None, :, None] * theta).to(x.dtype)  # [B, 1, L, dh/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def head_activation(scores: torch.Tensor, act: str | list[str]) -> torch.Tensor:
    """Element-wise activation of scores [B, H, Lq, Lk]; ``act`` one name, or one name per head."""
    if isinstance(act, str):
        return activation(act)(scores)
    if len(act) != scores.shape[1]:
        raise ValueError(f"{len(act)} activations given for {scores.shape[1]} heads")
    return torch.stack([activation(a)(scores[:, h]) for h, a in enumerate(act)], dim=1)


def gdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, act: str | list[str] = "silu", scale: float | None = None,
    key_mask: torch.Tensor | None = None, matmul: MatMul | None = None,
) -> torch.Tensor:
    """Generalised dot-product attention, reference implementation.

    O = (act(Q·Kᵀ) · scale) · V — the softmax is replaced by an element-wise activation (one for all
    heads, or one per head) and rows are not normalised. q: [B, H, Lq, dh]; k, v: [B, H, Lk, dh];
    key_mask: [B, Lk] bool or None → [B, H, Lq, dh]. ``scale`` defaults to 1/√dh. ``matmul``: the calling module's
    MatMul, so both products run in that module's precision (plain ``torch.matmul`` when None).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    matmul = matmul or torch.matmul
    a = head_activation(matmul(q, k.transpose(-1, -2)), act) * scale
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    return matmul(a, v)


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
            q, k = rotary(q, tau, self.rotary_base), rotary(k, tau, self.rotary_base)
        if self.banded(query.shape[-2], kv.shape[1]):
            return self.o(merge_heads(self._banded(q, k, v, key_mask)))
        scores = self.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dim // self.heads)  # [B, H, Lq, Lk]
        visible = key_mask[:, None, None, :]
        if self.window:
            visible = visible & window_mask(kv.shape[1], self.window, kv.device)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * visible.to(scores.dtype)
        return self.o(merge_heads(self.matmul(attn, v)))

    def banded(self, lq: int, lk: int) -> bool:
        """Sliding-window self-attention computes only the band when the band is narrower than L."""
        return bool(self.window) and lq == lk and 2 * self.window + 1 < lk

    def _banded(self, q, k, v, key_mask):
        """Band-only attention: each query i scores keys i−W … i+W. q, k, v: [B, H, L, dh] → [B, H, L, dh].
        Same result as full attention with ``window_mask`` (tested); FLOPs ∝ L·(2W+1) instead of L²."""
        w = self.window
        width = 2 * w + 1
        kw = nn.functional.pad(k, (0, 0, w, w)).unfold(2, width, 1)  # [B, H, L, dh, 2W+1]
        vw = nn.functional.pad(v, (0, 0, w, w)).unfold(2, width, 1)
        mw = nn.functional.pad(key_mask, (w, w)).unfold(1, width, 1)[:, None]  # [B, 1, L, 2W+1]
        scores = self.matmul(q.unsqueeze(-2), kw).squeeze(-2) / math.sqrt(q.shape[-1])  # [B, H, L, 2W+1]
        scores = scores.masked_fill(~mw, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1) * mw.to(scores.dtype)
        return self.matmul(attn.unsqueeze(-2), vw.transpose(-1, -2)).squeeze(-2)

    def flops(self, lq: int, lk: int) -> int:
        f = linear_flops(lk, self.dim, 2 * self.dim) + linear_flops(lq, self.dim, self.dim)  # k, v, o
        if self.q is not None:
            f += linear_flops(lq, self.dim, self.dim)
        keys = 2 * self.window + 1 if self.banded(lq, lk) else lk
        return f + 2 * 2 * lq * keys * self.dim  # scores and weighted values, all heads


class SequenceSelfAttention(nn.Module):
    """Pre-norm residual self-attention over a sequence: s + MHA(LN(s)). [B, L, D], mask [B, L],
    optional rotary positions tau [B, L] → [B, L, D]. ``rotary_base``: θ_i = base^(-2i/dh) of the rotary encoding."""

    def __init__(self, dim: int, heads: int, window: int = 0, rotary_base: float = 10.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, window=window, rotary_base=rotary_base)

    def forward(self, s: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(s)
        return s + self.attn(h, h, mask, tau) * mask.unsqueeze(-1)

    def flops(self, length: int) -> int:
        return self.attn.flops(length, length)
