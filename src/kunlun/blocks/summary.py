"""Summaries that cross between the two sides of a layer.

* ``NonSequenceSummary`` — personalised weight generation: the N non-sequence tokens are compressed to
  T tokens (LCE, a learned linear map over the token axis), passed through a token-wise MLP and gated,
  X_sum = Gating(Z) with Z = MLP(LCE(X)). X_sum supplies K/V of the GDPA-PFFN, so each example's
  sequence is transformed with weights derived from its own context.
* ``SelfGate`` — the Gating of a summary, one of ``GATES``: ``interformer`` = σ(Z ⊙ MLP(Z)), InterFormer's
  Cross-Arch gating (arXiv 2411.09852, section 4.4) that the Kunlun design note carries over;
  ``glu`` = Z ⊙ σ(W·Z), a GLU-style self-gate (this project's earlier choice); ``none`` = Z.
* ``SeedPooling`` (PMA) — sequence → S tokens: learned seeds attend over the sequence.
* ``HierarchicalSeedPooling`` — PMA with many seeds, then ``SumKronLinear`` compresses the seed outputs
  to fewer tokens (Kunlun's replacement for InterFormer's PMA).
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.attention import MultiHeadAttention
from kunlun.blocks.common import MLP, linear_flops
from kunlun.formats.gemm import MatMul
from kunlun.model_configs import GATES  # the gate names a config may give live with the configs


class LinearCompress(nn.Module):
    """LCE: a learned linear map over the token axis. [B, N, D] → [B, T, D]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.n_in, self.n_out = n_in, n_out
        self.matmul = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(self.weight, x, ("weights", "activations"))

    def flops(self, dim: int) -> int:
        return 2 * self.n_out * self.n_in * dim


class SelfGate(nn.Module):
    """Gating of summary tokens, z: [..., D] → [..., D] (forms: see the module docstring).

    ``interformer``: σ(z ⊙ MLP(z)), MLP = D → D → D with GELU (the output is in (0, 1));
    ``glu``: z ⊙ σ(W·z + b); ``none``: z.
    """

    def __init__(self, dim: int, form: str = "interformer"):
        super().__init__()
        if form not in GATES:
            raise ValueError(f"unknown gate {form!r}; known: {', '.join(GATES)}")
        self.form, self.dim = form, dim
        self.mlp = MLP([dim, dim, dim], act="gelu") if form == "interformer" else None
        self.linear = nn.Linear(dim, dim) if form == "glu" else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            return torch.sigmoid(z * self.mlp(z))
        if self.linear is not None:
            return z * torch.sigmoid(self.linear(z))
        return z

    def flops(self, tokens: int) -> int:
        if self.mlp is not None:
            return self.mlp.flops(tokens)
        return linear_flops(tokens, self.dim, self.dim) if self.linear is not None else 0


class NonSequenceSummary(nn.Module):
    """X: [B, N, D] → X_sum = Gating(MLP(LCE(X))): [B, T, D]. ``gate``: one of ``GATES``."""

    def __init__(self, n_tokens: int, out_tokens: int, dim: int, gate: str = "interformer"):
        super().__init__()
        self.lce = LinearCompress(n_tokens, out_tokens)
        self.mlp = MLP([dim, 2 * dim, dim], act="gelu")
        self.gate = SelfGate(dim, gate)
        self.dim, self.out_tokens = dim, out_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.mlp(self.lce(x)))

    def flops(self) -> int:
        return self.lce.flops(self.dim) + self.mlp.flops(self.out_tokens) + self.gate.flops(self.out_tokens)


class SumKronLinear(nn.Module):
    """Low-rank Kronecker-structured token compression: Y_b = Σ_{i=1..k} Z_iᵀ · X_b · W_i.

    X: [B, S, D] → Y: [B, T, D]; Z_i: [S, T], W_i: [D, D]. Parameters k·(S·T + D²) instead of the
    S·T·D² of a dense map.
    """

    def __init__(self, n_in: int, n_out: int, dim: int, rank: int):
        super().__init__()
        self.z = nn.Parameter(torch.randn(rank, n_in, n_out) / n_in**0.5)
        self.w = nn.Parameter(torch.randn(rank, dim, dim) / (dim * rank) ** 0.5)
        self.n_in, self.n_out, self.dim, self.rank = n_in, n_out, dim, rank
        self.matmul = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[0], self.rank
        zx = self.matmul(self.z.transpose(1, 2), x.unsqueeze(1), ("weights", "activations"))  # Z_iᵀ·X_b: [B, k, T, D]
        # Σ_i (Z_iᵀ X_b) W_i is one GEMM with reduction over (i, d): [B, T, k·D] · [k·D, D]
        return self.matmul(zx.transpose(1, 2).reshape(b, self.n_out, k * self.dim), self.w.reshape(k * self.dim, self.dim),
                           ("activations", "weights"))

    def flops(self) -> int:
        return 2 * self.rank * self.n_out * (self.n_in * self.dim + self.dim * self.dim)


class SeedPooling(nn.Module):
    """PMA, pooling by multi-head attention (Lee et al., Set Transformer): S learned seeds attend over
    the sequence. s: [B, L, D], mask: [B, L] → LN(seeds + MHA(seeds, LN(s))): [B, S, D].
    The seeds are the queries directly (a query projection of a learned vector adds nothing)."""

    def __init__(self, dim: int, heads: int, seeds: int):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(seeds, dim) * 0.05)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, project_query=False)
        self.norm = nn.LayerNorm(dim)
        self.n_seeds = seeds

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.seeds + self.attn(self.seeds, self.norm_kv(s), mask))

    def flops(self, length: int) -> int:
        return self.attn.flops(self.n_seeds, length)


class HierarchicalSeedPooling(nn.Module):
    """s: [B, L, D], mask: [B, L] → [B, T, D]. Stage 1: PMA with S seeds; stage 2: SumKronLinear S → T."""

    def __init__(self, dim: int, heads: int, seeds: int, out_tokens: int, rank: int):
        super().__init__()
        self.pool = SeedPooling(dim, heads, seeds)
        self.compress = SumKronLinear(seeds, out_tokens, dim, rank)

    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.compress(self.pool(s, mask))

    def flops(self, length: int) -> int:
        return self.pool.flops(length) + self.compress.flops()
