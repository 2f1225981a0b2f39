"""Attention ops: softmax attention with a key mask and an optional sliding window, and GDPA.

``softmax_attention`` — reference: explicit Q·Kᵀ, masked softmax, ·V over every key (the band is a mask).
Fast: ``scaled_dot_product_attention`` (fused, no L×L score tensor kept for backward), the dense mask given to it
as the additive float mask it reads, built from its key and band factors; a sliding window
narrow enough for it to pay runs *blocked*: the sequence is cut into blocks of ``b ≥ W`` queries and each
block attends to its own and its two neighbouring key blocks (3b keys, the band masked inside), so the work
grows as L·3b instead of L². At the default size (L ≈ 51, W = 16) the band covers most keys and the dense
masked kernel is faster; the blocked layout wins once L is over 4 × 3b (``blocked_pays``).

``rotary`` — rotary encoding with continuous positions. Reference: channel pairs sliced out, rotated with
cos / sin, stacked back (four products, two strided slices whose backward zero-fills and copies). Fast: each pair
is one complex number and the rotation one complex product (one kernel forward and backward), computed once for
the queries and keys that share it; in float32, so a bf16 input comes back rounded once instead of at every step.
Compiled or exported code gets the reference, which Inductor fuses (it has no code generation for complex numbers).

``gdpa`` — generalised dot-product attention (an element-wise activation instead of the softmax, one per
head or one for all, no row normalisation). Its fast path applies per-head activations through one
``torch.where`` per distinct activation over a boolean [A, H] head mask (``activation_heads``: built once by the
calling module as a buffer, so no tensor is made from Python data in a step) instead of stacking per-head copies.
``gdpa_heads`` takes and returns the heads side by side ([B, L, H·dh], as projections give them): split into
heads (views), ``gdpa``, merge — both products batched over [B, H] (the matmul copies q's transposed heads once,
the merge copies the output once), exactly 2·Lq·Lk·D multiply-adds per product and example, which is what a
FLOP counter sees as executed work; reference and fast differ only in ``gdpa``'s per-head activations. A
block-diagonal form (each head's keys and values in a [H·dh, H·Lk] / [H·Lk, H·dh] block-diagonal matrix: one GEMM
per example on the merged layout, no transposes, H× the multiply-adds) was the fast path before; on a CPU it is
faster on the op alone only while H·Lk is small, is not measurably faster in a whole Kunlun training step at the
default size, and falls behind as H·Lk grows: ``benchmarks/ops_attention.py --gdpa`` times both
(``benchmarks/results/ops_attention_gdpa.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kunlun import ops
from kunlun.ops.activations import ACTIVATIONS


def band_mask(lq: int, lk: int, window: int, device=None) -> torch.Tensor:
    """[Lq, Lk] bool, True where |i − j| ≤ window (sliding-window attention; Lq = Lk for self-attention)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return (i - j).abs() <= window


def band_pairs(length: int, window: int) -> int:
    """Number of (i, j) pairs with |i − j| ≤ window in an L × L self-attention (``band_mask(L, L, W).sum()``)."""
    w = min(window, length - 1)
    return length + w * (2 * length - w - 1)


