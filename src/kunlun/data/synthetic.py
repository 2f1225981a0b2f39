"""A synthetic recommendation world whose click probability is known, so every split's best possible NE is known.

``generate(out, examples, seed)`` (CLI: ``kunlun data synth --out DIR --examples N --seed S``) simulates users
who are shown items one impression at a time and writes the impressions, in time order per user, to Parquet
shards. Each impression's label is drawn from a probability ``p_true`` that the simulator computes and keeps,
so ``bayes.json`` can state the NE of predicting ``p_true`` on every split. ``kunlun train --dataset DIR``
(or ``--dataset NAME --data-dir PARENT``) trains on it like any other dataset (``load_synthetic`` below).

**What it models.**

- *Users and items with latent factors*: item ``i`` has a vector ``v_i`` (its category's centre plus noise) and a
  quality; user ``u`` a long-term interest vector. Affinity = ``√K · u·v``.
- *Popularity skew*: non-personal impressions draw items from a Zipf law over items (exponent
  ``popularity_exponent``); popular items are slightly better on average (popularity is ranked on noisy quality).
- *Event types with different signal*: every impression is a ``skip`` (no click), a ``click`` or a ``like`` (a
  click that was also liked). Clicks depend on quality, context, short-term interest, repeats and affinity; a like
  depends on affinity alone, so a like says more about a user's lasting taste than a click, and a skip the opposite.
- *Sequential dynamics*: long-term interest drifts between sessions (an Ornstein-Uhlenbeck walk with time
  constant ``drift_days``; it also sets the categories a user browses in a session); a short-term interest (the
  recent items, weighted like > click > skip (negative), decaying with ``short_term_minutes``) lifts items similar
  to what the user just engaged with; *repeat consumption*: items the user clicked recently are shown again
  (``repeat_share``) and are more likely clicked again, decaying with ``repeat_days``; sessions (gaps of seconds
  to minutes inside, days between).
- *Context*: device (a main device per user), hour of day (each category has its own daily rhythm), position in
  the session (position bias).
- *Features a model sees*: user id, user segment (a coarse function of the user's initial taste), item id,
  category, device, hour, weekday, position; history length and time since the previous event; the history
  (items, event types, categories, times; every earlier impression of the user).

**What it does not model.** No ranking policy that reacts to the model (impressions are drawn from fixed
mixtures, not from a trained ranker, so there is no feedback loop and no exploration problem); no item
life-cycle (items exist for the whole log; popularity does not change with time); no cross-user effects
(trends, social influence); no delayed or missing labels; no text or image features; one impression at a time
(no slates); the timeline of each user is independent of all others. The label is drawn independently given the
latent state, so noise is exactly Bernoulli.

**What "Bayes NE" means here.** ``bayes.json`` holds, per split, the NE of ``p_true``: mean log-loss of
``p_true`` divided by the entropy of the training CTR (``ne``, the project's NE, comparable with ``kunlun
train``'s numbers) and by the entropy of the split's own CTR (``ne_own_ctr``). ``p_true`` is the probability given
the *whole* latent state (user and item vectors, drift), which a model can only estimate from ids and histories,
so no model beats it in expectation; a finite split can, by chance, by about ``ne_std`` (written too).

**Determinism.** Every random number is a hash of ``(seed, user, event index, purpose)`` (SplitMix64's finaliser),
and items come from a generator seeded with ``seed``: a user's timeline is the same however users are grouped
into chunks, and per-element float64 arithmetic (no BLAS, no reductions whose order depends on the array size)
keeps it so to the last bit. Same seed → byte-identical shards, for any ``chunk_users`` (with the same numpy and
pyarrow versions: numpy's generators and Parquet's encoder may change between versions); ``shard_rows`` only
decides where files break. Memory is bounded by the chunk (``chunk_users`` users at a time, about
``chunk_users × events_per_user`` rows) and the item table, never by ``examples``.

**On-disk layout** (``DIR/``): ``synth.json`` (format, parameters, shard list), ``bayes.json``,
``items.parquet`` (item, category, quality, popularity weight: ground truth, not read by training) and
``part-00000.parquet``, …: one row per impression, sorted by user then time: ``user, item, category, segment,
device, position, time, event (0 skip / 1 click / 2 like), label, p_true, split (0 train / 1 valid / 2 test)``.
The split is per user and chronological like MovieLens (first 80 % of a user's impressions train, next 10 % valid,
last 10 % test).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.data.stream import Chunk
from kunlun.errors import KunlunError
from kunlun.files import atomic_dir

FORMAT = "kunlun-synthetic"
VERSION = 1
MANIFEST = "synth.json"
BAYES = "bayes.json"
ITEMS = "items.parquet"
EVENTS = ("skip", "click", "like")
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.9)  # the MovieLens rule: a user's position / count < 0.8 train, < 0.9 valid, else test
T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC: timelines start within start_span_days of this
ROW_GROUP = 65_536  # rows per Parquet row group: fixed, so files do not depend on the chunking
LOSS_SCALE = 2.0**32  # per-row log-losses are summed as integers in these units: exact, order-independent sums
DEVICES = 3  # 0 phone, 1 desktop, 2 tv
SEGMENTS = 8
REPEAT_SLOTS = 8  # the recently clicked items a user may be shown again
MAX_POSITION = 50  # positions in a session beyond this are written as MAX_POSITION


@dataclass(frozen=True)
class World:
    """Parameters of the world (everything but the seed and the size). Defaults give a CTR near 0.33, a Bayes NE
    near 0.75, and skip / click / like in about 67 / 13 / 20 % of impressions."""

    items: int = 20_000
    categories: int = 32
    dim: int = 16  # K, latent dimension
    events_per_user: float = 50.0  # mean impressions per user (log-normal, σ = 1, clipped to [min, max])
    min_events: int = 5
    max_events: int = 2_000
    popularity_exponent: float = 1.0  # Zipf exponent of non-personal exposure over items
    popular_share: float = 0.3  # impressions drawn by popularity alone (the rest: personal or repeats)
    repeat_share: float = 0.08  # impressions that show again an item the user clicked recently
    base_logit: float = -2.0
    quality_weight: float = 1.0
    affinity_weight: float = 0.8  # long-term affinity (√K·u·v has std 1)
    short_term_weight: float = 0.6
    repeat_weight: float = 1.2
    position_weight: float = -0.25  # × log(position in session)
    device_bias: tuple[float, ...] = (0.0, -0.3, 0.25)
    hour_amplitude: float = 0.4  # largest daily rhythm of a category (logit)
    like_base: float = -2.5
    like_affinity_weight: float = 2.0
    drift_days: float = 60.0
    short_term_minutes: float = 30.0
    repeat_days: float = 3.0
    session_events: float = 8.0  # mean impressions per session
    session_gap_seconds: float = 90.0  # mean gap inside a session
    day_gap_days: float = 1.5  # mean gap between sessions
    start_span_days: float = 120.0

    def __post_init__(self) -> None:
        checks = [
            ("items", self.items >= 2), ("categories", 1 <= self.categories <= self.items), ("dim", self.dim >= 1),
            ("events_per_user", self.events_per_user >= 1), ("min_events", self.min_events >= 1),
            ("max_events", self.max_events >= self.min_events),
            ("popular_share", 0 <= self.popular_share <= 1), ("repeat_share", 0 <= self.repeat_share <= 1),
            ("popular_share + repeat_share", self.popular_share + self.repeat_share <= 1),
            ("device_bias", len(self.device_bias) == DEVICES),
        ]
        for name, ok in checks:
            if not ok:
                raise KunlunError(f"synthetic world: {name} is out of range ({getattr(self, name, '')})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_bias"] = list(self.device_bias)
        return d


def world_with(overrides: list[str] | tuple[str, ...], world: World | None = None) -> World:
    """``world`` (default ``World()``) with ``key=value`` overrides of its fields, as ``kunlun data synth`` takes them
    (``drift_days=20 short_term_weight=1``; ``device_bias=0,-0.3,0.25``). A bad key or value is one line naming it."""
    fields = World.__dataclass_fields__
    changes: dict[str, Any] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise KunlunError(f"synthetic world: {text!r} is not key=value with a known key; keys: {', '.join(fields)}")
        kind = type(getattr(World, key)) if key != "device_bias" else tuple
        try:
            if kind is tuple:
                changes[key] = tuple(float(v) for v in value.split(","))
            elif kind is int:
                changes[key] = parse_count(value)
            else:
                changes[key] = float(value)
        except (ValueError, KunlunError):
            raise KunlunError(f"synthetic world: key {key}: expected {'numbers, comma-separated' if kind is tuple else 'a number'}, "
                              f"got {value!r}") from None
        if kind is float and not math.isfinite(changes[key]):
            raise KunlunError(f"synthetic world: key {key}: expected a finite number, got {value!r}")
    return replace(world or World(), **changes)


# ----------------------------------------------------------------------------- counter-based randomness

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scrambles every input bit into every output bit
    (multiplication modulo 2^64: the wrap-around is the point)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _derive(key: np.ndarray, value) -> np.ndarray:
    """A new key from ``key`` and an integer (array); distinct values give unrelated keys."""
    v = np.asarray(value).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _mix(key ^ _mix((v + np.uint64(1)) * _GOLDEN))


def _purpose(p: int, width: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix((np.uint64(p) << np.uint64(32) | np.arange(width, dtype=np.uint64)) * _GOLDEN + np.uint64(1))


class _Streams:
    """Uniforms in (0, 1) as a pure function of (per-row key, purpose, column)."""

    def __init__(self, widths: dict[str, int]):
        self.const = {name: _purpose(i + 1, w) for i, (name, w) in enumerate(widths.items())}

    def uniform(self, key: np.ndarray, name: str) -> np.ndarray:
        z = _mix(key[:, None] ^ self.const[name][None, :])
        return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # [len(key), width], never 0 or 1


# ----------------------------------------------------------------------------- the world's fixed parts

@dataclass
class _Items:
    category: np.ndarray  # [I] int
    quality: np.ndarray  # [I]
    vec: np.ndarray  # [I, K]
    weight: np.ndarray  # [I] Zipf exposure weight (sums to 1)
    cdf: np.ndarray  # [I] cumulative weight over all items
    by_cat: np.ndarray  # item ids sorted by category (stable)
    cat_cdf: np.ndarray  # cumulative weight along by_cat
    cat_lo: np.ndarray  # [C] first position of each category in by_cat
    cat_hi: np.ndarray  # [C] one past the last
    cat_log_share: np.ndarray  # [C] log of each category's exposure share
    centres: np.ndarray  # [C, K]
    segment_dirs: np.ndarray  # [SEGMENTS, K]
    hour_amp: np.ndarray  # [C]
    hour_phase: np.ndarray  # [C] hours


def _make_items(world: World, seed: int) -> _Items:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    C, K, n = world.categories, world.dim, world.items
    cat_p = 1.0 / np.arange(1, C + 1) ** 0.7
    category = rng.choice(C, size=n, p=cat_p / cat_p.sum())
    category[:C] = np.arange(C)  # every category has at least one item
    centres = rng.normal(0, 1 / math.sqrt(K), size=(C, K))
    vec = 0.8 * centres[category] + 0.6 * rng.normal(0, 1 / math.sqrt(K), size=(n, K))
    quality = rng.normal(0, 0.5, size=n)
    rank = np.argsort(np.argsort(-(quality + rng.normal(0, 1, size=n)), kind="stable"), kind="stable")
    weight = 1.0 / (rank + 1.0) ** world.popularity_exponent
    weight /= weight.sum()
    by_cat = np.argsort(category, kind="stable")
    cat_lo = np.searchsorted(category[by_cat], np.arange(C), side="left")
    cat_hi = np.searchsorted(category[by_cat], np.arange(C), side="right")
    share = np.bincount(category, weights=weight, minlength=C)
    return _Items(
        category=category, quality=quality, vec=vec, weight=weight, cdf=np.cumsum(weight), by_cat=by_cat,
        cat_cdf=np.cumsum(weight[by_cat]), cat_lo=cat_lo, cat_hi=cat_hi, cat_log_share=np.log(share),
        centres=centres, segment_dirs=rng.normal(0, 1, size=(SEGMENTS, K)),
        hour_amp=rng.uniform(0, world.hour_amplitude, size=C), hour_phase=rng.uniform(0, 24, size=C),
    )


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products over the last axis ([n, K]·[n, K] → [n]; [n, 1, K]·[1, C, K] → [n, C]) as a fixed sequence of
    element-wise operations: the same bits for a row whatever the array's size (BLAS and numpy's reductions may
    change the summation order with the shape, and so the last bit)."""
    out = a[..., 0] * b[..., 0]
    for j in range(1, a.shape[-1]):
        out += a[..., j] * b[..., j]
    return out


