"""Executed FLOPs: counted from the operations one real forward of a model dispatches.

A model's ``flops_by_component`` is analytic: the work of its formulas, which for a sequence model is its *useful*
work (``useful_flops_per_example``: each example's real tokens; a sliding window's band of query–key pairs). What the
selected op implementation (``kunlun.ops``, ``fast`` by default) *executes* is different: a dense masked attention
kernel scores all L² pairs of a short sequence, the blocked band 3b keys per query, every padded slot is computed.
``count_flops`` runs one forward on a real batch under a dispatch mode and adds up the matrix-product FLOPs of every
aten op the kernels are called with; ``executed_flops_per_example`` is that total ÷ batch size, counted once per
(model configuration, op implementation, batch shape) and cached. HFU is built on it, MFU on the useful figure.

Convention (docs/models.md#flops; the analytic counts follow it too): FLOPs are those of matrix products only — mm, addmm,
bmm, baddbmm and the fused attention kernels (matmul, linear and einsum reach the counter as the mm / bmm they
dispatch) — at 2 FLOPs per multiply-add. Element-wise work (activations, masks, rotary rotations, gates, residuals),
reductions, normalisations and embedding lookups count 0. Formulas are torch's own (``torch.utils.flop_counter``),
which covers mm / addmm / bmm / baddbmm and the CUDA attention kernels but has none for the CPU fused kernel
``aten._scaled_dot_product_flash_attention_for_cpu`` (torch's ``FlopCounterMode`` counts 0 for it: checked with
torch 2.13); it is registered here with torch's SDPA formula (Q·Kᵀ and weights·V over every query–key pair the kernel
is given, whatever its mask hides). A dispatched op that looks like a matrix product and has no formula is an error
(``UncountedOp``), not a silent 0.

Besides the total, a count records the attention kernels' *hidden* FLOPs: the pairs they compute although their mask
hides them (band, padding keys). On a batch with no padding, executed − hidden is the attention the model really
applies — which is how ``tests/test_flops.py`` checks the band the forward uses against the one ``flops`` declares.
The count runs in eval mode without gradients (no dropout draw; the forward's matrix products are those of training)
and leaves the random streams as they were.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop, sdpa_flop

from kunlun import ops

aten = torch.ops.aten

# fused attention kernels: (query, key, value, …) first, the additive / boolean mask as ``attn_mask`` or 4th argument
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
              aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention}
FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,  # already shape-wrapped by torch
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}
# aten ops that are matrix products by name (mm, bmm, addmm, mv, dot, …, any attention or convolution kernel): one
# of these without a formula would count 0, so it is an error
_MATMUL_LIKE = re.compile(r"(^|_)(mm|bmm|addmm|baddbmm|addbmm|mv|addmv|dot|vdot|ger|outer|linear|matmul|einsum)($|_)"
                          r"|attention|convolution")


class UncountedOp(RuntimeError):
    """A forward dispatched a matrix-product op that has no FLOP formula here."""


@dataclass(frozen=True)
class FlopCount:
    """FLOPs one forward dispatched over ``examples`` examples: ``flops`` in all, by aten op, and ``hidden`` — the
    attention kernels' FLOPs on query–key pairs their mask hides (computed, then weighted 0)."""

    flops: int
    examples: int
    by_op: dict[str, int] = field(default_factory=dict)
    hidden: int = 0

    @property
    def per_example(self) -> float:
        return self.flops / self.examples

    @property
    def applied_per_example(self) -> float:
        """Per example, less what the attention masks hide."""
        return (self.flops - self.hidden) / self.examples


def _hidden_pairs(args, kwargs) -> int:
    """Query–key pairs (summed over batch and heads) that the mask given to a fused attention kernel hides: False in
    a boolean mask, −∞ or below a quarter of the dtype's lowest value in an additive one."""
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else None)
    if not isinstance(mask, torch.Tensor):
        return 0
    target = (*args[0].shape[:-1], args[1].shape[-2])  # [B, H, Lq, Lk]
    hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 4
    shape = (1,) * (len(target) - hidden.dim()) + tuple(hidden.shape)
    # a mask broadcast over batch or heads hides the same pairs in each: counted once, times the copies
    return int(hidden.sum()) * math.prod(t for s, t in zip(shape, target) if s == 1)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = defaultdict(int)
        self.hidden = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        formula = FORMULAS.get(packet)
        if formula is None:  # a composite op that reached the mode: count what it decomposes into
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.by_op[str(packet)] += flops
            if packet in _ATTENTION:
                q = args[0]
                pair = flops // (q.shape[:-2].numel() * q.shape[-2] * args[1].shape[-2])  # FLOPs of one scored pair
                self.hidden += pair * _hidden_pairs(args, kwargs)
        elif _MATMUL_LIKE.search(packet.__name__):
            raise UncountedOp(f"aten.{packet.__name__} runs in this forward and has no FLOP formula "
                              "(kunlun.models.flop_count.FORMULAS): its FLOPs would count 0")
        return out


def count_flops(model: torch.nn.Module, batch) -> FlopCount:
    """Count the matrix-product FLOPs of one forward of ``model`` on ``batch`` with the op implementation selected now
    (``kunlun.ops.current()``), in eval mode, without gradients; the model's mode and the random streams are restored."""
    was_training = model.training
    devices = [batch.label.device] if batch.label.device.type == "cuda" else []
    counter = _Counter()
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), counter:
            model(batch)
    finally:
        model.train(was_training)
    return FlopCount(sum(counter.by_op.values()), len(batch), dict(counter.by_op), counter.hidden)


def _shape_key(batch) -> tuple:
    """Every tensor's shape in ``batch`` (FLOPs depend on shapes, not values)."""
    def seq(s) -> tuple:
        return tuple(tuple(t.shape) for t in (s.item, s.event, s.side, s.gap, s.mask))

    return (tuple(tuple(t.shape) for t in (batch.label, batch.cat, batch.num)),
            tuple((name, seq(s)) for name, s in sorted(batch.seqs.items())),
            tuple((name, tuple((c, seq(w)) for c, w in sorted(ws.items()))) for name, ws in sorted(batch.windows.items())))


_CACHE: dict[tuple, FlopCount] = {}


def executed_count(model: torch.nn.Module, batch) -> FlopCount:
    """``count_flops``, once per (model class and configuration, the class of every submodule — a low-precision
    format swaps them —, op implementation, batch shapes) in this process."""
    key = (type(model).__qualname__, repr(getattr(model, "config", None)), repr(getattr(model, "info", None)),
           tuple(type(m).__qualname__ for m in model.modules()), ops.current(), str(batch.label.device), _shape_key(batch))
    if key not in _CACHE:
        _CACHE[key] = count_flops(model, batch)
    return _CACHE[key]


def executed_flops_per_example(model: torch.nn.Module, batch) -> float:
    """Executed forward FLOPs per example: counted over one forward on ``batch`` (its padded length) ÷ its size."""
    return executed_count(model, batch).per_example