def block_size(window: int) -> int:
    """Queries per block of the blocked band: at least the window (so 3 key blocks hold every band key),
    rounded up to a multiple of 8."""
    return max(8, -(-window // 8) * 8)


def blocked_pays(length: int, window: int) -> bool:
    """The blocked band computes L·3b scores against L² dense ones; below a 4× saving its extra copies
    and smaller kernels cost more than they save (measured on CPU, ``benchmarks/ops_attention.py``: at
    batch 256, 2 heads × 16, L = 128 and W = 16 the two tie; at L = 256 blocked is 1.3× faster, at 512 2×)."""
    return bool(window) and 4 * 3 * block_size(window) <= length


def rotary_angles(tau: torch.Tensor, dh: int, base: float) -> torch.Tensor:
    """τ·θ_i with θ_i = base^(-2i/dh), i < dh/2. tau: [B, L] → [B, 1, L, dh/2] float32."""
    theta = base ** (-torch.arange(0, dh, 2, device=tau.device, dtype=torch.float32) / dh)
    return tau.float()[:, None, :, None] * theta


def rotary(tau: torch.Tensor, base: float, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rotate channel pairs (2i, 2i+1) of each x by the angle τ·θ_i (``rotary_angles``).

    tau: [B, L] float; each x: [B, H, L, dh] (dh even) → the rotated xs, same shapes and dtypes. Used with
    τ = log(1 + Δt / t_scale) (rotary temporal encoding of log time gaps): q·k then depends on τ_q − τ_k.
    """
    # under torch.compile / torch.export the plain form: Inductor fuses its element-wise steps, but generates no
    # code for complex operators (it warns and falls back to slower kernels)
    if ops.current() == "reference" or torch.compiler.is_compiling():
        return tuple(rotary_reference(x, tau, base) for x in xs)
    dh = xs[0].shape[-1]
    work = torch.promote_types(xs[0].dtype, torch.float32)  # complex64 for fp32 / bf16 inputs, complex128 for fp64
    angle = rotary_angles(tau, dh, base).to(work)
    turn = torch.polar(torch.ones_like(angle), angle)  # e^{iτθ}: [B, 1, L, dh/2] complex
    return tuple(torch.view_as_real(torch.view_as_complex(x.to(work).unflatten(-1, (dh // 2, 2))) * turn).flatten(-2).to(x.dtype)
                 for x in xs)


def rotary_reference(x: torch.Tensor, tau: torch.Tensor, base: float = 10.0) -> torch.Tensor:
    """The plain form of ``rotary`` for one x [B, H, L, dh]: (x₁, x₂) → (x₁cos − x₂sin, x₁sin + x₂cos), in x's dtype."""
    angle = rotary_angles(tau, x.shape[-1], base).to(x.dtype)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, window: int = 0,
    matmul=None,
) -> torch.Tensor:
    """Masked softmax attention, scale 1/√dh.

    q: [B, H, Lq, dh] (or [H, Lq, dh], shared by the batch); k, v: [B, H, Lk, dh]; key_mask: [B, Lk] bool;
    ``window`` > 0: query i sees keys j with |i − j| ≤ window (needs Lq = Lk) → [B, H, Lq, dh]. A query
    with no visible key outputs 0. ``matmul``: an emulated low-precision matmul (then the reference runs).
    """
    if window and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"a sliding window needs self-attention (Lq = Lk), got Lq={q.shape[-2]}, Lk={k.shape[-2]}")
    if matmul is not None or ops.current() == "reference":
        return softmax_attention_reference(q, k, v, key_mask, window, matmul)
    if q.dim() == 3:
        q = q.expand(k.shape[0], *q.shape)
    if blocked_pays(k.shape[-2], window):
        return _blocked_band(q, k, v, key_mask, window)
    # the mask as the additive float one the kernel reads (a boolean one it converts with a pass of its own), built
    # from its [B, Lk] and [L, L] factors with one add, and each query's "sees some key" from prefix counts of the
    # key mask: no pass over a boolean [B, L, L] (band & keys, any, or, where)
    bias = _additive(key_mask, q.dtype)[:, None, None, :]  # [B, 1, 1, Lk]
    if window:
        bias = bias + _additive(band_mask(q.shape[-2], k.shape[-2], window, k.device), q.dtype)  # [B, 1, L, L]
        seen = _band_seen(key_mask, window)[:, None, :, None]  # [B, 1, L, 1]
    else:
        seen = key_mask.any(-1)[:, None, None, None]  # [B, 1, 1, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out * seen.to(out.dtype)


def softmax_attention_reference(q, k, v, key_mask, window: int = 0, matmul=None) -> torch.Tensor:
    """The plain form of ``softmax_attention`` (same arguments): every score computed, the band a mask."""
    mm = matmul or torch.matmul
    scores = mm(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    visible = key_mask[:, None, None, :]
    if window:
        visible = visible & band_mask(q.shape[-2], k.shape[-2], window, k.device)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores, dim=-1) * visible.to(scores.dtype)
    return mm(attn, v)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool → float mask to add to scores: 0 where visible, else half the dtype's lowest value (finite, so a row
    with no visible key stays finite, and two of them add up without overflow; a hidden key's weight is exactly 0
    in any row with a visible key, whose score is larger by ~|lowest| / 2)."""
    hidden = torch.finfo(dtype).min / 2
    return torch.where(visible, torch.zeros((), dtype=dtype, device=visible.device), hidden)


def _band_seen(key_mask: torch.Tensor, window: int) -> torch.Tensor:
    """[B, L] bool: query i sees a key j with |i − j| ≤ window and key_mask[j] (self-attention; key_mask [B, L]),
    from prefix counts of the key mask."""
    length = key_mask.shape[-1]
    before = F.pad(key_mask.cumsum(-1), (1, 0))  # [B, L + 1]: visible keys before slot j
    i = torch.arange(length, device=key_mask.device)
    return before[:, (i + window + 1).clamp(max=length)] > before[:, (i - window).clamp(min=0)]


def _sdpa(q, k, v, visible: torch.Tensor) -> torch.Tensor:
    """Fused attention with a boolean mask broadcastable to [..., Lq, Lk]. A fully masked row would be NaN
    in the kernel: it is unmasked there and its output zeroed (so it and its gradient are exactly 0)."""
    seen = visible.any(-1, keepdim=True)  # [..., Lq, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~seen)
    return out * seen.to(out.dtype)


def _blocked_band(q, k, v, key_mask, window: int) -> torch.Tensor:
    """Sliding-window attention on blocks of b queries against 3b keys. q, k, v: [B, H, L, dh] → same."""
    bsz, heads, length, dh = k.shape
    b = block_size(window)
    nb = -(-length // b)
    tail = nb * b - length

    def neighbours(x: torch.Tensor, dim: int) -> torch.Tensor:
        """x padded by one block on each side and blocked along ``dim`` ([…, nb + 2, b, …]) → the three
        key blocks of every query block side by side: […, nb, 3b, …]."""
        return torch.cat([x.narrow(dim, 0, nb), x.narrow(dim, 1, nb), x.narrow(dim, 2, nb)], dim=dim + 1)

    # [B, H·nb, …]: 4-D, so the fused CPU kernel takes it (a 5-D call falls back to the unfused math path)
    kk = neighbours(F.pad(k, (0, 0, b, b + tail)).view(bsz, heads, nb + 2, b, dh), 2).view(bsz, heads * nb, 3 * b, dh)
    vv = neighbours(F.pad(v, (0, 0, b, b + tail)).view(bsz, heads, nb + 2, b, dh), 2).view(bsz, heads * nb, 3 * b, dh)
    qq = F.pad(q, (0, 0, 0, tail)).reshape(bsz, heads * nb, b, dh)
    mk = neighbours(F.pad(key_mask, (b, b + tail)).view(bsz, nb + 2, b), 1)  # [B, nb, 3b]
    r = torch.arange(b, device=k.device)
    c = torch.arange(3 * b, device=k.device)
    band = (r[:, None] + b - c[None, :]).abs() <= window  # query r of a block against key c of its 3 blocks
    visible = (mk[:, None, :, None, :] & band).expand(bsz, heads, nb, b, 3 * b).reshape(bsz, heads * nb, b, 3 * b)
    out = _sdpa(qq, kk, vv, visible)  # [B, H·nb, b, dh]
    # reshape, not view: a GPU's fused kernels return their output in [B, b, H·nb, dh] memory order
    return out.reshape(bsz, heads, nb * b, dh)[:, :, :length]


def activation_heads(act: str | list[str] | tuple[str, ...], heads: int, device=None) -> torch.Tensor | None:
    """[A, H] bool: row i marks the heads that use the i-th distinct activation of ``act`` (in first-use order);
    None for one activation shared by every head. Filled on ``device`` one head at a time (no Python data is
    copied to it); a module builds it once as a buffer and passes it to ``head_activation`` / ``gdpa_heads``."""
    if isinstance(act, str):
        return None
    if len(act) != heads:
        raise ValueError(f"{len(act)} activations given for {heads} heads")
    names = list(dict.fromkeys(act))
    if len(names) == 1:
        return None
    mask = torch.zeros(len(names), heads, dtype=torch.bool, device=device)
    for h, a in enumerate(act):
        mask[names.index(a)].select(0, h).fill_(True)
    return mask


def head_activation(
    scores: torch.Tensor, act: str | list[str] | tuple[str, ...], head_mask: torch.Tensor | None = None, dim: int = 1,
) -> torch.Tensor:
    """Element-wise activation of scores with the heads along ``dim`` ([B, H, Lq, Lk] by default); ``act`` one
    name, or one name per head. ``head_mask``: ``activation_heads(act, H)`` on the scores' device (built here,
    a few small fills, when not given)."""
    if isinstance(act, str):
        return ACTIVATIONS[act](scores)
    heads = scores.shape[dim]
    if len(act) != heads:
        raise ValueError(f"{len(act)} activations given for {heads} heads")
    if ops.current() == "reference":
        return torch.stack([ACTIVATIONS[a](scores.select(dim, h)) for h, a in enumerate(act)], dim=dim)
    if len(set(act)) == 1:
        return ACTIVATIONS[act[0]](scores)
    if head_mask is None:
        head_mask = activation_heads(act, heads, scores.device)
    trailing = scores.dim() - 1 - (dim % scores.dim())
    out = None
    for i, name in enumerate(dict.fromkeys(act)):  # each distinct activation once, over the heads that use it
        y = ACTIVATIONS[name](scores)
        out = y if out is None else torch.where(head_mask[i].view(-1, *(1,) * trailing), y, out)
    return out


def gdpa_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, act: str | list[str] = "silu", matmul=None,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gdpa`` (scale 1/√dh, no key mask) on merged heads: q [B, Lq, H·dh], k, v [B, Lk, H·dh] → [B, Lq, H·dh];
    head h reads and writes channels [h·dh, (h+1)·dh). ``matmul``: an emulated matmul (then the reference runs).
    ``head_mask``: ``activation_heads(act, heads)`` (a module's buffer) for per-head activations."""
    b, lq, d = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, H·dh] → [B, H, L, dh], a view
        return x.unflatten(-1, (heads, d // heads)).transpose(1, 2)

    # both products batched over [B, H]: 2·Lq·Lk·dh multiply-adds per head and product, nothing more
    return gdpa(split(q), split(k), split(v), act, matmul=matmul, head_mask=head_mask).transpose(1, 2).reshape(b, lq, d)


def gdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, act: str | list[str] = "silu", scale: float | None = None,
    key_mask: torch.Tensor | None = None, matmul=None, head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised dot-product attention: O = (act(Q·Kᵀ) · scale) · V, rows not normalised.

    q: [B, H, Lq, dh]; k, v: [B, H, Lk, dh]; key_mask: [B, Lk] bool or None → [B, H, Lq, dh]. ``scale``
    defaults to 1/√dh. ``matmul``: the calling module's (emulated) matmul, else ``torch.matmul``. ``head_mask``:
    ``activation_heads(act, H)`` for per-head activations (built per call when not given).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mm = matmul or torch.matmul
    a = head_activation(mm(q, k.transpose(-1, -2)), act, head_mask) * scale
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    return mm(a, v)
