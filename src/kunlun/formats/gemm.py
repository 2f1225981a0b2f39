"""Emulated low-precision training: the model's dense GEMMs run on quantize → dequantize operands.

Every ``nn.Linear`` becomes an ``EmulatedLinear`` (same parameters and checkpoint keys) whose three GEMMs
quantize their operands along each GEMM's reduction axis, per tensor role:

    forward   y  = Q_a(x) · Q_w(W)ᵀ          reduction over in_features
    backward  dx = Q_g(dy) · Q_w(W)           reduction over out_features
              dW = Q_g(dy)ᵀ · Q_a(x)          reduction over the batch

Optional: a blockwise random Hadamard rotation R of both operands along the reduction axis
((A R)(B R)ᵀ = A Bᵀ, so only the quantization error changes) and stochastic rounding of gradients.
The model's other GEMMs — attention and GDPA products, token compressions (LCE, SumKron), Wukong's FM,
DIN's pooling, InterFormer's PFFN and dot interaction — go through ``matmul`` below, which emulates the same
three GEMMs while a policy is active (learned operands in the weights role, the rest as activations).
Embedding lookups are not GEMMs and stay FP32; the first and last Linear layers stay FP32 unless configured
otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kunlun.formats.quantize import BLOCK, FORMATS, quantize, random_hadamard, rotate

PRECISIONS = ("fp32", *FORMATS)


@dataclass
class PrecisionConfig:
    format: str = "fp32"  # fp32 (no emulation) | bf16 | fp8_e4m3 | fp8_e5m2 | hif8 | mxfp4 | nvfp4 | hif4
    weights: bool = True  # quantize weight operands
    activations: bool = True  # quantize activation operands
    gradients: bool = True  # quantize output-gradient operands in the backward GEMMs
    rht: bool = False  # blockwise random Hadamard transform of both operands of every Linear GEMM
    stochastic_rounding: bool = False  # gradients rounded ⌊v + U⌋ (4-bit formats and hif8)
    scale_rule: str = "floor"  # mxfp4: floor | ceil | even
    tensor_scale: bool = True  # nvfp4: FP32 per-tensor scale
    keep_high_precision: list[str] = field(default_factory=lambda: ["first", "last"])  # 'first', 'last' or module-name prefixes

    def validate(self) -> None:
        from kunlun.errors import KunlunError

        if self.format not in PRECISIONS:
            raise KunlunError(f"config key precision.format: expected one of {', '.join(PRECISIONS)}, got {self.format!r}")
        if self.scale_rule not in ("floor", "ceil", "even"):
            raise KunlunError(f"config key precision.scale_rule: expected floor, ceil or even, got {self.scale_rule!r}")
        if self.stochastic_rounding and self.format not in ("mxfp4", "nvfp4", "hif4", "hif8"):
            raise KunlunError(f"config key precision.stochastic_rounding: implemented for mxfp4, nvfp4, hif4 and hif8, not {self.format}")

    def options(self) -> dict:
        return {"mxfp4": {"scale_rule": self.scale_rule}, "nvfp4": {"tensor_scale": self.tensor_scale}}.get(self.format, {})


class Policy:
    """A PrecisionConfig turned into quantizers per role."""

    def __init__(self, cfg: PrecisionConfig, generator: torch.Generator | None = None):
        self.cfg, self.generator = cfg, generator

    def q(self, x: torch.Tensor, role: str, axis: int) -> torch.Tensor:
        if not getattr(self.cfg, role):
            return x
        sr = self.cfg.stochastic_rounding and role == "gradients"
        return quantize(x, self.cfg.format, axis, stochastic=sr, generator=self.generator if sr else None, **self.cfg.options())


def _qmm(policy: Policy, a: torch.Tensor, b: torch.Tensor, role_a: str, role_b: str, r: torch.Tensor | None) -> torch.Tensor:
    """a [N, K] · b [K, M] with both operands quantized along K (after the rotation ``r`` when given)."""
    if r is not None:
        a, b = rotate(a, r, -1), rotate(b, r, 0)
    return policy.q(a, role_a, -1) @ policy.q(b, role_b, 0)


class _EmulatedGEMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, policy, r):
        ctx.save_for_backward(x, w)
        ctx.policy, ctx.r = policy, r
        return _qmm(policy, x, w.t(), "activations", "weights", r)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        p, r = ctx.policy, ctx.r
        dx = _qmm(p, g, w, "gradients", "weights", r) if ctx.needs_input_grad[0] else None
        dw = _qmm(p, g.t(), x, "gradients", "activations", r) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class EmulatedLinear(nn.Linear):
    """nn.Linear whose GEMMs are emulated in ``self.policy``'s format. Shapes: [..., in] → [..., out]."""

    policy: Policy
    rht_matrix: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _EmulatedGEMM.apply(x.reshape(-1, shape[-1]).float(), self.weight, self.policy, self.rht_matrix)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


