"""MovieLens as a CTR task with behaviour sequences (latest-small, 100K and 1M).

One impression per rating, label = rating >= 4. Each user's ratings are ordered by time; the first
80 % are train, the next 10 % valid, the last 10 % test. An impression's history is the user's events
with a strictly earlier timestamp (ties excluded: same-second ratings are not "before"), each event
carrying its movie, its type (liked / not liked), its primary genre and its time.

Non-sequence fields: user, movie, primary genre, release year, hour and weekday of the rating;
numeric: log history length, log hours since the previous event, genre flags (and age for 100K).
User features: 100K age bucket, gender, occupation (+ numeric age); 1M gender, age bucket, occupation, zip prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kunlun.data.io import TableChunks, id_column, numeric_column, read_table, require_file
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec
from kunlun.data.timeline import SPLIT_FRACTIONS as SPLIT_FRACTIONS  # the registry keys its cache on them
from kunlun.data.timeline import SPLITS, Positions, Timeline, TimelineSource, compact, missing_data_note, scoring_events
from kunlun.errors import KunlunError


@dataclass
class Ratings:
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray | None  # None: a file of candidates to score, without ratings (so without labels)
    ts: np.ndarray


@dataclass
class ItemTable:
    item: np.ndarray  # raw ids, [I]
    genre: np.ndarray  # primary genre, [I] (str)
    year: np.ndarray  # [I] int (0 unknown)
    genre_flags: np.ndarray  # [I, G] float32
    genre_names: list[str]


@dataclass
class UserTable:
    user: np.ndarray
    columns: dict[str, np.ndarray]  # categorical user columns
    numeric: dict[str, np.ndarray]


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, default) -> np.ndarray:
    """values[keys == query] for every query, vectorised; ``default`` where the key is absent."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    pos = np.minimum(np.searchsorted(sk, query), len(sk) - 1)
    hit = sk[pos] == query
    out = values[order][pos]
    if out.ndim == 1:
        return np.where(hit, out, default)
    return np.where(hit[:, None], out, default)


def build(ratings: Ratings, items: ItemTable, users: UserTable | None, source: str, split: bool = True) -> RawData:
    """Turn ratings into impressions with histories; ``split=False`` puts everything in one split."""
    return Impressions(ratings.user, ratings.item, ratings.rating >= 4, ratings.ts, items, users, source, split=split).raw()