# ----------------------------------------------------------------------------- users

def _user_static(world: World, seed: int, users: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user draws that do not change over time: number of impressions (before the size cut), start time,
    main device, initial long-term interest [n, K]."""
    from scipy.special import ndtri  # here, not at the top: every dataset's import path passes through this module

    key = _derive(_derive(np.full(len(users), seed, dtype=np.uint64), 1), users)
    streams = _Streams({"static": 4, "taste": world.dim})
    u = streams.uniform(key, "static")
    sigma = 1.0
    mu = math.log(world.events_per_user) - sigma**2 / 2
    count = np.clip(np.rint(np.exp(mu + sigma * ndtri(u[:, 0]))), world.min_events, world.max_events).astype(np.int64)
    start = T0 + np.floor(u[:, 1] * world.start_span_days * 86400).astype(np.int64)
    device = np.minimum(np.floor(u[:, 2] * DEVICES), DEVICES - 1).astype(np.int64)
    taste = ndtri(streams.uniform(key, "taste")) / math.sqrt(world.dim)
    return {"count": count, "start": start, "device": device, "taste": taste, "key": key}


def _counts_until(world: World, seed: int, first_user: int, n_users: int, rows_before: int, examples: int) -> np.ndarray:
    """Impressions of users first_user.. first_user + n_users − 1, cut so that the total never exceeds ``examples``
    (users past the cut get 0)."""
    users = np.arange(first_user, first_user + n_users, dtype=np.int64)
    count = _user_static(world, seed, users)["count"]
    before = rows_before + np.concatenate([[0], np.cumsum(count)[:-1]])
    return np.clip(examples - before, 0, count)


def _simulate(world: World, seed: int, items: _Items, first_user: int, count: np.ndarray,
              on_step: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """The timelines of users first_user.., with ``count`` impressions each: rows sorted by user, then time.

    Users advance together, one impression per step; every random number is a hash of (seed, user, step), so a
    user's timeline does not depend on the other users simulated with it."""
    from scipy.special import ndtri

    active_users = np.flatnonzero(count > 0)
    users = first_user + active_users
    static = _user_static(world, seed, users)
    n_events = count[active_users]
    order = np.argsort(-n_events, kind="stable")  # most active first: the users still active at step t are a prefix
    users, n_events = users[order], n_events[order]
    key = static["key"][order]
    main_device = static["device"][order]
    taste = static["taste"][order]
    clock = static["start"][order].copy()
    K, C = world.dim, world.categories
    # per step: 0 new session, 1 gap, 2 device kept, 3 other device, 4 mode, 5 item, 6 repeat slot, 7 category,
    # 8 click, 9 like; per new session: the drift noise
    streams = _Streams({"step": 10, "drift": K})
    segment = np.argmax(_dot(taste[:, None, :], items.segment_dirs[None, :, :]), axis=1)  # first maximum on ties
    n = len(users)
    u = taste.copy()  # long-term interest: drifts between sessions
    s = np.zeros((n, K))  # short-term interest
    cat_cdf = np.zeros((n, C))  # cumulative category preference, computed from u at each session start
    position = np.zeros(n, dtype=np.int64)
    device = main_device.copy()
    drifted_at = clock.copy()
    buf_item = np.full((n, REPEAT_SLOTS), -1, dtype=np.int64)
    buf_time = np.zeros((n, REPEAT_SLOTS), dtype=np.int64)
    buf_next = np.zeros(n, dtype=np.int64)
    steps = int(n_events[0]) if n else 0
    active_at = np.searchsorted(-n_events, -np.arange(steps), side="left")  # users with n_events > t
    w_event = np.array([-0.2, 0.5, 1.0])  # skip, click, like: how much an impression moves short-term interest
    device_bias = np.asarray(world.device_bias)
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("user", "item", "category", "segment", "device", "position",
                                                         "time", "event", "p_true", "split", "step")}
    for t in range(steps):
        k = int(active_at[t])
        key_t = _derive(key[:k], t)
        r = streams.uniform(key_t, "step")
        # time: a new session (gap of days) with probability 1 / session_events, else a gap of seconds
        if t == 0:
            new_session = np.ones(k, dtype=bool)
            gap = np.zeros(k, dtype=np.int64)
        else:
            new_session = r[:, 0] < 1.0 / world.session_events
            mean = np.where(new_session, world.day_gap_days * 86400, world.session_gap_seconds)
            gap = 1 + np.floor(-np.log(r[:, 1]) * mean).astype(np.int64)
        clock[:k] += gap
        now = clock[:k]
        position[:k] = np.where(new_session, 1, position[:k] + 1)
        other = np.minimum(np.floor(r[:, 3] * DEVICES), DEVICES - 1).astype(np.int64)
        device[:k] = np.where(new_session, np.where(r[:, 2] < 0.8, main_device[:k], other), device[:k])
        # at a session start: long-term drift (Ornstein-Uhlenbeck, exact over the time since the last session start)
        # and the session's category preferences
        fresh = np.flatnonzero(new_session)
        rho = np.exp(-(now[fresh] - drifted_at[fresh]) / (world.drift_days * 86400))
        noise = ndtri(streams.uniform(key_t[fresh], "drift")) / math.sqrt(K)
        u[fresh] = rho[:, None] * u[fresh] + np.sqrt(1 - rho * rho)[:, None] * noise
        drifted_at[fresh] = now[fresh]
        cat_logit = 2.0 * math.sqrt(K) * _dot(u[fresh][:, None, :], items.centres[None, :, :]) + items.cat_log_share
        cat_cdf[fresh] = np.cumsum(np.exp(cat_logit - cat_logit.max(axis=1, keepdims=True)), axis=1)
        s[:k] *= np.exp(-gap / (world.short_term_minutes * 60))[:, None]
        # which item is shown: a recent click again, a popular item, or an item of a category the user likes now
        filled = np.minimum(buf_next[:k], REPEAT_SLOTS)
        repeat = (r[:, 4] < world.repeat_share) & (filled > 0)
        popular = ~repeat & (r[:, 4] < world.repeat_share + world.popular_share)
        cat = np.minimum(np.sum(cat_cdf[:k] <= (r[:, 7] * cat_cdf[:k, -1])[:, None], axis=1), C - 1)
        lo, hi = items.cat_lo[cat], items.cat_hi[cat]
        below = np.where(lo > 0, items.cat_cdf[np.maximum(lo - 1, 0)], 0.0)
        target = below + r[:, 5] * (items.cat_cdf[hi - 1] - below)
        personal = items.by_cat[np.clip(np.searchsorted(items.cat_cdf, target, side="right"), lo, hi - 1)]
        pop_item = np.minimum(np.searchsorted(items.cdf, r[:, 5] * items.cdf[-1], side="right"), world.items - 1)
        slot = np.minimum(np.floor(r[:, 6] * np.maximum(filled, 1)).astype(np.int64), REPEAT_SLOTS - 1)
        again = buf_item[np.arange(k), slot]
        item = np.where(repeat, again, np.where(popular, pop_item, personal))
        # the click probability
        v = items.vec[item]
        affinity = math.sqrt(K) * _dot(u[:k], v)
        short = _dot(s[:k], v)
        seen = buf_item[:k] == item[:, None]
        was_clicked = seen.any(axis=1)
        since = now - np.where(was_clicked, np.max(np.where(seen, buf_time[:k], 0), axis=1), now)
        repeat_term = np.where(was_clicked, world.repeat_weight * np.exp(-since / (world.repeat_days * 86400)), 0.0)
        c = items.category[item]
        hour = (now // 3600) % 24
        rhythm = items.hour_amp[c] * np.cos(2 * np.pi * (hour - items.hour_phase[c]) / 24)
        logit = (world.base_logit + world.quality_weight * items.quality[item] + world.affinity_weight * affinity
                 + world.short_term_weight * short + repeat_term + world.position_weight * np.log(position[:k])
                 + device_bias[device[:k]] + rhythm)
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -15.0, 15.0)))
        click = r[:, 8] < p
        like_p = 1.0 / (1.0 + np.exp(-(world.like_base + world.like_affinity_weight * affinity)))
        event = np.where(click, np.where(r[:, 9] < like_p, 2, 1), 0)
        # state updates: short-term interest, recently clicked items
        s[:k] += w_event[event][:, None] * v
        rows = np.flatnonzero(click)
        ptr = buf_next[rows] % REPEAT_SLOTS
        buf_item[rows, ptr] = item[rows]
        buf_time[rows, ptr] = now[rows]
        buf_next[rows] += 1
        frac = t / n_events[:k]
        for name, val in (("user", users[:k]), ("item", item), ("category", c), ("segment", segment[:k]),
                          ("device", device[:k]), ("position", np.minimum(position[:k], MAX_POSITION)), ("time", now.copy()),
                          ("event", event), ("p_true", p),
                          ("split", np.where(frac < SPLIT_FRACTIONS[0], 0, np.where(frac < SPLIT_FRACTIONS[1], 1, 2))),
                          ("step", np.full(k, t))):
            cols[name].append(val)
        if on_step:
            on_step(k)
    out = {name: np.concatenate(v) if v else np.zeros(0) for name, v in cols.items()}
    by_user = np.lexsort((out.pop("step"), out["user"]))
    out = {name: v[by_user] for name, v in out.items()}
    out["label"] = (out["event"] > 0).astype(np.int8)
    return out


