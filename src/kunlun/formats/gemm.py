"""Emulated low-precision training: the model's dense GEMMs run on quantize → dequantize operands.

Every ``nn.Linear`` becomes an ``EmulatedLinear`` (same parameters and checkpoint keys) whose three GEMMs
quantize their operands along each GEMM's reduction axis, per tensor role:

    forward   y  = Q_a(x) · Q_w(W)ᵀ          reduction over in_features
    backward  dx = Q_g(dy) · Q_w(W)           reduction over out_features
              dW = Q_g(dy)ᵀ · Q_a(x)          reduction over the batch

Optional: a blockwise random Hadamard rotation R of both operands along the reduction axis
((A R)(B R)ᵀ = A Bᵀ, so only the quantization error changes) and stochastic rounding of gradients.
The model's other GEMMs — attention and GDPA products, token compressions (LCE, SumKron), Wukong's FM,
DIN's pooling, InterFormer's PFFN and dot interaction — are ``MatMul`` modules, which become ``EmulatedMatMul``
and emulate the same three GEMMs (learned operands in the weights role, the rest as activations).
Embedding lookups are not GEMMs and stay FP32; the first and last Linear layers stay FP32 unless configured
otherwise.

The precision is module state: every emulated module holds its model's ``Policy`` (format per role, stochastic-
rounding generators per device) and, for RHT, its rotation as a buffer that moves with ``.to(device)``. Nothing is
process-global, so models of different precisions coexist, and any submodule run on its own keeps its format.
"""

from __future__ import annotations

import torch
from torch import nn

from kunlun.config import PRECISIONS, PrecisionConfig  # noqa: F401  (PRECISIONS re-exported for the formats bench)
from kunlun.formats.quantize import BLOCK, quantize, random_hadamard, rotate

SR_SEED_OFFSET = 2**32  # stochastic rounding draws from a stream of its own, apart from the RHT signs (seeded with seed)


class Policy:
    """A PrecisionConfig turned into quantizers per role, owned by one model (every emulated GEMM module of the model
    holds it) — never process-global, so two models with different precisions can run side by side.

    Stochastic rounding needs random numbers on the device of the gradient it rounds: one generator per device,
    created there on first use from ``seed``. ``state_dict`` / ``load_state_dict`` carry the generators' states
    through a trainer checkpoint, so a resumed stochastic-rounding run continues exactly.
    """

    def __init__(self, cfg: PrecisionConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.generators: dict[str, torch.Generator] = {}  # device ('cpu', 'cuda:0', …) → generator

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device).manual_seed(self.seed + SR_SEED_OFFSET)
        return self.generators[key]

    def q(self, x: torch.Tensor, role: str, axis: int) -> torch.Tensor:
        if not getattr(self.cfg, role):
            return x
        sr = self.cfg.stochastic_rounding and role == "gradients"
        return quantize(x, self.cfg.format, axis, stochastic=sr, generator=self.generator(x.device) if sr else None, **self.cfg.options())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {device: g.get_state() for device, g in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the generators of ``state``'s devices. A device this machine lacks is skipped: its stream cannot
        continue here, and the model's new device starts its own from the seed."""
        for device, s in state.items():
            try:
                g = self.generator(torch.device(device))
            except RuntimeError:  # no such device here
                continue
            g.set_state(s)


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
    """nn.Linear whose GEMMs are emulated in ``self.policy``'s format. Shapes: [..., in] → [..., out].
    ``rht_matrix`` [block, block] (or None) is a non-persistent buffer: it moves with the module, and a checkpoint
    keeps the keys of a plain Linear — the matrix is rebuilt from the seed by ``apply_precision``."""

    policy: Policy
    rht_matrix: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _EmulatedGEMM.apply(x.reshape(-1, shape[-1]).float(), self.weight, self.policy, self.rht_matrix)
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.policy.cfg.format}" + (", rht" if self.rht_matrix is not None else "")


class MatMul(nn.Module):
    """a [..., M, K] @ b [..., K, N] for a GEMM that is not an nn.Linear (attention, GDPA, token compressions, FM, …).
    A module, like nn.Linear, so that ``apply_precision`` can swap it for an emulated one holding the model's policy;
    ``roles`` names what each operand is. Unswapped (FP32) it is plain ``a @ b``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, roles: tuple[str, str] = ("activations", "activations")) -> torch.Tensor:
        return a @ b

    def emulated_or_none(self) -> MatMul | None:
        """This module when it emulates a low-precision format, else None: a fused op (``kunlun.ops``) may
        replace a plain matmul but must run its reference around an emulated one."""
        return None


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


class EmulatedMatMul(MatMul):
    """MatMul whose forward and both backward GEMMs quantize their operands along each GEMM's reduction axis, per role."""

    policy: Policy

    def forward(self, a: torch.Tensor, b: torch.Tensor, roles: tuple[str, str] = ("activations", "activations")) -> torch.Tensor:
        return _EmulatedMatmul.apply(a.float(), b.float(), self.policy, *roles)

    def emulated_or_none(self) -> MatMul | None:
        return self

    def extra_repr(self) -> str:
        return f"format={self.policy.cfg.format}"


def apply_precision(model: nn.Module, cfg: PrecisionConfig, seed: int = 0) -> Policy | None:
    """Swap the model's Linear layers (except those kept in high precision) and MatMul modules (except under a kept
    name prefix) to emulated ones sharing one policy; return it. fp32 leaves the model untouched."""
    if cfg.format == "fp32":
        return None
    policy = Policy(cfg, seed)
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    keep, prefixes = set(), []
    for k in cfg.keep_high_precision:
        if k == "first" and linears:
            keep.add(linears[0][0])
        elif k == "last" and linears:
            keep.add(linears[-1][0])
        else:
            prefixes.append(k)
    kept = lambda name: name in keep or any(name == k or name.startswith(k + ".") for k in prefixes)  # noqa: E731
    block = BLOCK.get(cfg.format, 32)
    signs = torch.Generator().manual_seed(seed)  # RHT sign draws, one matrix per layer in module order
    for name, m in linears:
        if kept(name):
            continue
        m.__class__ = EmulatedLinear  # same parameters, same state_dict keys
        m.policy = policy
        r = random_hadamard(block, signs).to(m.weight.device) if cfg.rht else None
        m.register_buffer("rht_matrix", r, persistent=False)
    for name, m in model.named_modules():
        if type(m) is MatMul and not kept(name):
            m.__class__ = EmulatedMatMul
            m.policy = policy
    return policy


def policies(model: nn.Module) -> list[Policy]:
    """The distinct policies of ``model``'s emulated GEMMs, in module order (one per ``apply_precision`` call)."""
    found: dict[int, Policy] = {}
    for m in model.modules():
        if isinstance(m, (EmulatedLinear, EmulatedMatMul)):
            found.setdefault(id(m.policy), m.policy)
    return list(found.values())


def precision_state(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The random-number state of ``model``'s low-precision emulation (stochastic rounding), for a checkpoint."""
    return [p.state_dict() for p in policies(model)]


def load_precision_state(model: nn.Module, state: list[dict[str, torch.Tensor]]) -> None:
    for p, s in zip(policies(model), state):
        p.load_state_dict(s)
