"""Write an ML-1M-format rating log (``ratings.dat``, ``users.dat``, ``movies.dat``, ``::``-separated) as a user would
feed their own log to kunlun: Parquet files ``train/valid/test.parquet`` for the generic schema adapter, and
``schema.yaml``. It is the "log kunlun has never seen" of the quality study: nothing of the MovieLens adapter is used
(no genre flags, no release year, no history the adapter builds), only what a user writes from the raw log::

    python benchmarks/ratings_to_schema.py ../shared/data/ml-1m-first-half /tmp/ml1m-log
    kunlun bench quality --datasets /tmp/ml1m-log/schema.yaml --models kunlun,dnn,logistic_regression

One row per rating, label = rating >= 4; context: user, movie, gender, age bucket, occupation, the movie's first genre;
history: the user's last ``--history`` ratings strictly before this one (movies, times, and the event type ``like``
for a rating >= 4 and ``rate`` otherwise). Split by time over the whole log, as a log is: the oldest 80 % of ratings
train, the next 10 % validate, the newest 10 % test (ties at a boundary go to the earlier split).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = """name: {name}
files: {{train: train.parquet, valid: valid.parquet, test: test.parquet}}
label: label
group: user
time: time
categorical: [user, movie, gender, age, occupation, genre]
sequences:
  - name: rated
    item: rated_movies
    item_vocab: movie
    event: rated_events
    time: rated_times
"""


def flat(values: np.ndarray) -> pa.Array:
    a = pa.array(values)
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a  # pyarrow cuts long text arrays into chunks


def read_dat(path: Path, columns: int, encoding: str = "utf-8") -> list[list[str]]:
    return [line.split("::")[:columns] for line in path.read_text(encoding=encoding).splitlines() if line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a folder with ratings.dat, users.dat, movies.dat")
    ap.add_argument("out", type=Path)
    ap.add_argument("--history", type=int, default=50, help="events per history at most")
    args = ap.parse_args()
    r = np.array(read_dat(args.folder / "ratings.dat", 4), dtype=np.int64)
    user, movie, rating, ts = r.T
    users = {int(u): (g, a, o) for u, g, a, o in read_dat(args.folder / "users.dat", 4)}
    genre = {int(m): g.split("|")[0] for m, _, g in read_dat(args.folder / "movies.dat", 3, "latin-1")}
    # each user's ratings in time order (ties: file order); a row's history = that user's earlier-timestamped ratings
    order = np.lexsort((np.arange(len(user)), ts, user))
    u, m, lk, t = user[order], movie[order], rating[order] >= 4, ts[order]
    first = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    start_of_user = np.repeat(first, np.diff(np.r_[first, len(u)]))
    # events strictly before this rating's second: the first position of this (user, time)
    new_time = np.r_[True, (u[1:] != u[:-1]) | (t[1:] != t[:-1])]
    before = np.maximum.accumulate(np.where(new_time, np.arange(len(u)), 0))
    hist_start = np.maximum(start_of_user, before - args.history)
    count = before - hist_start
    offsets = pa.array(np.r_[0, np.cumsum(count)].astype(np.int32))
    take = np.repeat(hist_start - np.r_[0, np.cumsum(count)][:-1], count) + np.arange(count.sum())
    events = np.where(lk, "like", "rate")
    table = pa.table({
        "label": pa.array(lk.astype(np.int8)),
        "user": pa.array(u), "movie": pa.array(m),
        "gender": pa.array([users[int(x)][0] for x in u]), "age": pa.array([users[int(x)][1] for x in u]),
        "occupation": pa.array([users[int(x)][2] for x in u]), "genre": pa.array([genre[int(x)] for x in m]),
        "time": pa.array(t),
        "rated_movies": pa.ListArray.from_arrays(offsets, flat(m[take])),
        "rated_events": pa.ListArray.from_arrays(offsets, flat(events[take])),
        "rated_times": pa.ListArray.from_arrays(offsets, flat(t[take])),
    })
    cut = np.quantile(t, [0.8, 0.9], method="lower")
    split = np.searchsorted(cut, t, side="left")  # 0: t <= 80th percentile, 1: <= 90th, 2: newer
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["train", "valid", "test"]):
        rows = np.flatnonzero(split == i)
        part = table.take(pa.array(rows[np.lexsort((rows, t[rows]))]))  # each file in time order
        pq.write_table(part, args.out / f"{name}.parquet", row_group_size=65536)
        print(f"{name}: {part.num_rows} rows, CTR {part['label'].to_numpy().mean():.4f}")
    (args.out / "schema.yaml").write_text(SCHEMA.format(name=args.out.name))


if __name__ == "__main__":
    main()
