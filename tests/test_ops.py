"""Every fast op against its plain reference: forward and backward, random shapes, ragged masks, dtypes."""

import itertools

import pytest
import torch

from kunlun import ops
from kunlun.errors import KunlunError
from kunlun.ops.attention import (
    activation_heads,
    band_mask,
    band_pairs,
    blocked_pays,
    gdpa,
    gdpa_heads,
    rotary,
    rotary_reference,
    softmax_attention,
    softmax_attention_reference,
)


def ragged_mask(b: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Left-padded histories of random lengths (0 included), plus scattered holes."""
    lengths = torch.randint(0, length + 1, (b,), generator=gen)
    lengths[0] = 0  # an empty history: every query of it sees no key
    pos = torch.arange(length)
    mask = pos[None, :] >= (length - lengths)[:, None]
    return mask & (torch.rand(b, length, generator=gen) > 0.1)


def run_both(fn, *tensors):
    """fn(*tensors) under the reference and the fast implementation: (outputs, input gradients) of each."""
    results = []
    for name in ("reference", "fast"):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        with ops.using(name):
            out = fn(*xs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
        (out * weights).sum().backward()
        results.append((out.detach(), [x.grad for x in xs if x.is_floating_point()]))
    return results


CASES = [  # (B, H, L, dh, window): dense masked and blocked band paths, windows wider than L, tiny L
    (3, 2, 51, 16, 16), (2, 2, 26, 8, 8), (4, 1, 7, 4, 0), (2, 3, 200, 8, 16), (2, 2, 97, 4, 5), (2, 2, 100, 8, 3),
    (1, 2, 64, 8, 1), (3, 2, 130, 16, 24), (2, 1, 1, 4, 3), (2, 4, 40, 8, 100),
]


@pytest.mark.parametrize("b,h,length,dh,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_attention_fast_matches_reference(b, h, length, dh, window, dtype):
    gen = torch.Generator().manual_seed(b * 1000 + length * 10 + window)
    q, k, v = (torch.randn(b, h, length, dh, generator=gen, dtype=dtype) for _ in range(3))
    mask = ragged_mask(b, length, gen)
    (ref, ref_grads), (fast, fast_grads) = run_both(lambda q, k, v: softmax_attention(q, k, v, mask, window), q, k, v)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype is torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(fast, ref, **tol)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, **tol)
    assert (fast[0] == 0).all()  # the empty history: no visible key → exactly 0


def test_blocked_band_takes_any_output_layout_of_the_fused_kernel(monkeypatch):
    """On a GPU, scaled_dot_product_attention (memory-efficient / flash) returns its output with the head and
    query dimensions swapped in memory; the blocked band must not assume the CPU kernel's contiguous layout."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: plain(*a, **k).transpose(1, 2).contiguous().transpose(1, 2))
    b, h, length, dh, window = 2, 3, 200, 8, 16
    assert blocked_pays(length, window)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, length, dh, generator=gen) for _ in range(3))
    mask = ragged_mask(b, length, gen)
    (ref, _), (fast, _) = run_both(lambda q, k, v: softmax_attention(q, k, v, mask, window), q, k, v)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_cases_cover_both_fast_paths():
    assert {blocked_pays(length, w) for _, _, length, _, w in CASES} == {True, False}


def test_softmax_attention_bf16_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 120, 16, generator=gen) for _ in range(3))
    mask = ragged_mask(2, 120, gen)
    ref = softmax_attention_reference(q, k, v, mask, 8)
    with ops.using("fast"):
        fast = softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 8)
    assert fast.dtype is torch.bfloat16
    torch.testing.assert_close(fast.float(), ref, rtol=0.05, atol=0.05)


def test_shared_queries_match_reference():
    """Learned queries [H, Lq, dh] shared by the batch (seed pooling), full attention."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 8, generator=gen)
    k, v = torch.randn(3, 2, 30, 8, generator=gen), torch.randn(3, 2, 30, 8, generator=gen)
    mask = ragged_mask(3, 30, gen)
    (ref, ref_grads), (fast, fast_grads) = run_both(lambda q, k, v: softmax_attention(q, k, v, mask), q, k, v)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)


def test_reference_is_windowed_softmax_attention():
    """The reference itself against explicit loops: query i attends to visible keys j with |i − j| ≤ W."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = ragged_mask(2, 9, gen)
    out = softmax_attention_reference(q, k, v, mask, window=2)
    for b, i in itertools.product(range(2), range(9)):
        keys = [j for j in range(9) if abs(i - j) <= 2 and mask[b, j]]
        if not keys:
            assert (out[b, 0, i] == 0).all()
            continue
        w = torch.softmax(torch.stack([q[b, 0, i] @ k[b, 0, j] / 2.0 for j in keys]), 0)
        torch.testing.assert_close(out[b, 0, i], sum(wj * v[b, 0, j] for wj, j in zip(w, keys)))


