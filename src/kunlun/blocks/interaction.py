"""Feature-interaction blocks of the classical CTR models: DCNv2 cross network, DIN's target attention."""

from __future__ import annotations

import torch
from torch import nn

from kunlun.blocks.common import linear_flops
from kunlun.formats.gemm import MatMul


class CrossNetV2(nn.Module):
    """DCN-V2 cross network (Wang et al., "DCN V2", arXiv 2008.13535), full-rank form:
    x_{l+1} = x_0 ⊙ (W_l·x_l + b_l) + x_l. x: [B, F] → [B, F]."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.dim = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x

    def flops(self) -> int:
        return len(self.layers) * linear_flops(1, self.dim, self.dim)


class Dice(nn.Module):
    """DIN's data-adaptive activation: p(s)·s + (1 − p(s))·α·s, p = σ(BN(s)) (Zhou et al., arXiv 1706.06978).
    x: [..., D], optional ``mask`` [...] bool → [..., D]. The batch-norm statistics (training) are taken over the rows
    ``mask`` marks — a history's real events, not its padding slots — and fold into the running ones as
    ``nn.BatchNorm1d`` folds them (momentum, unbiased variance); evaluation reads the running statistics."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        if mask is None or not self.training:
            p = torch.sigmoid(self.bn(x.reshape(-1, shape[-1]))).reshape(shape)
            return p * x + (1 - p) * self.alpha * x
        w = mask.reshape(-1, 1).to(x.dtype)  # [N, 1]: the rows the statistics are taken over
        flat = x.reshape(-1, shape[-1])
        n = w.sum()
        mean = (flat * w).sum(0) / n.clamp(min=1)
        var = ((flat - mean).square() * w).sum(0) / n.clamp(min=1)
        with torch.no_grad():  # as nn.BatchNorm1d: momentum update, unbiased variance
            m = self.bn.momentum
            self.bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.bn.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
            self.bn.num_batches_tracked.add_(1)
        p = torch.sigmoid((flat - mean) / torch.sqrt(var + self.bn.eps)).reshape(shape)
        return p * x + (1 - p) * self.alpha * x


class TargetAttention(nn.Module):
    """DIN's local activation unit: weight each history token by an MLP of
    [h, t, h − t, h ⊙ t] (no softmax: the weights keep the intensity of interest) and sum.
    history: [B, L, D], target: [B, D], mask: [B, L] → [B, D]."""

    def __init__(self, dim: int, hidden: list[int]):
        super().__init__()
        dims = [4 * dim, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(Dice(b) for b in hidden)
        self.out = nn.Linear(dims[-1], 1)
        self.dims = [*dims, 1]
        self.dim = dim
        self.matmul = MatMul()

    def forward(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.unsqueeze(1).expand_as(history)
        h = torch.cat([history, t, history - t, history * t], dim=-1)
        for layer, act in zip(self.layers, self.acts):
            h = act(layer(h), mask)  # batch statistics over the real events only
        w = self.out(h).squeeze(-1) * mask.to(history.dtype)  # [B, L]
        return self.matmul(w.unsqueeze(1), history).squeeze(1)

    def flops(self, length: int) -> int:
        mlp = sum(linear_flops(length, a, b) for a, b in zip(self.dims[:-1], self.dims[1:]))
        return mlp + 2 * length * self.dim  # + the weighted sum
