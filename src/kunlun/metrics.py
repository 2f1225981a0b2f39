"""Ranking metrics, accumulated in float64 across batches: NE, logloss, AUC, gAUC, calibration.

NE = logloss / H(p̄) with p̄ the CTR of the *training* data (Meta's definition), so NE is comparable
across splits and models trained on the same data. AUC counts ties as half (Mann-Whitney); gAUC is
the impression-weighted mean of per-group AUC over groups that have both classes.
"""

from __future__ import annotations

import math
from fractions import Fraction

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
    """Streams (labels, probabilities, groups) batch by batch into mergeable state; ``compute`` reduces it.

    NE, logloss, calibration and CTR come from running float64 sums (examples, positives, Σ log-likelihood,
    Σ probability): constant memory, and two accumulators (other batches, other ranks) merge by adding.

    AUC and gAUC are exact, from a count table: for each distinct (group, score) pair, the number of positive
    and of negative examples seen with it (integers). AUC is a function of that table alone — the Mann-Whitney
    U statistic is Σ over distinct scores of positives × (negatives below + ½ negatives tied) — so merging
    tables (adding counts of equal keys) gives exactly the AUC of all the data, whatever the batching or order.
    Why not a histogram of binned scores: binning merges distinct scores into ties, so the AUC is then only
    approximate. The price of exactness: the table grows with the number of distinct (group, score) pairs —
    at most the number of examples, usually fewer (scores tie, groups repeat) — so AUC state is not constant.

    Bit for bit: fed all of a split in one ``update`` (as ``kunlun.training.trainer.evaluate`` does), every
    metric equals the reference functions above (``logloss``, ``auc``, ``gauc``) to the last bit; fed in
    several updates, AUC and gAUC are still identical (integer counts) and the float sums may differ in the
    last bits (floating-point addition is not associative).

    ``state()`` is plain numbers and arrays (to send between processes); ``merge`` adds another accumulator.
    """

    def __init__(self, train_ctr: float):
        if not 0.0 < train_ctr < 1.0:
            raise ValueError(f"train_ctr must be in (0, 1), got {train_ctr}")
        self.train_ctr = train_ctr
        self.examples = 0
        self.label_sum = 0.0  # Σ y (positives, for 0/1 labels): exact in float64 up to 2**53 examples
        self.log_likelihood = 0.0  # Σ y·ln p + (1 − y)·ln(1 − p), p clipped to [EPS, 1 − EPS]
        self.prob_sum = 0.0  # Σ p
        self.has_groups: bool | None = None  # None until the first update: every update must agree
        # the count table, sorted by (group, score): group 0 for all when no groups are given
        self.group = np.zeros(0, dtype=np.int64)
        self.score = np.zeros(0, dtype=np.float64)
        self.pos = np.zeros(0, dtype=np.int64)
        self.neg = np.zeros(0, dtype=np.int64)

    def update(self, labels, probs, groups=None) -> None:
        y = np.asarray(labels, dtype=np.float64).ravel()
        p = np.asarray(probs, dtype=np.float64).ravel()
        if len(y) != len(p):
            raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
        if self.has_groups is not None and self.has_groups != (groups is not None):
            raise ValueError("give groups with every update or with none")
        self.has_groups = groups is not None
        g = np.zeros(len(y), dtype=np.int64) if groups is None else np.asarray(groups).ravel().astype(np.int64)
        pc = np.clip(p, EPS, 1 - EPS)
        self.examples += len(y)
        self.label_sum += float(np.sum(y))
        self.log_likelihood += float(np.sum(y * np.log(pc) + (1 - y) * np.log1p(-pc)))
        self.prob_sum += float(np.sum(p))
        positive = y.astype(bool)
        self._add_counts(g, p, positive.astype(np.int64), (~positive).astype(np.int64))

    def _add_counts(self, g: np.ndarray, s: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> None:
        g, s = np.concatenate([self.group, g]), np.concatenate([self.score, s])
        pos, neg = np.concatenate([self.pos, pos]), np.concatenate([self.neg, neg])
        order = np.lexsort((s, g))
        g, s, pos, neg = g[order], s[order], pos[order], neg[order]
        start = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]) if len(g) else np.zeros(0, dtype=np.int64)
        self.group, self.score = g[start], s[start]
        self.pos = np.add.reduceat(pos, start) if len(start) else pos[:0]
        self.neg = np.add.reduceat(neg, start) if len(start) else neg[:0]

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add ``other``'s examples (another process, or other batches) to this accumulator; returns self."""
        if other.train_ctr != self.train_ctr:
            raise ValueError("accumulators with different training CTRs do not merge")
        if None not in (self.has_groups, other.has_groups) and self.has_groups != other.has_groups:
            raise ValueError("one accumulator has groups and the other has none")
        if other.has_groups is not None:
            self.has_groups = other.has_groups
        self.examples += other.examples
        self.label_sum += other.label_sum
        self.log_likelihood += other.log_likelihood
        self.prob_sum += other.prob_sum
        self._add_counts(other.group, other.score, other.pos, other.neg)
        return self

    def state(self) -> dict:
        """Everything ``compute`` needs, as numbers and numpy arrays."""
        return {k: getattr(self, k) for k in ("train_ctr", "examples", "label_sum", "log_likelihood", "prob_sum", "has_groups",
                                               "group", "score", "pos", "neg")}

    @classmethod
    def from_state(cls, state: dict) -> MetricAccumulator:
        acc = cls(state["train_ctr"])
        for k, v in state.items():
            setattr(acc, k, v)
        return acc

    @staticmethod
    def _u2(pos: np.ndarray, neg: np.ndarray, block: np.ndarray) -> np.ndarray:
        """2·U (Mann-Whitney) per block of a table sorted by (block, score): Σ pos · (2·neg below + neg tied)."""
        cum = np.cumsum(neg)
        first = np.r_[True, block[1:] != block[:-1]]
        before_block = np.maximum.accumulate(np.where(first, cum - neg, 0))  # negatives of earlier blocks
        neg_below = cum - neg - before_block
        terms = pos * (2 * neg_below + neg)
        starts = np.flatnonzero(first)
        return np.add.reduceat(terms, starts)

    def _auc(self) -> float:
        order = np.argsort(self.score, kind="stable")
        s, pos, neg = self.score[order], self.pos[order], self.neg[order]
        start = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        pos, neg = np.add.reduceat(pos, start), np.add.reduceat(neg, start)
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        u2 = int(self._u2(pos, neg, np.zeros(len(pos), dtype=np.int64))[0])
        return float(u2 / 2) / float(n_pos * n_neg) if u2 < 2**53 and n_pos * n_neg < 2**53 else float(Fraction(u2, 2 * n_pos * n_neg))

    def _gauc(self) -> float:
        start = np.flatnonzero(np.r_[True, self.group[1:] != self.group[:-1]])
        pos, neg = np.add.reduceat(self.pos, start), np.add.reduceat(self.neg, start)
        u2 = self._u2(self.pos, self.neg, self.group)
        ok = (pos > 0) & (neg > 0)
        if not ok.any():
            return float("nan")
        pos_f, neg_f = pos[ok].astype(np.float64), neg[ok].astype(np.float64)
        per_group = (u2[ok].astype(np.float64) / 2) / (pos_f * neg_f)
        n = pos_f + neg_f
        return float(np.sum(per_group * n) / np.sum(n))

    def compute(self) -> dict[str, float]:
        if self.examples == 0:
            raise ValueError("no examples to score")
        n = self.examples
        ll = -(self.log_likelihood / n)
        mean_label = self.label_sum / n
        return {
            "ne": ll / binary_entropy(self.train_ctr),
            "logloss": ll,
            "auc": self._auc(),
            "gauc": self._gauc() if self.has_groups else float("nan"),
            "calibration": float((self.prob_sum / n) / mean_label) if mean_label > 0 else float("nan"),
            "examples": int(n),
            "ctr": mean_label,
        }


def metrics_table(metrics: dict[str, dict[str, float]], title: str = "") -> None:
    """Metrics by split (``kunlun train`` / ``kunlun eval``) as a table on stdout."""
    from rich.table import Table

    from kunlun.console import out_console

    table = Table(title=title or None)
    table.add_column("split")
    for col in ("NE", "logloss", "AUC", "gAUC", "calibration", "examples"):
        table.add_column(col, justify="right")
    for split, m in metrics.items():
        table.add_row(split, f"{m['ne']:.4f}", f"{m['logloss']:.4f}", f"{m['auc']:.4f}", f"{m['gauc']:.4f}",
                      f"{m['calibration']:.3f}", str(m["examples"]))
    out_console().print(table)
