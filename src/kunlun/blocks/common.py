"""Small shared pieces: MLP, activations, RMSNorm, and the FLOP convention.

FLOP convention (used by every block's ``flops``): forward FLOPs per example = 2 × the multiply-adds
of matrix products (linear layers, attention score and value products, einsums). Element-wise work
(activations, norms, softmax, bias adds) and embedding lookups count 0. This is the convention of
``torch.utils.flop_counter.FlopCounterMode`` and of MFU accounting; training FLOPs = 3 × forward.
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.ops.activations import ACTIVATIONS, activation  # noqa: F401  (re-exported for the blocks)
from kunlun.ops.dropout import Dropout


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


class MLP(nn.Module):
    """Stack of Linear (→ batch norm) → activation (→ dropout); the last layer is linear unless ``last_activation``.

    ``batch_norm``: a ``BatchNorm1d`` after every activated Linear, before its activation — the order of
    FuxiCTR's ``MLP_Block`` used by the BARS baselines. Inputs must then be [B, dims[0]].
    Shapes: [..., dims[0]] → [..., dims[-1]].
    """

    def __init__(self, dims: list[int], act: str = "relu", dropout: float = 0.0, last_activation: bool = False,
                 batch_norm: bool = False):
        super().__init__()
        self.dims = list(dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation(act)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_activation = last_activation
        n_activated = len(self.layers) if last_activation else len(self.layers) - 1
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in dims[1:1 + n_activated]) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.last_activation:
                if self.norms is not None:
                    x = self.norms[i](x)
                x = self.dropout(self.act(x))
        return x

    def flops(self, tokens: int = 1, d_in: int | None = None) -> int:
        """``d_in``: the input features that carry data (fewer than ``dims[0]`` when some are padding)."""
        dims = [self.dims[0] if d_in is None else d_in, *self.dims[1:]]
        return sum(linear_flops(tokens, a, b) for a, b in zip(dims[:-1], dims[1:]))


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in float32 and returned in the input's dtype, as autocast treats LayerNorm: under
    bf16 autocast a bf16 input with the float32 weight would otherwise miss the fused kernel (a slow mixed-dtype
    path) and normalise in bf16. [..., D] → [..., D]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):  # only a low-precision input is normalised in float32
            return super().forward(x)
        return nn.functional.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)
