"""Element-wise activations by name (model configs name them: ``model.gdpa_activation=[silu, gelu]``)."""

from __future__ import annotations

from torch.nn import functional as F

# each name of kunlun.model_configs.ACTIVATION_NAMES (the names a config may give) with its function
# (tests/test_config.py checks they agree)
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
