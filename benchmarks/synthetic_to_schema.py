"""Write a synthetic set (``kunlun data synth``) as a user's own log for the generic schema adapter: Parquet files
``train/valid/test.parquet`` with one row per impression and its history as list columns (the user's last ``--history``
impressions: items, event types, categories, times), and ``schema.yaml`` describing them. Used to measure preparing a
generic-adapter dataset whole and chunk by chunk (README "Datasets, out of core")::

    kunlun data synth --out /tmp/s3M --examples 3M --seed 0 --quiet
    python benchmarks/synthetic_to_schema.py /tmp/s3M /tmp/s3M-parquet
    kunlun data prepare --dataset /tmp/s3M-parquet/schema.yaml [--chunk-rows 65536]

Each shard is converted on its own (a user's history never reaches into the previous shard's rows), in memory bounded by
a shard; row groups of 65,536 rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kunlun.data import synthetic

SCHEMA = """name: {name}
files: {{train: train.parquet, valid: valid.parquet, test: test.parquet}}
label: label
group: user
time: time
categorical: [user, item, category, segment, device, position]
sequences:
  - name: recent
    item: recent_items
    item_vocab: item
    event: recent_events
    time: recent_times
    side: {{recent_categories: category}}
"""


def history(values: np.ndarray, start: np.ndarray, count: np.ndarray, dtype) -> pa.ListArray:
    """Per row i, ``values[start[i] : start[i] + count[i]]`` as a list column."""
    offsets = np.r_[0, np.cumsum(count)]
    take = np.repeat(start - offsets[:-1], count) + np.arange(offsets[-1])
    flat = pa.array(values[take].astype(dtype))
    if isinstance(flat, pa.ChunkedArray):  # pyarrow cuts text from numpy into chunks
        flat = flat.combine_chunks()
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("synthetic", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--history", type=int, default=20, help="events per history at most")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    for shard in synthetic.data_files(args.synthetic)[1:]:
        t = pq.read_table(shard)
        col = {c: t.column(c).to_numpy() for c in ("user", "item", "category", "segment", "device", "position", "time", "event",
                                                   "label", "split")}
        n = len(col["user"])
        idx = np.arange(n)
        user_start = np.maximum.accumulate(np.where(np.r_[True, col["user"][1:] != col["user"][:-1]], idx, 0))
        count = np.minimum(idx - user_start, args.history)
        start = idx - count
        out = pa.table({
            "label": col["label"].astype(np.int8), "user": col["user"], "item": col["item"], "category": col["category"],
            "segment": col["segment"], "device": col["device"], "position": col["position"], "time": col["time"],
            "recent_items": history(col["item"], start, count, np.int64),
            "recent_events": history(np.asarray(synthetic.EVENTS)[col["event"]], start, count, str),
            "recent_categories": history(col["category"], start, count, np.int64),
            "recent_times": history(col["time"], start, count, np.int64),
        })
        for k in range(3):
            part = out.filter(pa.array(col["split"] == k))
            if k not in writers:
                writers[k] = pq.ParquetWriter(args.out / f"{synthetic.SPLITS[k]}.parquet", part.schema)
            writers[k].write_table(part, row_group_size=1 << 16)
    for w in writers.values():
        w.close()
    (args.out / "schema.yaml").write_text(SCHEMA.format(name=args.out.name))


if __name__ == "__main__":
    main()
