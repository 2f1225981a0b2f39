"""Reading CSV / Parquet tables into numpy columns, with one-line errors naming file and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kunlun.errors import KunlunError


def require_file(path: Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise KunlunError(f"{path}: {what} not found")
    if not path.is_file():
        raise KunlunError(f"{path}: expected a file, found a directory")
    return path


def read_table(
    path: Path,
    *,
    names: list[str] | None = None,
    delimiter: str = ",",
    encoding: str = "utf8",
    required: list[str] | None = None,
) -> pa.Table:
    """Read a CSV (header row unless ``names`` is given) or a Parquet file; check required columns."""
    path = require_file(path)
    if path.stat().st_size == 0:
        raise KunlunError(f"{path}: file is empty")
    try:
        if path.suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            read_opts = pacsv.ReadOptions(column_names=names, encoding=encoding, autogenerate_column_names=False)
            parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False)
            table = pacsv.read_csv(path, read_options=read_opts, parse_options=parse)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise KunlunError(f"{path}: cannot be parsed ({str(exc).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise KunlunError(f"{path}: file has a header but no rows")
    missing = [c for c in required or [] if c not in table.column_names]
    if missing:
        raise KunlunError(
            f"{path}: missing column {missing[0]!r}; expected columns {required}, found {table.column_names}"
        )
    return table


def _reject_nulls(arr, column: str, path: Path) -> None:
    if arr.null_count:  # the CSV reader reads empty cells and "NaN"/"nan" as null
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise KunlunError(f"{path}: column {column!r} has a missing or NaN value at data row {row + 1}")


def numeric_column(table: pa.Table, column: str, path: Path, *, integer: bool = False) -> np.ndarray:
    """A column as float64 (or int64), rejecting text, missing values and NaN/inf with the row number."""
    arr = table.column(column)
    _reject_nulls(arr, column, path)
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise KunlunError(f"{path}: column {column!r} must be numeric, found {arr.type}")
    values = arr.to_numpy().astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise KunlunError(f"{path}: column {column!r} has a non-finite value (NaN/inf) at data row {int(np.flatnonzero(bad)[0]) + 1}")
    if integer:
        if np.any(values != np.round(values)):
            row = int(np.flatnonzero(values != np.round(values))[0])
            raise KunlunError(f"{path}: column {column!r} must hold integers, found {values[row]} at data row {row + 1}")
        return values.astype(np.int64)
    return values


def id_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    """A categorical id column: integers stay int64, anything else becomes str; missing values rejected."""
    arr = table.column(column)
    _reject_nulls(arr, column, path)
    if pa.types.is_integer(arr.type):
        return arr.to_numpy().astype(np.int64)
    return np.asarray(arr.cast(pa.string()).to_numpy(zero_copy_only=False)).astype(str)


def label_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    values = numeric_column(table, column, path)
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KunlunError(f"{path}: label column {column!r} must be 0 or 1, found {values[row]:g} at data row {row + 1}")
    return values.astype(np.float32)


def optional_label(t: pa.Table, column: str, path: Path, labels: bool) -> tuple[np.ndarray, bool]:
    """The label column, or (when ``labels`` is False and the column is absent) zeros and False."""
    if column in t.column_names:
        return label_column(t, column, path), True
    if labels:
        raise KunlunError(f"{path}: missing label column {column!r}")
    return np.zeros(t.num_rows, dtype=np.float32), False
