"""Ranking metrics, accumulated in float64 across batches: NE, logloss, AUC, gAUC, calibration.

NE = logloss / H(p̄) with p̄ the CTR of the *training* data (Meta's definition), so NE is comparable
across splits and models trained on the same data. AUC counts ties as half (Mann-Whitney); gAUC is
the impression-weighted mean of per-group AUC over groups that have both classes.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-7


def report_split(splits) -> str:
    """The split a result is reported on: ``test`` when the dataset has one, else ``valid`` (then the
    number is optimistic: early stopping chose the checkpoint on that same split). ``splits``: split names,
    or a metrics-by-split mapping."""
    return "test" if "test" in splits else "valid"


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs.astype(np.float64), EPS, 1 - EPS)
    y = labels.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _average_ranks(scores: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks of ``scores`` within each group, ties averaged; returns (order, ranks in that order)."""
    g = np.zeros(len(scores), dtype=np.int64) if groups is None else groups
    order = np.lexsort((scores, g))
    s, gg = scores[order], g[order]
    n = len(s)
    idx = np.arange(n)
    new_group = np.r_[True, gg[1:] != gg[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0))
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.r_[tie_first[1:], n] - 1
    avg = (tie_first + tie_last) / 2.0  # average 0-based position of the tie block
    ranks = avg[tie_id] - group_start + 1
    return order, ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    y = labels.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order, ranks = _average_ranks(scores.astype(np.float64))
    rank_sum = ranks[y[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    y = labels.astype(np.float64)
    _, inv = np.unique(groups, return_inverse=True)
    order, ranks = _average_ranks(scores.astype(np.float64), inv)
    g, yo = inv[order], y[order]
    k = inv.max() + 1 if len(inv) else 0
    n = np.bincount(g, minlength=k).astype(np.float64)
    pos = np.bincount(g, weights=yo, minlength=k)
    neg = n - pos
    rank_sum = np.bincount(g, weights=ranks * yo, minlength=k)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    per_group = (rank_sum[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return float(np.sum(per_group * n[ok]) / np.sum(n[ok]))


class MetricAccumulator:
    """Streams (labels, probabilities, groups) batch by batch; ``compute`` reduces once in float64."""

    def __init__(self, train_ctr: float):
        if not 0.0 < train_ctr < 1.0:
            raise ValueError(f"train_ctr must be in (0, 1), got {train_ctr}")
        self.train_ctr = train_ctr
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []

    def update(self, labels, probs, groups=None) -> None:
        self._labels.append(np.asarray(labels, dtype=np.float64).ravel())
        self._probs.append(np.asarray(probs, dtype=np.float64).ravel())
        if groups is not None:
            self._groups.append(np.asarray(groups).ravel())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        y = np.concatenate(self._labels) if self._labels else np.zeros(0)
        p = np.concatenate(self._probs) if self._probs else np.zeros(0)
        g = np.concatenate(self._groups) if self._groups else None
        return y, p, g

    def compute(self) -> dict[str, float]:
        y, p, g = self.arrays()
        if len(y) == 0:
            raise ValueError("no examples to score")
        ll = logloss(y, p)
        mean_label = float(y.mean())
        return {
            "ne": ll / binary_entropy(self.train_ctr),
            "logloss": ll,
            "auc": auc(y, p),
            "gauc": gauc(y, p, g) if g is not None else float("nan"),
            "calibration": float(p.mean() / mean_label) if mean_label > 0 else float("nan"),
            "examples": int(len(y)),
            "ctr": mean_label,
        }
