"""Quantize → dequantize emulation of 4- and 8-bit formats (spec: ``../shared/design/formats.md``).

``quantize(x, fmt, axis=-1, **options)`` returns a float32 tensor of ``x``'s shape holding the values the
format can represent. Block formats group ``block`` consecutive elements along ``axis`` (the GEMM
reduction axis), zero-padding a ragged tail and slicing it back. Gradients pass straight through.

Formats and options:
    mxfp4     E2M1 elements, 32-blocks, E8M0 scale; scale_rule = floor (spec) | ceil | even
    nvfp4     E2M1 elements, 16-blocks, E4M3 block scale; tensor_scale = True adds the FP32 per-tensor scale
    hif4      HiFloat4: 64-units, E6M2 base scale + two levels of 1-bit micro-exponents, S1P2 elements
    hif8      HiFloat8, value-level (tapered mantissa: 3/2/1 bits by |exponent|, denormals to 2^-22)
    fp8_e4m3, fp8_e5m2   with a per-tensor amax scale unless scaled=False (then a saturating cast)
    bf16      round to nearest even
``stochastic=True`` replaces round-to-nearest of the elements by ⌊v + U⌋ (4-bit formats and HiF8);
``generator`` makes it reproducible.
"""

from __future__ import annotations

import math

import torch

from kunlun.config import FORMATS  # the format names live with the config that selects them

BLOCK = {"mxfp4": 32, "nvfp4": 16, "hif4": 64}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX, E4M3_MAX, E5M2_MAX, E4M3_TINY = 6.0, 448.0, 57344.0, 2.0**-6
HIF8_MAX, HIF8_INF_FROM, HIF8_MIN = 2.0**15, 40960.0, 2.0**-22


def _round(v: torch.Tensor, stochastic: bool, generator: torch.Generator | None, half_even: bool = True) -> torch.Tensor:
    """Round non-negative ``v`` to an integer: nearest (ties even, or away from zero), or stochastically."""
    if stochastic:
        return torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device))
    return torch.round(v) if half_even else torch.floor(v + 0.5)


def e2m1(v: torch.Tensor, stochastic: bool = False, generator=None) -> torch.Tensor:
    """Nearest E2M1 value (ties to even), clamped to ±6. Steps: 0.5 below 2, 1 below 4, 2 up to 6."""
    a = v.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    q = (_round(a / step, stochastic, generator) * step).clamp(max=E2M1_MAX)
    return torch.copysign(q, v)


def e4m3(v: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 (the 'fn' variant: max 448, no Inf): round to nearest even, saturate finite values, Inf → NaN."""
    out = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return torch.where(torch.isinf(v), torch.nan, out)


def e5m2(v: torch.Tensor) -> torch.Tensor:
    """FP8 E5M2: round to nearest even, saturate finite values at 57344, keep ±Inf and NaN."""
    out = v.clamp(-E5M2_MAX, E5M2_MAX).to(torch.float8_e5m2).float()
    return torch.where(torch.isinf(v), v, out)


def bf16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.bfloat16).float()


def e8m0_code(exponent: torch.Tensor) -> torch.Tensor:
    """E8M0 code of a power-of-two scale 2^exponent: exponent + 127 clamped to [0, 254]; NaN → 255."""
    code = (exponent + 127).clamp(0, 254)
    return torch.where(torch.isnan(exponent), 255.0, code)


def e8m0_value(code: torch.Tensor) -> torch.Tensor:
    return torch.where(code == 255, torch.nan, torch.exp2(code - 127))


def _blocks(x: torch.Tensor, axis: int, block: int, granule: int = 1) -> tuple[torch.Tensor, tuple]:
    """Move ``axis`` last, zero-pad it to a multiple of ``block`` and split it: [..., n_blocks, block].

    An axis shorter than one block is one block of its own length (rounded up to ``granule``, the format's
    smallest sub-block) instead of being padded to the full block: the padding zeros change neither a block's
    maximum nor its other elements, so the values are the same, and a short reduction axis (attention's head
    width of 8 against HiF4's 64-unit) no longer costs block / n times the work."""
    x = x.float().movedim(axis, -1)
    n = x.shape[-1]
    if 0 < n < block:
        block = -(-n // granule) * granule
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block), (axis, n, x.shape)


def _unblocks(b: torch.Tensor, info: tuple) -> torch.Tensor:
    axis, n, padded_shape = info
    return b.reshape(padded_shape)[..., :n].movedim(-1, axis)


def mxfp4(x, axis=-1, scale_rule="floor", stochastic=False, generator=None):
    b, info = _blocks(x, axis, BLOCK["mxfp4"])
    amax = b.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(amax)
    safe = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    m, e = torch.frexp(safe)  # safe = m · 2^e, m in [0.5, 1): ⌊log2 amax⌋ = e − 1 exactly (no float log2)
    floor_log2 = e.float() - 1
    if scale_rule == "floor":  # OCP MX v1.0: 2^(⌊log2 amax⌋ − emax), emax(E2M1) = 2
        exp = floor_log2 - 2
    elif scale_rule == "ceil":  # 2^(⌈log2 amax⌉ − emax): amax / X in (2, 4], never clips
        exp = floor_log2 + (m > 0.5).float() - 2
    elif scale_rule == "even":  # amax's mantissa rounded to E2M1's 1 bit (half up) before the floor rule
        exp = floor_log2 + (m >= 0.875).float() - 2
    else:
        raise ValueError(f"scale_rule: expected floor, ceil or even, got {scale_rule!r}")
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127.0))
    exp = torch.where(finite, exp, torch.nan)
    scale = e8m0_value(e8m0_code(exp))
    q = e2m1(b / scale, stochastic, generator) * scale  # NaN scale → the whole block NaN (E8M0 code 0xFF)
    return _unblocks(q, info)