_ACTIVE: Policy | None = None


@contextlib.contextmanager
def active(policy: Policy | None):
    """Make ``matmul`` quantize its operands under ``policy`` (None: plain matmul)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, policy
    try:
        yield
    finally:
        _ACTIVE = previous


def _set_active(policy: Policy | None) -> None:
    global _ACTIVE
    _ACTIVE = policy


class _EmulatedMatmul(torch.autograd.Function):
    """a [..., M, K] @ b [..., K, N] (broadcasting batch dims) with all three GEMMs emulated, as for Linear."""

    @staticmethod
    def forward(ctx, a, b, policy, role_a, role_b):
        ctx.save_for_backward(a, b)
        ctx.policy, ctx.roles = policy, (role_a, role_b)
        return policy.q(a, role_a, -1) @ policy.q(b, role_b, -2)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        p, (ra, rb) = ctx.policy, ctx.roles
        da = db = None
        if ctx.needs_input_grad[0]:  # dA = dY · Bᵀ, reduction over N
            da = (p.q(g, "gradients", -1) @ p.q(b, rb, -1).transpose(-1, -2)).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:  # dB = Aᵀ · dY, reduction over M
            db = (p.q(a, ra, -2).transpose(-1, -2) @ p.q(g, "gradients", -2)).sum_to_size(b.shape)
        return da, db, None, None, None


def matmul(a: torch.Tensor, b: torch.Tensor, roles: tuple[str, str] = ("activations", "activations")) -> torch.Tensor:
    """a @ b for the model's non-Linear GEMMs (attention, GDPA, token compressions, FM). Inside ``active(policy)``
    the forward and both backward GEMMs quantize their operands along each GEMM's reduction axis, per role."""
    if _ACTIVE is None:
        return a @ b
    return _EmulatedMatmul.apply(a.float(), b.float(), _ACTIVE, *roles)


def apply_precision(model: nn.Module, cfg: PrecisionConfig, seed: int = 0) -> Policy | None:
    """Swap the model's Linear layers (except those kept in high precision) to emulated ones; return the policy."""
    if cfg.format == "fp32":
        return None
    gen = torch.Generator().manual_seed(seed)
    policy = Policy(cfg, gen)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    keep = set()
    for k in cfg.keep_high_precision:
        if k == "first" and linears:
            keep.add(linears[0][0])
        elif k == "last" and linears:
            keep.add(linears[-1][0])
        else:
            keep |= {n for n, _ in linears if n == k or n.startswith(k + ".")}
    block = BLOCK.get(cfg.format, 32)
    # the GDPA / attention matmuls of this model follow the policy during its forward passes
    model.register_forward_pre_hook(lambda *_: _set_active(policy))
    model.register_forward_hook(lambda *_: _set_active(None))
    for name, m in linears:
        if name in keep:
            continue
        m.__class__ = EmulatedLinear  # same parameters, same state_dict keys
        m.policy = policy
        m.rht_matrix = random_hadamard(block, gen, m.weight.device) if cfg.rht else None
    return policy