SHARD_SCHEMA = pa.schema([
    ("user", pa.int64()), ("item", pa.int32()), ("category", pa.int16()), ("segment", pa.int8()), ("device", pa.int8()),
    ("position", pa.int16()), ("time", pa.int64()), ("event", pa.int8()), ("label", pa.int8()), ("p_true", pa.float64()),
    ("split", pa.int8()),
])


class _ShardWriter:
    """Appends rows to part-NNNNN.parquet files of exactly ``shard_rows`` rows (the last may be shorter), in row
    groups of ROW_GROUP rows: the files depend on the rows only, not on how they arrive."""

    def __init__(self, directory: Path, shard_rows: int):
        self.directory, self.shard_rows = directory, shard_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.in_shard = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, columns: dict[str, np.ndarray]) -> None:
        t = pa.table({f.name: pa.array(columns[f.name].astype(f.type.to_pandas_dtype())) for f in SHARD_SCHEMA}, schema=SHARD_SCHEMA)
        self.pending.append(t)
        self.pending_rows += t.num_rows
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        # write as soon as a whole row group (or the rest of the current shard) is waiting: at most that many rows
        # plus one chunk's are ever held
        while self.pending_rows and (self.pending_rows >= min(ROW_GROUP, self.shard_rows - self.in_shard) or final):
            if self.writer is None:
                name = f"part-{len(self.shards):05d}.parquet"
                self.writer = pq.ParquetWriter(self.directory / name, SHARD_SCHEMA, compression="zstd")
                self.shards.append({"file": name, "rows": 0})
                self.in_shard = 0
            take = min(ROW_GROUP, self.pending_rows, self.shard_rows - self.in_shard)
            table = pa.concat_tables(self.pending)
            # one contiguous chunk per column: the writer's page boundaries then depend on the rows only
            self.writer.write_table(table.slice(0, take).combine_chunks(), row_group_size=take)
            rest = table.slice(take)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            self.in_shard += take
            self.shards[-1]["rows"] += take
            if self.in_shard == self.shard_rows:
                self.writer.close()
                self.writer, self.in_shard = None, 0

    def close(self) -> list[dict[str, Any]]:
        self._drain(final=True)
        if self.writer is not None:
            self.writer.close()
        return self.shards


