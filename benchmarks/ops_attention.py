"""Attention ops, forward + backward, per implementation.

Sliding-window attention: the measurement behind ``kunlun.ops.attention.blocked_pays`` (when the blocked band
beats the dense masked kernel).

    python benchmarks/ops_attention.py [--threads 2] [--batch 256] [--heads 2] [--dh 16]

Prints median milliseconds per forward+backward for: the reference (explicit matmuls, band as a mask),
the fast dense kernel (SDPA with the band mask), the fast blocked band, and full attention (window 0)
with the fast kernel, at several sequence lengths and windows.

GDPA on merged heads (``gdpa_heads``, the GDPA-PFFN product): one form run ``--iters`` times, to be timed as a
whole process and paired against another form:

    python benchmarks/ops_attention.py --gdpa grouped --threads 1 --batch 256 --heads 2 --dh 16 --lq 51 --lk 4

``--gdpa``: grouped (``gdpa_heads``, the fast path) | block_diagonal (the earlier fast path, kept here for the
comparison: one GEMM per example against block-diagonal keys / values, H× the multiply-adds) | reference;
``--acts silu,gelu``: per-head activations (cycled over the heads, as Kunlun's ``gdpa_activation``).
``--step``: instead of the op alone, ``--iters`` training steps (forward + backward) of the default Kunlun on
``--batch`` examples of ml-latest-small (``--lq`` − 1 events of history), its GDPA-PFFN running that form.
Results: ``benchmarks/results/ops_attention_gdpa.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kunlun.ops import attention as A


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dh", type=int, default=16)
    ap.add_argument("--gdpa", choices=["grouped", "block_diagonal", "reference"])
    ap.add_argument("--lq", type=int, default=51)
    ap.add_argument("--lk", type=int, default=4)
    ap.add_argument("--acts", default="silu,gelu")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--step", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gdpa and args.step:
        return run_kunlun_step(args)
    if args.gdpa:
        return run_gdpa(args)
    print(f"ms per forward+backward, batch {args.batch}, {args.heads} heads × {args.dh}, {args.threads} threads")
    print(f"{'L':>5} {'W':>4} {'reference':>10} {'dense':>8} {'blocked':>8} {'full W=0':>9}  chosen")
    for length, window in [(26, 8), (51, 16), (64, 8), (128, 16), (256, 16), (512, 16), (512, 64)]:
        ms = measure(args, length, window)
        chosen = "blocked" if A.blocked_pays(length, window) else "dense"
        print(f"{length:>5} {window:>4} {ms['reference']:>10.1f} {ms['dense']:>8.1f} {ms['blocked']:>8.1f} {ms['full']:>9.1f}  {chosen}")


def measure(args, length: int, window: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, length, args.dh, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.rand(args.batch, length, generator=gen) > 0.3
    band = mask[:, None, None, :] & A.band_mask(length, length, window)
    forwards = {
        "reference": lambda: A.softmax_attention_reference(q, k, v, mask, window),
        "dense": lambda: A._sdpa(q, k, v, band),
        "blocked": lambda: A._blocked_band(q, k, v, mask, window),
        "full": lambda: A._sdpa(q, k, v, mask[:, None, None, :]),
    }
    return {name: timed(lambda f=f: f().sum().backward()) for name, f in forwards.items()}


def run_gdpa(args) -> None:
    """``args.iters`` forward+backward passes of one ``gdpa_heads`` form; prints the mean ms per pass."""
    from kunlun import ops

    gen = torch.Generator().manual_seed(0)
    d = args.heads * args.dh
    names = args.acts.split(",")
    act = names[0] if len(names) == 1 else [names[h % len(names)] for h in range(args.heads)]
    head_mask = A.activation_heads(act, args.heads)
    q = torch.randn(args.batch, args.lq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(args.batch, args.lk, d, generator=gen, requires_grad=True) for _ in range(2))

    def once():
        if args.gdpa == "block_diagonal":
            out = gdpa_block_diagonal(q, k, v, args.heads, act, head_mask)
        else:
            with ops.using("reference" if args.gdpa == "reference" else "fast"):
                out = A.gdpa_heads(q, k, v, args.heads, act, head_mask=head_mask)
        out.sum().backward()

    print(f"gdpa_heads {args.gdpa}: {per_call_ms(once, args.iters):.3f} ms per forward+backward "
          f"(batch {args.batch}, {args.heads} heads × {args.dh}, Lq {args.lq}, Lk {args.lk}, {args.threads} threads)")


def per_call_ms(once, iters: int) -> float:
    """Milliseconds per call of ``once`` over ``iters`` calls, after one warm-up call."""
    once()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    return 1e3 * (time.perf_counter() - t0) / iters


def run_kunlun_step(args) -> None:
    """``args.iters`` training steps of the default Kunlun with its GDPA-PFFN on the ``args.gdpa`` form."""
    import numpy as np

    from kunlun import ops
    from kunlun.blocks import pffn
    from kunlun.blocks.embeddings import FeatureInfo
    from kunlun.config import model_from_dict
    from kunlun.data.batches import Batcher
    from kunlun.data.registry import prepare_dataset
    from kunlun.models import build_model
    from kunlun.training.step import TrainModel

    if args.gdpa == "block_diagonal":
        pffn.gdpa_heads = lambda q, k, v, heads, act, matmul=None, head_mask=None: (
            gdpa_block_diagonal(q, k, v, heads, act, head_mask) if heads > 1 else A.gdpa_heads(q, k, v, heads, act))
    p = prepare_dataset("ml-latest-small")
    info = FeatureInfo.from_encoder(p.encoder(), args.lq - 1)
    batch = Batcher(p, "train", args.lq - 1, event_windows=True).batch(np.arange(args.batch))
    torch.manual_seed(0)
    model = TrainModel(build_model(model_from_dict({"name": "kunlun"}), info)).train()

    def once():
        loss, _ = model(batch)
        loss.backward()

    with ops.using("reference" if args.gdpa == "reference" else "fast"):
        ms = per_call_ms(once, args.iters)
    print(f"kunlun step, gdpa {args.gdpa}: {ms:.1f} ms per step "
          f"(batch {args.batch}, history {args.lq - 1}, {args.threads} threads)")


def gdpa_block_diagonal(q, k, v, heads: int, act, head_mask) -> torch.Tensor:
    """``gdpa_heads`` with each head's keys and values placed in a block-diagonal [H·dh, H·Lk] / [H·Lk, H·dh]
    matrix: both products are single GEMMs per example on the merged layout and no head is transposed; the zero
    blocks cost H× the multiply-adds."""
    lk, d = k.shape[-2:]
    dh = d // heads
    channel_head = torch.arange(d, device=k.device) // dh
    column_head = torch.arange(heads * lk, device=k.device) // lk
    block = (channel_head[:, None] == column_head[None, :]).to(k.dtype)  # [H·dh, H·Lk]: head h's rows × its columns
    kb = k.transpose(1, 2).repeat(1, 1, heads) * block  # [B, H·dh, H·Lk]: column h·Lk + j = key j of head h
    vb = v.repeat(1, heads, 1) * block.T  # [B, H·Lk, H·dh]
    scores = torch.matmul(q, kb)  # [B, Lq, H·Lk]: head h's scores in its Lk columns
    a = A.head_activation(scores.unflatten(-1, (heads, lk)), act, head_mask, dim=2).flatten(-2)
    return torch.matmul(a * (1.0 / math.sqrt(dh)), vb)


if __name__ == "__main__":
    main()