def test_band_helpers():
    m = band_mask(5, 5, 1)
    assert m.sum().item() == 5 + 2 * 4 == band_pairs(5, 1)
    assert m[0, 1] and not m[0, 2]
    for length, w in itertools.product(range(1, 12), range(0, 14)):
        assert band_pairs(length, w) == band_mask(length, length, w).sum().item()


@pytest.mark.parametrize("act", ["gelu", ["silu", "gelu"], ["relu", "identity", "silu"]])
def test_gdpa_fast_matches_reference(act):
    gen = torch.Generator().manual_seed(len(act))
    heads = 1 if isinstance(act, str) else len(act)
    q = torch.randn(3, heads, 20, 8, generator=gen)
    k, v = torch.randn(3, heads, 4, 8, generator=gen), torch.randn(3, heads, 4, 8, generator=gen)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    (ref, ref_grads), (fast, fast_grads) = run_both(lambda q, k, v: gdpa(q, k, v, act, key_mask=mask), q, k, v)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act,heads", [("gelu", 2), (["silu", "gelu"], 2), (["relu", "identity", "silu"], 3), ("silu", 1),
                                       (["relu2", "silu"], 2), (["silu", "gelu", "silu", "gelu"], 4), (["gelu", "gelu"], 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_mask", [True, False])
def test_gdpa_heads_fast_matches_reference(act, heads, dtype, with_mask):
    """Merged-head GDPA, with and without a prebuilt head mask, against its reference, forward and backward."""
    gen = torch.Generator().manual_seed(heads)
    dh = 8
    q = torch.randn(3, 21, heads * dh, generator=gen, dtype=dtype)
    k, v = (torch.randn(3, 4, heads * dh, generator=gen, dtype=dtype) for _ in range(2))
    head_mask = activation_heads(act, heads) if with_mask else None
    (ref, ref_grads), (fast, fast_grads) = run_both(
        lambda q, k, v: gdpa_heads(q, k, v, heads, act, head_mask=head_mask), q, k, v)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype is torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(fast, ref, **tol)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g_fast, g_ref, **tol)
    split = [x.unflatten(-1, (heads, dh)).transpose(1, 2) for x in (q, k, v)]  # the reference is gdpa on split heads
    torch.testing.assert_close(ref, gdpa(*split, act).transpose(1, 2).flatten(-2), **tol)


def test_activation_heads():
    assert activation_heads("silu", 3) is None and activation_heads(["gelu", "gelu"], 2) is None
    assert activation_heads(["silu", "gelu", "silu"], 3).tolist() == [[True, False, True], [False, True, False]]
    with pytest.raises(ValueError):
        activation_heads(["silu", "gelu"], 3)


@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_gdpa_heads_executes_per_head_flops(heads, impl):
    """Both products are per head: 2·Lq·Lk·D multiply-adds each per example, forward, and twice that backward
    (what a FLOP counter reports as executed work; no zero blocks)."""
    from torch.utils.flop_counter import FlopCounterMode

    b, lq, lk, d = 2, 11, 4, heads * 8
    q, k, v = (torch.randn(b, n, d, requires_grad=True) for n in (lq, lk, lk))
    with ops.using(impl), FlopCounterMode(display=False) as counter:
        out = gdpa_heads(q, k, v, heads, ["silu", "gelu"] * (heads // 2) if heads > 1 else "silu")
        forward = counter.get_total_flops()
        out.sum().backward()
    assert forward == 2 * (2 * b * lq * lk * d)
    assert counter.get_total_flops() == 3 * forward


def test_emulated_matmul_runs_the_reference():
    """A low-precision (emulated) matmul must see the attention products: the fast kernels cannot quantize."""
    calls = []

    def matmul(a, b):
        calls.append(a.shape)
        return a @ b

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=gen) for _ in range(3))
    mask = ragged_mask(2, 40, gen)
    with ops.using("fast"):
        out = softmax_attention(q, k, v, mask, 4, matmul=matmul)
    assert len(calls) == 2
    torch.testing.assert_close(out, softmax_attention_reference(q, k, v, mask, 4))


def test_switch(monkeypatch):
    with ops.using("fast"):
        monkeypatch.setenv("KUNLUN_OPS", "reference")
        assert ops.use("auto") == "reference" == ops.current()
        monkeypatch.setenv("KUNLUN_OPS", "")
        assert ops.use("auto") == "fast"
        monkeypatch.setenv("KUNLUN_OPS", "triton-please")
        with pytest.raises(KunlunError, match="KUNLUN_OPS"):
            ops.use("auto")
        with pytest.raises(KunlunError, match="train.ops"):
            ops.use("fastest")