class Impressions(TimelineSource):
    """Ratings as impressions on per-user timelines (``kunlun.data.timeline``): ``raw()`` makes every row at once (the
    in-memory path), ``chunks()`` ``rows`` sorted rows at a time (a ``kunlun.data.stream.ChunkSource``); both make each
    row by ``block``, so they give the same rows. Held whole: the sorted (user, movie, liked, time) columns and the
    permutation (≈ 17 bytes per rating), the movie and user tables."""

    def __init__(self, user: np.ndarray, item: np.ndarray, liked: np.ndarray, ts: np.ndarray, items: ItemTable,
                 users: UserTable | None, source: str, *, split: bool = True, rows: int = 1 << 16):
        self.timeline = Timeline(user, ts, {"item": compact(item), "liked": np.asarray(liked, dtype=bool)}, split=split)
        self.timeline.check_splits(source, "ratings")
        self.items, self.users, self.source, self.rows = items, users, source, rows
        self.split_names = list(SPLITS) if split else ["file"]
        cat = [("user", "user"), ("item", "item"), ("genre", "genre"), ("year", "year"), ("hour", "hour"), ("weekday", "weekday")]
        numeric = ["log_history", "log_gap_hours"] + [f"is_{g}" for g in items.genre_names]
        if users is not None:
            cat += [(col, col) for col in users.columns]
            numeric += list(users.numeric)
        self.schema = Schema(
            label="label",
            categorical=tuple(cat),
            numeric=tuple(numeric),
            sequences=(SequenceSpec("history", item_vocab="item", event_vocab="event", side=(("genre", "genre"),)),),
            group="user",
            has_time=True,
        )

    def block(self, i: int, j: int) -> tuple[dict[str, RawSplit], dict[str, dict[str, np.ndarray]]]:
        """Sorted rows ``[i, j)``: their examples per split (history ranges index the whole event table) and their events."""
        tl = self.timeline
        p = tl.positions(i, j)
        values = {"user": tl.user[i:j], "item": tl.fields["item"][i:j], "liked": tl.fields["liked"][i:j]}
        columns = self.example_columns(values, p)
        events = {"history": {"item": columns["item"], "event": np.where(columns["label"] > 0, "liked", "not_liked"),
                              "genre": columns["genre"], "time": p.ts}}
        return self.splits_of(i, j, p, columns, "history"), events

    def example_columns(self, values: dict[str, np.ndarray], p: Positions) -> dict[str, np.ndarray]:
        """The examples of ratings ``values`` (user, item, liked; one per row) at positions ``p``."""
        items = self.items
        user, item, ts = values["user"].astype(np.int64), values["item"].astype(np.int64), p.ts
        label = values["liked"].astype(np.float32)
        hist_len = p.hist_end - p.user_start
        gap_hours = (ts - p.prev_ts) / 3600.0
        flags = _lookup(items.item, items.genre_flags, item, 0.0)
        columns: dict[str, np.ndarray] = {
            "label": label,
            "user": user,
            "item": item,
            "genre": _lookup(items.item, items.genre, item, "unknown"),
            "year": _lookup(items.item, items.year, item, 0),
            "hour": (ts // 3600) % 24,
            "weekday": (ts // 86400) % 7,
            "log_history": np.log1p(hist_len).astype(np.float64),
            "log_gap_hours": np.log1p(gap_hours),
        }
        for g, name in enumerate(items.genre_names):
            columns[f"is_{name}"] = flags[:, g]
        if self.users is not None:
            for col, vals in self.users.columns.items():
                columns[col] = _lookup(self.users.user, vals, user, "unknown")
            for col, vals in self.users.numeric.items():
                columns[col] = _lookup(self.users.user, vals, user, 0.0)
        return columns


def score_ratings(file: Ratings, data_path: Path, read_data: Callable[[Path], Ratings], items: ItemTable,
                  users: UserTable | None, source: str) -> RawData:
    """A file of ratings to score (``kunlun eval --file`` / ``predict``) as split ``file``, in file order. A row's
    history is its user's events strictly before it (same-second events excluded, as in training): the data set's
    ratings (``data_path``, read with ``read_data``) merged with the file's own rated rows, a file row equal to a data
    rating (same user, movie and time) being that one event. So the test split written as a file scores as the test
    split. Without ``data_path`` the file's own rows only, and ``RawData.note`` says so. A file without ratings
    (``file.rating`` None: candidates to score) has placeholder labels, and its rows are not events of any history."""
    has_labels = file.rating is not None
    data = read_data(data_path) if data_path.is_file() else None
    rows = {"user": file.user, "item": file.item, "ts": file.ts,
            "liked": file.rating >= 4 if file.rating is not None else np.zeros(len(file.user), dtype=bool)}
    known = None if data is None else {"user": data.user, "item": data.item, "ts": data.ts, "liked": data.rating >= 4}
    ev = scoring_events(known, rows, has_labels, ("user", "item", "ts"))
    note = "" if data is not None else missing_data_note(data_path, has_labels)
    timeline = Impressions(ev["user"], ev["item"], ev["liked"], ev["ts"], items, users, source, split=False)
    return timeline.score_rows(rows, has_labels, note)


def read_in_blocks(blocks: Iterator[Ratings]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, movie, liked, time) of ratings read a block at a time, as compact columns: the chunked path never holds
    the parsed table of the whole file."""
    parts: list[tuple[np.ndarray, ...]] = [(compact(r.user), compact(r.item), r.rating >= 4, compact(r.ts)) for r in blocks]
    return tuple(np.concatenate([q[k] for q in parts]) for k in range(4))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- latest-small

LATEST_GENRES = [
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


def ratings_from_table(t, path: Path, user: str, item: str, rating: str, ts: str, first_row: int = 0) -> Ratings:
    """Validated Ratings from the four named columns of a parsed table (``first_row``: data rows before it); a table
    without the rating column gives ``rating`` None (a file of candidates to score)."""
    r = numeric_column(t, rating, path, first_row=first_row) if rating in t.column_names else None
    bad = (r < 0) | (r > 5) if r is not None else np.zeros(0, dtype=bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KunlunError(f"{path}: column {rating!r} must be a rating in [0, 5], found {r[row]:g} at data row {first_row + row + 1}")
    return Ratings(
        user=numeric_column(t, user, path, integer=True, first_row=first_row),
        item=numeric_column(t, item, path, integer=True, first_row=first_row),
        rating=r,
        ts=numeric_column(t, ts, path, integer=True, first_row=first_row),
    )


LATEST_RATINGS = {"required": ["userId", "movieId", "rating", "timestamp"]}


def no_rating(path: Path, what: str) -> KunlunError:
    """The error of a file to evaluate that has no ratings (``what``: the column or field it lacks)."""
    return KunlunError(f"{path}: missing {what} (the labels are rating >= 4); `kunlun predict` scores rows without it, "
                       "`kunlun eval` needs it")


def read_latest_ratings(path: Path, labels: bool = True) -> Ratings:
    """ratings.csv (userId, movieId, rating, timestamp); ``labels=False`` also reads a file without the rating column."""
    t = read_table(path, required=["userId", "movieId", "timestamp"], optional=["rating"])
    if labels and "rating" not in t.column_names:
        raise no_rating(path, "column 'rating'")
    return ratings_from_table(t, path, "userId", "movieId", "rating", "timestamp")


def latest_small_chunks(folder: Path, rows: int) -> Impressions:
    """``load_latest_small(folder)`` as a ChunkSource (ratings.csv read a block at a time)."""
    path, movies = folder / "ratings.csv", folder / "movies.csv"
    require_file(movies, "MovieLens movies.csv (expected next to the ratings file)")
    blocks = TableChunks(path, **LATEST_RATINGS, rows=rows)
    cols = read_in_blocks(ratings_from_table(t, path, "userId", "movieId", "rating", "timestamp", first) for first, t in blocks)
    return Impressions(*cols, read_latest_movies(movies), None, str(path), rows=rows)


def read_latest_movies(path: Path) -> ItemTable:
    t = read_table(path, required=["movieId", "title", "genres"])
    genres = t.column("genres").cast("string").fill_null("")
    primary = np.asarray(pc.list_element(pc.split_pattern(genres, "|"), 0).to_numpy(zero_copy_only=False)).astype(str)
    years = pc.extract_regex(t.column("title").cast("string").fill_null(""), r"\((?P<y>\d{4})\)\s*$")
    year = np.asarray(pc.struct_field(years, [0]).fill_null("0").to_numpy(zero_copy_only=False)).astype(np.int64)
    flags = np.stack([pc.match_substring(genres, g).to_numpy(zero_copy_only=False) for g in LATEST_GENRES], axis=1)
    return ItemTable(numeric_column(t, "movieId", path, integer=True), primary, year, flags.astype(np.float32), LATEST_GENRES)


def load_latest_small(folder: Path, ratings_file: Path | None = None, labels: bool = True) -> RawData:
    """The data set, or a file of ratings to score (``ratings_file``; ``score_ratings``: histories from the data set's
    ratings.csv too; ``labels=False`` accepts a file without the rating column)."""
    movies = folder / "movies.csv"
    require_file(movies, "MovieLens movies.csv (expected in the data set's folder)")
    if ratings_file is not None:
        return score_ratings(read_latest_ratings(ratings_file, labels), folder / "ratings.csv", read_latest_ratings,
                             read_latest_movies(movies), None, str(ratings_file))
    ratings_path = folder / "ratings.csv"
    return build(read_latest_ratings(ratings_path), read_latest_movies(movies), None, str(ratings_path))


# ----------------------------------------------------------------------------- 100K

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


ML100K_RATINGS = {"names": ["user", "item", "rating", "ts"], "delimiter": "\t"}


def first_line_fields(path: Path, separator: bytes) -> int:
    """How many ``separator``-separated fields the first line of ``path`` has (0 for an empty file)."""
    with open(require_file(path), "rb") as f:
        line = f.readline().rstrip(b"\r\n")
    return line.count(separator) + 1 if line else 0


def read_100k_ratings(path: Path, labels: bool = True) -> Ratings:
    """u.data (user, item, rating, time; tab-separated, no header); ``labels=False`` also reads lines of user, item and
    time only."""
    layout = ML100K_RATINGS
    if first_line_fields(path, b"\t") == 3:
        if labels:
            raise no_rating(path, "the rating field (lines of user, item, time; expected user, item, rating, time)")
        layout = {**ML100K_RATINGS, "names": ["user", "item", "ts"]}
    t = read_table(path, **layout)
    return ratings_from_table(t, path, "user", "item", "rating", "ts")


def read_100k_items(path: Path) -> ItemTable:
    names = ["item", "title", "release", "video", "url"] + [f"g{i}" for i in range(len(ML100K_GENRES))]
    t = read_table(path, names=names, delimiter="|", encoding="latin1")
    flags = np.stack([numeric_column(t, f"g{i}", path) for i in range(len(ML100K_GENRES))], axis=1).astype(np.float32)
    # primary genre = first flagged genre after "unknown" (column 0); "unknown" when none is set
    has = flags[:, 1:] > 0
    primary = np.where(has.any(axis=1), np.array(ML100K_GENRES)[np.argmax(has, axis=1) + 1], "unknown")
    release = t.column("release").cast("string").fill_null("")
    year = pc.utf8_slice_codeunits(release, -4).to_numpy(zero_copy_only=False)
    year = np.array([int(y) if y.isdigit() else 0 for y in year], dtype=np.int64)  # 1,682 rows
    return ItemTable(numeric_column(t, "item", path, integer=True), primary.astype(str), year, flags, ML100K_GENRES)


def read_100k_users(path: Path) -> UserTable:
    t = read_table(path, names=["user", "age", "gender", "occupation", "zip"], delimiter="|")
    age = numeric_column(t, "age", path)
    age_bucket = np.digitize(age, [18, 25, 35, 45, 50, 56])
    return UserTable(
        user=numeric_column(t, "user", path, integer=True),
        columns={
            "age_bucket": age_bucket.astype(np.int64),
            "gender": id_column(t, "gender", path).astype(str),
            "occupation": id_column(t, "occupation", path).astype(str),
        },
        numeric={"age": age},
    )


def load_100k(folder: Path, ratings_file: Path | None = None, labels: bool = True) -> RawData:
    """The data set, or a file of ratings to score (``ratings_file``, u.data's layout; see ``load_latest_small``)."""
    for f in ("u.item", "u.user"):
        require_file(folder / f, f"MovieLens-100K {f} (expected in the data set's folder)")
    items, users = read_100k_items(folder / "u.item"), read_100k_users(folder / "u.user")
    if ratings_file is not None:
        return score_ratings(read_100k_ratings(ratings_file, labels), folder / "u.data", read_100k_ratings, items, users,
                             str(ratings_file))
    return build(read_100k_ratings(folder / "u.data"), items, users, str(folder / "u.data"))


def ml100k_chunks(folder: Path, rows: int) -> Impressions:
    """``load_100k(folder)`` as a ChunkSource (u.data read a block at a time)."""
    path = folder / "u.data"
    for f in ("u.item", "u.user"):
        require_file(folder / f, f"MovieLens-100K {f} (expected next to the ratings file)")
    blocks = TableChunks(path, **ML100K_RATINGS, rows=rows)
    cols = read_in_blocks(ratings_from_table(t, path, "user", "item", "rating", "ts", first) for first, t in blocks)
    return Impressions(*cols, read_100k_items(folder / "u.item"), read_100k_users(folder / "u.user"), str(path), rows=rows)



# ----------------------------------------------------------------------------- 1M (official "::" layout)

ML1M_GENRES = [
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")


DAT = {"names": ["line"], "delimiter": "\x1f", "encoding": "latin1"}  # \x1f (unit separator) never occurs


def read_dat(path: Path, names: list[str]) -> pa.Table:
    """A MovieLens-1M file (no header, fields separated by ``::``, Latin-1) as string columns ``names``.

    pyarrow's CSV reader takes one-character delimiters only, so whole lines are read as one column and
    split on ``::`` (at most ``len(names) - 1`` times: a stray ``::`` stays inside the last field)."""
    return dat_fields(read_table(path, **DAT), names, path)


def dat_fields(t: pa.Table, names: list[str], path: Path, first_row: int = 0) -> pa.Table:
    """``read_dat`` of the table of lines ``t`` (a whole file, or ``first_row`` lines into it)."""
    lines = t.column("line").cast(pa.string()).combine_chunks()
    parts = pc.split_pattern(lines, "::", max_splits=len(names) - 1)
    count = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(count != len(names))
    if len(bad):
        row = int(bad[0])
        raise KunlunError(f"{path}: line {first_row + row + 1} has {count[row]} '::'-separated fields, expected {len(names)} "
                          f"({'::'.join(names)})")
    return pa.table({name: pc.list_element(parts, i) for i, name in enumerate(names)})


def int_field(t: pa.Table, name: str, path: Path, first_row: int = 0) -> np.ndarray:
    """A string column of ``read_dat``'s table as int64; a non-integer names its line."""
    col = pc.utf8_trim_whitespace(t.column(name))
    ok = pc.match_substring_regex(col, r"^-?[0-9]+$").to_numpy(zero_copy_only=False)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise KunlunError(f"{path}: field {name!r} must be an integer, found {col[row].as_py()!r} on line {first_row + row + 1}")
    return pc.cast(col, pa.int64()).to_numpy()


def ratings_1m(t: pa.Table, path: Path, first_row: int = 0, names: tuple[str, ...] = ("user", "item", "rating", "ts")) -> Ratings:
    """The ratings of ``ratings.dat``'s lines ``t`` (``first_row`` lines into the file; ``names``: its fields)."""
    t = dat_fields(t, list(names), path, first_row)
    ints = pa.table({c: int_field(t, c, path, first_row) for c in t.column_names})
    return ratings_from_table(ints, path, "user", "item", "rating", "ts", first_row)


def read_1m_ratings(path: Path, labels: bool = True) -> Ratings:
    """ratings.dat (user::item::rating::time); ``labels=False`` also reads lines of user::item::time only."""
    t = read_table(path, **DAT)
    if str(t.column("line")[0].as_py()).count("::") == 2:
        if labels:
            raise no_rating(path, "the rating field (lines of user::item::time; expected user::item::rating::time)")
        return ratings_1m(t, path, names=("user", "item", "ts"))
    return ratings_1m(t, path)


def read_1m_movies(path: Path) -> ItemTable:
    t = read_dat(path, ["item", "title", "genres"])
    lists = pc.split_pattern(t.column("genres"), "|")
    flat = np.asarray(pc.list_flatten(lists).to_numpy(zero_copy_only=False)).astype(str)
    parent = pc.list_parent_indices(lists).to_numpy()
    known = np.isin(flat, ML1M_GENRES)
    if not known.all():
        j = int(np.flatnonzero(~known)[0])
        raise KunlunError(f"{path}: line {parent[j] + 1} has genre {str(flat[j])!r}, not one of the 18 ML-1M genres ({'|'.join(ML1M_GENRES)})")
    flags = np.zeros((t.num_rows, len(ML1M_GENRES)), dtype=np.float32)
    flags[parent, np.searchsorted(ML1M_GENRES, flat)] = 1.0  # ML1M_GENRES is sorted
    primary = np.asarray(pc.list_element(lists, 0).to_numpy(zero_copy_only=False)).astype(str)
    years = pc.extract_regex(t.column("title"), r"\((?P<y>\d{4})\)\s*$")
    year = np.asarray(pc.struct_field(years, [0]).fill_null("0").to_numpy(zero_copy_only=False)).astype(np.int64)
    return ItemTable(int_field(t, "item", path), primary, year, flags, ML1M_GENRES)


def read_1m_users(path: Path) -> UserTable:
    """Gender (M/F), age bucket code (1, 18, 25, 35, 45, 50, 56), occupation code (0-20) and the zip code's first
    three digits (the US sectional centre: a region, coarser than the zip code itself)."""
    t = read_dat(path, ["user", "gender", "age", "occupation", "zip"])
    text = lambda c: np.asarray(pc.utf8_trim_whitespace(t.column(c)).to_numpy(zero_copy_only=False)).astype(str)
    zip3 = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(t.column("zip")), 0, 3)
    return UserTable(
        user=int_field(t, "user", path),
        columns={
            "gender": text("gender"),
            "age_bucket": int_field(t, "age", path).astype(str),  # as text: the lookup then formats 6,040 codes, not every rating
            "occupation": int_field(t, "occupation", path).astype(str),
            "zip3": np.asarray(zip3.to_numpy(zero_copy_only=False)).astype(str),
        },
        numeric={},
    )


def load_1m(folder: Path, ratings_file: Path | None = None, labels: bool = True) -> RawData:
    """The official ML-1M files (``ratings.dat``, ``movies.dat``, ``users.dat``); also any subset of users
    in that layout (e.g. users 1-2999, the first 487,650 lines of ``ratings.dat``)."""
    for f in ML1M_FILES[1:]:
        require_file(folder / f, f"MovieLens-1M {f} (expected in the data set's folder)")
    items, users = read_1m_movies(folder / "movies.dat"), read_1m_users(folder / "users.dat")
    if ratings_file is not None:
        return score_ratings(read_1m_ratings(ratings_file, labels), folder / "ratings.dat", read_1m_ratings, items, users,
                             str(ratings_file))
    return build(read_1m_ratings(folder / "ratings.dat"), items, users, str(folder / "ratings.dat"))


def ml1m_chunks(folder: Path, rows: int) -> Impressions:
    """``load_1m(folder)`` as a ChunkSource: ratings.dat read a block of lines at a time into compact columns."""
    path = folder / "ratings.dat"
    for f in ML1M_FILES[1:]:
        require_file(folder / f, f"MovieLens-1M {f} (expected next to the ratings file)")
    blocks = TableChunks(path, **DAT, rows=rows)
    cols = read_in_blocks(ratings_1m(t, path, first) for first, t in blocks)
    return Impressions(*cols, read_1m_movies(folder / "movies.dat"), read_1m_users(folder / "users.dat"), str(path), rows=rows)
