"""Small shared pieces: MLP, activations, RMSNorm, and the FLOP convention.

FLOP convention (used by every block's ``flops``): forward FLOPs per example = 2 × the multiply-adds
of matrix products (linear layers, attention score and value products, einsums). Element-wise work
(activations, norms, softmax, bias adds) and embedding lookups count 0. This is the convention of
``torch.utils.flop_counter.FlopCounterMode`` and of MFU accounting; training FLOPs = 3 × forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# each name of kunlun.model_configs.ACTIVATION_NAMES (the names a config may give) with its function (tests/test_config.py checks they agree)
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
    "leaky_relu": F.leaky_relu,
    "hardswish": F.hardswish,
    "identity": lambda x: x,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


class MLP(nn.Module):
    """Stack of Linear → activation (→ dropout); the last layer is linear unless ``last_activation``.

    Shapes: [..., dims[0]] → [..., dims[-1]].
    """

    def __init__(self, dims: list[int], act: str = "relu", dropout: float = 0.0, last_activation: bool = False):
        super().__init__()
        self.dims = list(dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_activation = last_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.last_activation:
                x = self.dropout(self.act(x))
        return x

    def flops(self, tokens: int = 1, d_in: int | None = None) -> int:
        """``d_in``: the input features that carry data (fewer than ``dims[0]`` when some are padding)."""
        dims = [self.dims[0] if d_in is None else d_in, *self.dims[1:]]
        return sum(linear_flops(tokens, a, b) for a, b in zip(dims[:-1], dims[1:]))
