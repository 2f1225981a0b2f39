"""Dropout. Reference: ``torch.nn.functional.dropout``. Fast (CPU, float32): the keep mask drawn by NumPy.

On a CPU, torch draws a dropout mask from its Mersenne-Twister generator one element at a time: at the BARS
Frappe DNN size (batch 4096, three 400-wide hidden layers, one thread) that was a third of the training step
(``kunlun bench speed --profile``: ``aten::bernoulli_``), 40× the cost of the multiply that applies the mask.
The fast path draws the mask's random bits with NumPy's PCG64 (``random_raw``: 64 bits per call, 16 per
element) and turns them into a float mask in two vectorised passes, so a mask costs about as much as the
multiply. The generator is seeded from torch's default generator (one draw per call), so a run is still fixed
by ``torch.manual_seed`` and a checkpoint's saved torch RNG state resumes it exactly.

Keep probability: element kept when its 16 random bits, read as an int16 r, satisfy r ≥ k − 32768 with
k = round(p · 65536): P(keep) = 1 − k/65536, p rounded to a multiple of 1/65536 (at most 7.6e-6 away). Kept
elements are scaled by 1 / P(keep), so E[output] = input exactly, as with the reference. Other devices and
dtypes (a GPU draws masks fast; bf16 autocast) and code under ``torch.compile`` (Inductor generates its own
masks) take the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kunlun import ops

LEVELS = 1 << 16  # a mask element reads 16 random bits


def keep_probability(p: float) -> float:
    """P(an element is kept) by the fast path for drop probability ``p``."""
    return 1.0 - round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """float32 mask of ``shape``: 1 / keep_probability(p) where kept (probability keep_probability(p)), else 0.
    Seeded from torch's default generator."""
    n = int(np.prod(shape))
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
    bits = np.random.PCG64(seed).random_raw(-(-n // 4)).view(np.int16)[:n]
    dropped = round(p * LEVELS)
    mask = np.multiply(bits >= dropped - LEVELS // 2, np.float32(LEVELS / (LEVELS - dropped)), dtype=np.float32)
    return torch.from_numpy(mask).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 − p) in training; ``x`` otherwise."""
    if not training or p == 0:
        return x
    if (ops.current() == "reference" or x.device.type != "cpu" or x.dtype != torch.float32 or p >= 1
            or torch.compiler.is_compiling()):
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` (the fast mask on a CPU); same constructor, state and repr."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