def _entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


class _BayesSums:
    """Per split: rows, positives, Σ log-loss of p_true and Σ its square (integers in 2^-32 units: exact, so the
    result is the same whatever the chunking), Σ p_true."""

    def __init__(self):
        self.sums = {s: {"rows": 0, "positives": 0, "loss": 0, "loss_sq": 0, "p": 0} for s in SPLITS}

    def add(self, rows: dict[str, np.ndarray]) -> None:
        y, p = rows["label"].astype(np.float64), rows["p_true"]
        loss = -(y * np.log(p) + (1 - y) * np.log1p(-p))
        for k, name in enumerate(SPLITS):
            m = rows["split"] == k
            acc = self.sums[name]
            acc["rows"] += int(m.sum())
            acc["positives"] += int(rows["label"][m].sum())
            acc["loss"] += int(np.rint(loss[m] * LOSS_SCALE).astype(np.int64).sum())
            acc["loss_sq"] += int(np.rint(loss[m] ** 2 * LOSS_SCALE).astype(np.int64).sum())
            acc["p"] += int(np.rint(p[m] * LOSS_SCALE).astype(np.int64).sum())

    def result(self) -> dict[str, Any]:
        train = self.sums["train"]
        train_ctr = train["positives"] / train["rows"] if train["rows"] else float("nan")
        out: dict[str, Any] = {"definition": "NE of p_true: mean log-loss / entropy of the training CTR (ne) or of the "
                                             "split's own CTR (ne_own_ctr); ne_std: standard error of ne over the split's rows",
                               "train_ctr": train_ctr, "splits": {}}
        for name, acc in self.sums.items():
            n = acc["rows"]
            if not n:
                continue
            ctr = acc["positives"] / n
            loss = acc["loss"] / LOSS_SCALE / n
            var = max(acc["loss_sq"] / LOSS_SCALE / n - loss * loss, 0.0)
            h_train = _entropy(train_ctr) if 0 < train_ctr < 1 else float("nan")
            out["splits"][name] = {
                "rows": n, "positives": acc["positives"], "ctr": ctr, "mean_p_true": acc["p"] / LOSS_SCALE / n,
                "logloss": loss, "ne": loss / h_train,
                "ne_own_ctr": loss / _entropy(ctr) if 0 < ctr < 1 else float("nan"),
                "ne_std": math.sqrt(var / n) / h_train,
            }
        return out