def test_fast_dropout_keeps_with_probability_one_minus_p_and_rescales():
    """The fast CPU mask: kept elements are x / P(keep), the others 0, P(keep) = 1 − p (to 1/65536), independent
    across positions; the backward multiplies by the same mask; E[output] = input."""
    from kunlun.ops.dropout import dropout, keep_probability

    torch.manual_seed(0)
    for p in (0.1, 0.2, 0.4, 0.5):
        x = (torch.rand(4096, 300) + 0.5).requires_grad_()
        with ops.using("fast"):
            out = dropout(x, p)
        kept = out != 0
        q = keep_probability(p)
        assert abs(q - (1 - p)) <= 0.5 / 65536
        n = kept.numel()
        assert abs(kept.float().mean().item() - q) < 5 * (q * (1 - q) / n) ** 0.5  # 5σ of a binomial
        torch.testing.assert_close(out[kept], x[kept] / q)
        col = kept.float().mean(0)  # every position, not only the total: no column is favoured
        assert (col - q).abs().max().item() < 6 * (q * (1 - q) / 4096) ** 0.5
        a, b = kept[:, :-1].float().flatten(), kept[:, 1:].float().flatten()  # neighbours independent
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01
        out.sum().backward()
        torch.testing.assert_close(x.grad, kept.float() / q)
        assert abs(out.mean().item() / x.mean().item() - 1) < 0.01


def test_fast_dropout_is_seeded_by_torch_and_falls_back_to_the_reference():
    from torch.nn import functional as F

    from kunlun.blocks.common import MLP
    from kunlun.ops.dropout import Dropout, dropout

    x = torch.randn(64, 40)
    with ops.using("fast"):
        torch.manual_seed(3)
        a, b = dropout(x, 0.3), dropout(x, 0.3)
        torch.manual_seed(3)
        torch.testing.assert_close(dropout(x, 0.3), a)  # the same seed, the same masks
        assert not torch.equal(a, b)  # each call draws a fresh mask
        torch.manual_seed(3)
        assert not torch.equal(a, F.dropout(x, 0.3))  # the fast path, not torch's generator
        assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
        for y in (x.to(torch.bfloat16), x.double()):  # other dtypes: torch's dropout, bit for bit
            torch.manual_seed(4)
            want = F.dropout(y, 0.3)
            torch.manual_seed(4)
            torch.testing.assert_close(dropout(y, 0.3), want, rtol=0, atol=0)
        module = Dropout(0.3)
        assert isinstance(MLP([4, 4, 1], dropout=0.3).dropout, Dropout)  # what the models' MLPs use
        torch.manual_seed(3)
        torch.testing.assert_close(module(x), a)
        assert module.eval()(x) is x
    with ops.using("reference"):
        torch.manual_seed(4)
        want = F.dropout(x, 0.3)
        torch.manual_seed(4)
        torch.testing.assert_close(dropout(x, 0.3), want, rtol=0, atol=0)


@pytest.mark.parametrize("b,h,length,dh", [(3, 2, 51, 16), (2, 1, 1, 2), (4, 3, 17, 8), (1, 4, 200, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_fast_matches_reference(b, h, length, dh, dtype):
    gen = torch.Generator().manual_seed(b * 100 + length)
    # q as split_heads leaves it (a transposed view, not contiguous); times of any size, as log gaps are
    q = torch.randn(b, length, h, dh, generator=gen, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, h, length, dh, generator=gen, dtype=dtype)
    tau = torch.rand(b, length, generator=gen) * 12
    (ref, ref_grads), (fast, fast_grads) = run_both(lambda q, k: torch.cat(rotary(tau, 10.0, q, k), -1), q, k)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-6}  # angles are float32 in both
    torch.testing.assert_close(fast, ref, **tol)
    for a, g in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, g, **tol)
    assert fast.dtype == dtype and not torch.allclose(fast[..., :dh], q)


def test_rotary_bf16_close_to_fp32_reference():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 51, 16, generator=gen)
    tau = torch.rand(3, 51, generator=gen) * 12
    exact = rotary_reference(q, tau)
    (fast,) = rotary(tau, 10.0, q.bfloat16())
    ref = rotary_reference(q.bfloat16(), tau)
    assert fast.dtype == torch.bfloat16
    # the fast path rotates in float32 and rounds once: no further from fp32 than the bf16 reference
    assert (fast.float() - exact).abs().max() <= (ref.float() - exact).abs().max()


def test_compiled_rotary_takes_the_plain_form_inductor_can_fuse():
    """Inductor has no code generation for complex numbers (it warns and runs slower kernels): compiled and exported
    models get the reference's element-wise form, with the eager fast path's values."""
    import warnings

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    tau = torch.rand(2, 9, generator=gen) * 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(lambda q, k, tau: rotary(tau, 10.0, q, k), fullgraph=True)(q, k, tau)
    assert not [w for w in caught if "complex" in str(w.message)]
    for a, b in zip(compiled, rotary(tau, 10.0, q, k)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
