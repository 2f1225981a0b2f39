"""Sliding-window attention, forward + backward, per implementation: the measurement behind
``kunlun.ops.attention.blocked_pays`` (when the blocked band beats the dense masked kernel).

    python benchmarks/ops_attention.py [--threads 2] [--batch 256] [--heads 2] [--dh 16]

Prints median milliseconds per forward+backward for: the reference (explicit matmuls, band as a mask),
the fast dense kernel (SDPA with the band mask), the fast blocked band, and full attention (window 0)
with the fast kernel, at several sequence lengths and windows.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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

if __name__ == "__main__":
    main()