def nvfp4(x, axis=-1, tensor_scale=True, stochastic=False, generator=None):
    b, info = _blocks(x, axis, BLOCK["nvfp4"])
    s_t = torch.ones((), device=b.device)
    if tensor_scale:
        amax_t = b.abs().amax()
        s_t = torch.where(amax_t > 0, amax_t / (E4M3_MAX * E2M1_MAX), torch.ones_like(amax_t))
    amax = b.abs().amax(-1, keepdim=True)
    # stored block scale: E4M3 (RNE), clamped to [smallest subnormal, 448] like the reference kernels,
    # and elements scaled by the reciprocal of the combined scale (the same float operations as torchao)
    s_b = (amax / E2M1_MAX / s_t).clamp(E4M3_TINY, E4M3_MAX).to(torch.float8_e4m3fn).float()
    v = (b * ((1.0 / s_t) / s_b)).clamp(-E2M1_MAX, E2M1_MAX)
    q = e2m1(v, stochastic, generator) * (s_t * s_b)
    q = torch.where(torch.isfinite(amax) & torch.isfinite(s_t), q, torch.nan)  # Inf or NaN in a block: NaN, never a silent clip
    return _unblocks(q, info)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float64 for integer ``e`` in [-1022, 1023], built from its exponent bits: exact on every device."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _round_significant(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative float64 ``v`` rounded to ``bits`` significant bits, ties to even (float64 has room for it exactly)."""
    m, e = torch.frexp(v)  # v = m · 2^e, m in [0.5, 1)
    return torch.round(m * 2**bits) * _pow2(e - bits)


HIF4_INV7 = 73 / 512  # BF16(1/7) = 0.142578125
HIF4_S_MIN, HIF4_S_MAX = 2.0**-48, 49152.0


def hif4(x, axis=-1, stochastic=False, generator=None):
    """HiFloat4 as formats.md writes it, step for step. The arithmetic is float64, where every product of a float32
    value and a BF16 value is exact, so each rounding the spec names happens once on the exact value: in float32,
    m64 · BF16(1/7) would be rounded twice (to float32, then BF16), and |x| · r could land on a rounding tie that
    the exact product misses. A unit holding NaN or Inf decodes to NaN, as a 4-bit block's overflow never clips."""
    b, info = _blocks(x, axis, BLOCK["hif4"], granule=8)
    u = b.reshape(*b.shape[:-1], -1, 2, 4)  # 64 = 8 groups of 8 = 16 groups of 4 (a short axis: fewer groups of 8)
    a = u.abs()
    m4 = a.amax(-1, keepdim=True).double()  # [..., 8, 2, 1]
    m8 = m4.amax(-2, keepdim=True)  # [..., 8, 1, 1]
    m64 = m8.amax(-3, keepdim=True)  # [..., 1, 1, 1]
    finite = torch.isfinite(m64)
    m64 = torch.where(finite, m64, 1.0)  # the unit becomes NaN below; keep the arithmetic finite
    s = _round_significant(_round_significant(m64 * HIF4_INV7, 8), 3).clamp(HIF4_S_MIN, HIF4_S_MAX)  # E6M2(BF16(·))
    r = _round_significant(1 / s, 8)  # BF16(1/S)
    e8 = (m8 * r >= 4).double()
    e4 = (m4 * r / (1 + e8) >= 2).double()
    micro = (1 + e8) * (1 + e4)  # 2^(e8+e4)
    v = a * (r * 4 / micro)  # |x|·r·4 / 2^(e8+e4): float32 × float64 → float64, exact
    if stochastic:
        v += torch.rand(v.shape, generator=generator, device=v.device)
    else:
        v += 0.5  # then floor: half away from zero
    k = v.floor_().clamp_(max=7).float()
    q = k * (micro * s / 4).float()  # k/4 · 2^(e8+e4) · S has ≤ 6 significant bits: exact in float32
    q = torch.where(finite, torch.copysign(q, u), torch.nan)
    return _unblocks(q.reshape(b.shape), info)