def parse_count(text: str | int) -> int:
    """A row count as a user writes it: 250000, 250_000, 250k, 1M, 1.5M, 1e8, 2G."""
    if isinstance(text, int):
        return text
    t = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:].lower(), 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise KunlunError(f"{text!r} is not a count (examples: 250000, 250k, 1M, 1e8)") from None
    if not math.isfinite(value) or value != int(value):
        raise KunlunError(f"{text!r} is not a whole number of rows")
    return int(value)


def default_chunk_users(world: World) -> int:
    """About 2^18 impressions per chunk."""
    return max(16, int(2**18 / world.events_per_user))


def check_request(out: Path, examples: int, chunk_users: int | None, shard_rows: int) -> None:
    """The user errors ``generate`` refuses, checked before any work (or progress bar) starts."""
    if examples < 1:
        raise KunlunError(f"--examples must be at least 1, got {examples}")
    if shard_rows < 1:
        raise KunlunError(f"--shard-rows must be at least 1, got {shard_rows}")
    if chunk_users is not None and chunk_users < 1:
        raise KunlunError(f"--chunk-users must be at least 1, got {chunk_users}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KunlunError(f"{out}: already exists and is not an empty directory; choose a new --out")


def generate(out: Path, examples: int, seed: int = 0, world: World | None = None, *, chunk_users: int | None = None,
             shard_rows: int = 1_000_000, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write ``examples`` impressions of the world ``world`` (default ``World()``) with ``seed`` into ``out``
    (created; must not exist or be empty); returns the manifest. ``progress(rows_done, examples)`` is called as
    rows are simulated. ``chunk_users`` (users simulated together) trades memory for speed and never changes a byte
    of the output; ``shard_rows`` is the number of rows per Parquet file."""
    world = world or World()
    out = Path(out)
    check_request(out, examples, chunk_users, shard_rows)
    chunk = chunk_users or default_chunk_users(world)
    items = _make_items(world, seed)
    started = time.perf_counter()
    manifest: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        pq.write_table(pa.table({"item": np.arange(world.items, dtype=np.int32), "category": items.category.astype(np.int16),
                                 "quality": items.quality, "popularity": items.weight}), tmp / ITEMS, compression="zstd")
        writer = _ShardWriter(tmp, shard_rows)
        bayes = _BayesSums()
        done, first_user, users = 0, 0, 0
        while done < examples:
            count = _counts_until(world, seed, first_user, chunk, done, examples)
            rows = _simulate(world, seed, items, first_user, count,
                             on_step=(lambda k: progress(k, examples)) if progress else None)
            writer.add(rows)
            bayes.add(rows)
            done += int(count.sum())
            users += int(np.count_nonzero(count))
            first_user += chunk
        shards = writer.close()
        manifest.update({
            "format": FORMAT, "version": VERSION, "seed": seed, "examples": examples, "users": users,
            "world": world.to_dict(), "events": list(EVENTS), "splits": list(SPLITS), "split_fractions": list(SPLIT_FRACTIONS),
            "row_group": ROW_GROUP, "shard_rows": shard_rows, "shards": shards,
        })
        (tmp / BAYES).write_text(json.dumps(bayes.result(), indent=1) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    atomic_dir(out, write)
    manifest["seconds"] = time.perf_counter() - started
    return manifest


def generate_with_progress(out: Path, examples: int, seed: int = 0, world: World | None = None, chunk_users: int | None = None,
                           shard_rows: int = 1_000_000, progress: bool = True,
                           log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``generate`` as ``kunlun data synth`` runs it: the request checked before a progress bar (rows, rows/s, ETA) is
    shown on stderr, a line saying what was written at the end; returns (manifest, Bayes NE)."""
    from kunlun.console import rows_bar

    check_request(Path(out), examples, chunk_users, shard_rows)
    with rows_bar("synth", examples, disable=not progress) as on_rows:
        manifest = generate(out, examples, seed, world, chunk_users=chunk_users, shard_rows=shard_rows, progress=on_rows)
    (log or (lambda m: None))(
        f"wrote {manifest['examples']:,} impressions of {manifest['users']:,} users to {out} in {len(manifest['shards'])} "
        f"shard(s), {manifest['seconds']:.1f}s ({manifest['examples'] / manifest['seconds']:,.0f} rows/s)")
    return manifest, read_bayes(out)


# ----------------------------------------------------------------------------- reading it back as a dataset

def is_synthetic(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KunlunError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KunlunError(f"{path}: not a kunlun synthetic data set (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise KunlunError(f"{path}: synthetic format version {manifest.get('version')}, this kunlun reads {VERSION}; regenerate it")
    return manifest


def data_files(folder: Path) -> list[Path]:
    """Every file the adapter reads (the prepared-data cache key covers exactly these)."""
    folder = Path(folder)
    files = [folder / MANIFEST] + [folder / s["file"] for s in read_manifest(folder)["shards"]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise KunlunError(f"{missing[0]}: shard listed in {folder / MANIFEST} not found")
    return files


def read_bayes(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / BAYES
    return json.loads(path.read_text()) if path.is_file() else None


def bayes_table(bayes: dict[str, Any]) -> None:
    """``bayes.json`` (the NE of the true click probability per split) as a table on stdout."""
    from rich.table import Table

    from kunlun.console import out_console

    b = Table("split", "rows", "CTR", "Bayes NE", "± (s.e.)", "Bayes NE (own CTR)", "Bayes logloss",
              title="NE of the true click probability (no model beats it in expectation)")
    for name, r in bayes["splits"].items():
        b.add_row(name, f"{r['rows']:,}", f"{r['ctr']:.4f}", f"{r['ne']:.4f}", f"{r['ne_std']:.4f}", f"{r['ne_own_ctr']:.4f}",
                  f"{r['logloss']:.4f}")
    out_console().print(b)


SCHEMA = Schema(
    label="label",
    categorical=(("user", "user"), ("item", "item"), ("category", "category"), ("segment", "segment"), ("device", "device"),
                 ("position", "position"), ("hour", "hour"), ("weekday", "weekday")),
    numeric=("log_history", "log_gap_hours"),
    sequences=(SequenceSpec("history", item_vocab="item", event_vocab="event", side=(("category", "category"),)),),
    group="user",
    has_time=True,
)


READ = ["user", "item", "category", "segment", "device", "position", "time", "event", "label", "split"]


@dataclass
class _Position:
    """Where a read has got to, for rows read in chunks: the global index of the next row, and the last row's user,
    time and the index of that user's first row."""

    row: int = 0
    user: int | None = None
    time: int = 0
    user_start: int = 0


def _impressions(col: dict[str, np.ndarray], at: _Position, where: str) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Rows of ``col`` (the READ columns of consecutive rows, starting at ``at``, which is advanced) → (feature columns,
    history event columns, user_start, global row index). Every value depends on the row and the rows before it only,
    so reading the shards whole or in chunks gives the same values."""
    n = len(col["user"])
    user, ts = col["user"], col["time"]
    idx = at.row + np.arange(n)
    prev_user = np.r_[at.user if at.user is not None else -1, user[:-1]]
    prev_time = np.r_[at.time, ts[:-1]]
    new_user = user != prev_user
    bad = (user < prev_user) | (~new_user & (ts <= prev_time))
    if at.user is None:  # the first row of all: nothing before it
        new_user[:1], bad[:1] = True, False
    if bad.any():
        raise KunlunError(f"{where}: row {int(idx[np.flatnonzero(bad)[0]]) + 1} is out of order (rows must be sorted by user, then strictly by time)")
    user_start = np.maximum.accumulate(np.where(new_user, idx, at.user_start))
    hist_len = idx - user_start
    prev = np.where(hist_len > 0, prev_time, ts)
    if n:
        at.row, at.user, at.time, at.user_start = at.row + n, int(user[-1]), int(ts[-1]), int(user_start[-1])
    columns = {
        "label": col["label"].astype(np.float32), "user": user, "item": col["item"].astype(np.int64),
        "category": col["category"].astype(np.int64), "segment": col["segment"].astype(np.int64),
        "device": col["device"].astype(np.int64), "position": col["position"].astype(np.int64), "hour": (ts // 3600) % 24,
        "weekday": (ts // 86400) % 7, "log_history": np.log1p(hist_len).astype(np.float64),
        "log_gap_hours": np.log1p((ts - prev) / 3600.0),
    }
    events = {"item": columns["item"], "event": np.asarray(EVENTS)[col["event"]], "category": columns["category"], "time": ts}
    return columns, events, user_start, idx


def _splits(columns, user_start, idx, ts, assign, names) -> dict[str, RawSplit]:
    out = {}
    for k, name in enumerate(names):
        m = assign == k
        out[name] = RawSplit(columns={c: v[m] for c, v in columns.items()}, seq_start={"history": user_start[m]},
                             seq_end={"history": idx[m]}, time=ts[m], row=idx[m])
    return out


def load_synthetic(folder: Path, file: Path | None = None, labels: bool = True) -> RawData:
    """The impressions as RawData: history = every earlier impression of the user (times are strictly increasing
    per user), with its event type (skip / click / like), category and time. With ``file`` (one shard), all its
    rows form split ``file`` and histories are the earlier rows of the same user in that file."""
    folder = Path(folder)
    paths = [Path(file)] if file is not None else data_files(folder)[1:]
    try:
        table = pa.concat_tables([pq.read_table(p, columns=READ) for p in paths])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise KunlunError(f"{paths[0]}: cannot be read as a synthetic shard ({str(exc).splitlines()[0]})") from None
    col = {c: table.column(c).to_numpy() for c in READ}
    columns, events, user_start, idx = _impressions(col, _Position(), str(folder))
    assign = col["split"] if file is None else np.zeros(len(idx), dtype=np.int8)
    splits = _splits(columns, user_start, idx, col["time"], assign, list(SPLITS) if file is None else ["file"])
    return RawData(schema=SCHEMA, splits=splits, events={"history": events}, source=str(paths[0] if file else folder))


class SyntheticChunks:
    """The data set of ``load_synthetic(folder)`` as a ``kunlun.data.stream.ChunkSource``: up to ``chunk_rows`` rows at a
    time, straight from the shards (a Parquet row group is never split across two reads' memory at once)."""

    def __init__(self, folder: Path, chunk_rows: int = 1 << 16):
        self.folder, self.chunk_rows = Path(folder), chunk_rows
        self.paths = data_files(self.folder)[1:]
        self.schema, self.source = SCHEMA, str(self.folder)

    def chunks(self) -> Iterator[Chunk]:
        at = _Position()
        for path in self.paths:
            try:
                batches = pq.ParquetFile(path).iter_batches(batch_size=self.chunk_rows, columns=READ)
                for batch in batches:
                    col = {c: batch.column(c).to_numpy() for c in READ}
                    columns, events, user_start, idx = _impressions(col, at, str(self.folder))
                    yield Chunk(_splits(columns, user_start, idx, col["time"], col["split"], list(SPLITS)), {"history": events})
            except (pa.ArrowInvalid, OSError, KeyError) as exc:
                raise KunlunError(f"{path}: cannot be read as a synthetic shard ({str(exc).splitlines()[0]})") from None