def hif8(x, stochastic=False, generator=None):
    x = x.float()
    a = x.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, 1.0)))
    e = torch.clamp(e, min=-23.0)  # [2^-23, 2^-22) rounds between 0 and 2^-22 on the 2^-22 grid
    mbits = torch.where(e.abs() <= 3, 3.0, torch.where(e.abs() <= 7, 2.0, torch.where(e.abs() <= 15, 1.0, 0.0)))
    grid = torch.exp2(torch.where(e < -15, torch.clamp(e, min=-22.0), e - mbits))  # denormals: powers of two only
    q = _round(a / grid, stochastic, generator, half_even=False) * grid
    q = torch.where(a < 2.0**-23, 0.0, q)
    q = torch.where((q > HIF8_MAX) | torch.isinf(a), torch.inf, q)  # 49152 is not a finite HiF8 value: |x| ≥ 40960 overflows
    q = torch.copysign(q, x)
    return torch.where(torch.isnan(x), torch.nan, q)


def fp8(x, kind: str, scaled: bool = True):
    cast, fmax = (e4m3, E4M3_MAX) if kind == "e4m3" else (e5m2, E5M2_MAX)
    x = x.float()
    if not scaled:
        return cast(x)
    amax = x.abs().amax()
    s = torch.where(torch.isfinite(amax) & (amax > 0), amax / fmax, torch.where(torch.isfinite(amax), 1.0, torch.nan))
    return cast(x / s) * s


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        return q

    @staticmethod
    def backward(ctx, g):
        return g, None


def quantize(x: torch.Tensor, fmt: str, axis: int = -1, *, stochastic: bool = False, generator: torch.Generator | None = None,
             **options) -> torch.Tensor:
    """Dequantized float32 values of ``x`` in format ``fmt`` (see the module docstring); gradient straight through."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if stochastic and fmt not in ("mxfp4", "nvfp4", "hif4", "hif8"):
        raise ValueError(f"stochastic rounding is implemented for mxfp4, nvfp4, hif4 and hif8, not {fmt}")
    allowed = {"mxfp4": {"scale_rule"}, "nvfp4": {"tensor_scale"}, "fp8_e4m3": {"scaled"}, "fp8_e5m2": {"scaled"}}.get(fmt, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"{fmt}: unknown option {sorted(unknown)[0]!r}" + (f"; known: {', '.join(sorted(allowed))}" if allowed else ""))
    with torch.no_grad():
        if fmt == "mxfp4":
            q = mxfp4(x.detach(), axis, stochastic=stochastic, generator=generator, **options)
        elif fmt == "nvfp4":
            q = nvfp4(x.detach(), axis, stochastic=stochastic, generator=generator, **options)
        elif fmt == "hif4":
            q = hif4(x.detach(), axis, stochastic=stochastic, generator=generator)
        elif fmt == "hif8":
            q = hif8(x.detach(), stochastic=stochastic, generator=generator)
        elif fmt.startswith("fp8"):
            q = fp8(x.detach(), fmt[4:], **options)
        else:
            q = bf16(x.detach())
    return _STE.apply(x, q) if x.requires_grad else q


def hadamard(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of size ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def random_hadamard(block: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """R = diag(random signs) · H: orthogonal, so (X R)(W R)ᵀ = X Wᵀ when both operands are rotated blockwise."""
    signs = torch.randint(0, 2, (block,), generator=generator).float().mul(2).sub(1).to(device)
    return signs[:, None] * hadamard(block, device)


def rotate(x: torch.Tensor, r: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Apply the block rotation ``r`` [b, b] along ``axis`` in blocks of b (zero-padding a ragged tail, kept)."""
    b = r.shape[0]
    x = x.movedim(axis, -1)
    pad = (-x.shape[-1]) % b
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    y = (x.reshape(*x.shape[:-1], -1, b) @ r.to(x.dtype)).reshape(x.shape)
    return y.movedim(-1, axis)
