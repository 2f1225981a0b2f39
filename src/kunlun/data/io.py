"""Reading CSV / Parquet tables into numpy columns, with one-line errors naming file, column and row.

Every problem a file can have (unparseable, ragged rows, duplicated header, bytes that are not UTF-8, text
in a numeric column, missing values) is a ``KunlunError`` naming the file, the column and, where one row
is at fault, its *data row* (1-based, the header not counted) — or, for a CSV syntax error, its line.

``read_table`` reads a file whole; ``TableChunks`` reads it a block of rows at a time with the very column types the
whole read gives (the column functions take ``first_row``, the data rows before a block, so that their messages
name the row of the file).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kunlun.errors import KunlunError

PARQUET_SUFFIXES = (".parquet", ".pq")


def require_file(path: Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise KunlunError(f"{path}: {what} not found")
    if not path.is_file():
        raise KunlunError(f"{path}: expected a file, found a directory")
    return path


def show(value, limit: int = 40) -> str:
    """A cell value for a one-line message: repr (escapes newlines), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-1]


def read_table(
    path: Path,
    *,
    names: list[str] | None = None,
    delimiter: str = ",",
    encoding: str = "utf8",
    required: list[str] | None = None,
    optional: list[str] | tuple[str, ...] = (),
    text: list[str] | tuple[str, ...] = (),
) -> pa.Table:
    """Read a CSV (header row unless ``names`` is given) or a Parquet file; check required columns.

    ``text`` columns are read from a CSV as text whatever they hold (a history column whose cells each
    hold one item id would otherwise be read as integers). ``optional`` columns are read when present. The
    columns named in all three must be unique in the header, and their text valid UTF-8 (the error names
    the row); the other columns are not looked at."""
    path = require_file(path)
    if path.stat().st_size == 0:
        raise KunlunError(f"{path}: file is empty")
    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    try:
        if parquet:
            table = pq.read_table(path)
        else:
            table = _read_csv(path, names, delimiter, encoding, text)
        table.column_names  # noqa: B018 (decodes the header: a name that is not UTF-8 fails here)
    except UnicodeDecodeError as exc:  # the header row (column names) is decoded by Python
        raise KunlunError(f"{path}: the header row is not valid {encoding} text (byte {exc.start})") from None
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise KunlunError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        raise KunlunError(f"{path}: cannot be parsed as {'Parquet' if parquet else 'CSV'} ({_first_line(exc)})") from None
    wanted = list(dict.fromkeys([*(required if required is not None else table.column_names), *optional, *text]))
    counts = Counter(table.column_names)
    for c in wanted:
        if counts[c] > 1:
            raise KunlunError(f"{path}: column {c!r} appears {counts[c]} times in the header; column names must be unique")
    if table.num_rows == 0:
        raise KunlunError(f"{path}: file has a header but no rows")
    missing = [c for c in required or [] if c not in counts]
    if missing:
        raise KunlunError(
            f"{path}: missing column {missing[0]!r}; expected columns {required}, found {table.column_names}"
        )
    for c in wanted:
        if c in counts and _is_binary(table.column(c).type):
            table = table.set_column(table.column_names.index(c), c, _utf8(table.column(c), c, path))
    return table


def _read_csv(path: Path, names, delimiter: str, encoding: str, text) -> pa.Table:
    read_opts = pacsv.ReadOptions(column_names=names, encoding=encoding, autogenerate_column_names=False)
    quote = '"' if delimiter == "," else False
    # text columns as raw bytes: nothing to convert can fail; read_table checks and decodes them
    convert = pacsv.ConvertOptions(column_types={c: pa.binary() for c in text})
    try:
        return pacsv.read_csv(path, read_options=read_opts, parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote),
                              convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise KunlunError(f"{path}: the file holds only empty lines") from None
        if "CSV parse error" not in str(exc):
            raise
    # a malformed row: read again on one thread, whose message has the row's line number
    try:
        pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names, encoding=encoding, use_threads=False),
                       parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote), convert_options=convert)
    except pa.ArrowInvalid as exc:
        m = re.search(r"Row #(\d+): Expected (\d+) columns, got (\d+)", str(exc))
        if m:
            line, expected, found = m.groups()
            like = " like the header" if names is None else ""
            raise KunlunError(f"{path}: line {line} has {found} fields, expected {expected}{like}") from None
        raise KunlunError(f"{path}: cannot be parsed as CSV ({_first_line(exc)})") from None
    raise KunlunError(f"{path}: cannot be parsed as CSV (a malformed row)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return re.sub(r"\s+", " ", text[0]) if text else type(exc).__name__


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _utf8(arr: pa.ChunkedArray, column: str, path: Path, first_row: int = 0) -> pa.ChunkedArray:
    """Bytes → text, or an error naming the first row that is not valid UTF-8 (``first_row``: data rows before ``arr``,
    for a block of a file read in blocks)."""
    try:
        return arr.cast(pa.string())
    except pa.ArrowException:
        pass
    for row, value in enumerate(arr.to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise KunlunError(f"{path}: column {column!r} has text that is not valid UTF-8 at data row {first_row + row + 1} "
                                  f"(byte {exc.start}: {show(value)})") from None
    raise KunlunError(f"{path}: column {column!r} cannot be read as text")


def _plain(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded (Parquet categorical) → its plain values."""
    if pa.types.is_dictionary(arr.type):
        return arr.cast(arr.type.value_type)
    return arr


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _reject_nulls(arr, column: str, path: Path, first_row: int = 0) -> None:
    if arr.null_count:  # the CSV reader reads empty cells and "NaN"/"nan" as null
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise KunlunError(f"{path}: column {column!r} has a missing or NaN value at data row {first_row + row + 1}")


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _arrow_number(value: str) -> bool:
    """Whether Arrow's cast reads ``value`` as a float64 (stricter than Python's ``float``: no "1_000", no " 5")."""
    try:
        pa.array([value], pa.string()).cast(pa.float64())
    except pa.ArrowException:
        return False
    return True


FLOAT32_MAX = float(np.finfo(np.float32).max)


def numeric_column(table: pa.Table, column: str, path: Path, *, integer: bool = False, float32: bool = False,
                   first_row: int = 0) -> np.ndarray:
    """A column as float64 (or int64), rejecting text, missing values and NaN/inf with the row number;
    ``float32``: also values a float32 feature cannot hold (beyond ±3.4e38). ``first_row``: data rows before ``table``
    (a block of a file read in blocks, ``TableChunks``), so that messages name the row of the file."""
    arr = _plain(table.column(column))
    _reject_nulls(arr, column, path, first_row)
    if _is_text(arr.type):
        values = arr.to_pylist()
        row = next((i for i, v in enumerate(values) if not _is_number(v)), None)
        try:
            if row is not None:
                raise ValueError(row)
            # every value a number: a block of a file whose text lies in another block (TableChunks), which names it
            arr = arr.cast(pa.float64())
        except (ValueError, pa.ArrowException):
            if row is None:  # Python's float() took every value, Arrow's cast did not ("1_000", " 5"): find which
                row = next((i for i, v in enumerate(values) if not _arrow_number(v)), 0)
            raise KunlunError(f"{path}: column {column!r} must be numeric, found text {show(values[row])} "
                              f"at data row {first_row + row + 1}") from None
    if pa.types.is_boolean(arr.type) or pa.types.is_decimal(arr.type):
        arr = arr.cast(pa.float64())
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise KunlunError(f"{path}: column {column!r} must be numeric, found {arr.type}")
    if integer and pa.types.is_integer(arr.type):
        return arr.to_numpy().astype(np.int64)
    values = arr.to_numpy().astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise KunlunError(f"{path}: column {column!r} has a non-finite value (NaN/inf) at data row {first_row + int(np.flatnonzero(bad)[0]) + 1}")
    if float32 and (np.abs(values) > FLOAT32_MAX).any():
        row = int(np.flatnonzero(np.abs(values) > FLOAT32_MAX)[0])
        raise KunlunError(f"{path}: column {column!r} has {values[row]:g} at data row {first_row + row + 1}, beyond the float32 range of features")
    if integer:
        wrong = (values != np.round(values)) | (np.abs(values) > 2**62)
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise KunlunError(f"{path}: column {column!r} must hold integers, found {values[row]} at data row {first_row + row + 1}")
        return values.astype(np.int64)
    return values


def id_column(table: pa.Table, column: str, path: Path, first_row: int = 0) -> np.ndarray:
    """A categorical id column: integers stay int64, anything else becomes str; missing values rejected."""
    arr = _plain(table.column(column))
    _reject_nulls(arr, column, path, first_row)
    if pa.types.is_integer(arr.type):
        return arr.to_numpy().astype(np.int64)
    if pa.types.is_floating(arr.type):
        bad = ~np.isfinite(arr.to_numpy())
        if bad.any():
            raise KunlunError(f"{path}: column {column!r} has a missing or NaN value at data row {first_row + int(np.flatnonzero(bad)[0]) + 1}")
    if not (_is_text(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type) or pa.types.is_decimal(arr.type)
            or pa.types.is_temporal(arr.type)):
        raise KunlunError(f"{path}: column {column!r} must hold one id per row (text or integers), found {arr.type}")
    return np.asarray(arr.cast(pa.string()).to_numpy(zero_copy_only=False)).astype(str)


def label_column(table: pa.Table, column: str, path: Path, first_row: int = 0) -> np.ndarray:
    values = numeric_column(table, column, path, first_row=first_row)
    bad = (values != 0) & (values != 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise KunlunError(f"{path}: label column {column!r} must be 0 or 1, found {values[row]:g} at data row {first_row + row + 1}")
    return values.astype(np.float32)


def optional_label(t: pa.Table, column: str, path: Path, labels: bool, first_row: int = 0) -> tuple[np.ndarray, bool]:
    """The label column, or (when ``labels`` is False and the column is absent) zeros and False."""
    if column in t.column_names:
        return label_column(t, column, path, first_row), True
    if labels:
        raise KunlunError(f"{path}: missing label column {column!r}")
    return np.zeros(t.num_rows, dtype=np.float32), False


# ----------------------------------------------------------------------------- reading a file in blocks

# pyarrow's CSV type inference, in its order (arrow/csv/inference_internal.h, without dictionary encoding): a column
# gets the first of these that converts every value
CSV_INFERENCE = (pa.null(), pa.int64(), pa.bool_(), pa.date32(), pa.time32("s"), pa.timestamp("s"), pa.timestamp("ns"),
                 pa.timestamp("s", "UTC"), pa.timestamp("ns", "UTC"), pa.float64(), pa.string(), pa.binary())
CSV_BLOCK = 1 << 22  # bytes the CSV reader parses at a time


class TableChunks:
    """A CSV or Parquet file read ``rows`` data rows at a time: iterating yields ``(first_row, block)``, the data rows
    before the block and the block as a ``pa.Table`` holding the columns ``read_table`` would check (same arguments),
    with exactly the column types ``read_table`` gives for the whole file. So per-row work on the blocks gives what it
    gives on the whole table, in memory bounded by the block.

    A Parquet file carries its types. A CSV's are inferred by pyarrow, which on a whole file takes, per column, the
    first type in ``CSV_INFERENCE`` order that converts *every* block; its streaming reader infers from the first block
    only and fails on a later block that does not fit. So the constructor streams the file once (``num_rows`` counts the
    data rows) and, where a block does not fit a column, moves that column to the next type of the order and streams
    again: the types found are the whole file's (a column whose kind changes mid-file costs a pass per step; none, in
    files written by one program). The checks and messages are ``read_table``'s (empty file, header, duplicated or
    missing columns, no rows, ragged lines, text that is not UTF-8); a problem met in a later block names its row."""

    def __init__(self, path: Path, *, names: list[str] | None = None, delimiter: str = ",", encoding: str = "utf8",
                 required: list[str] | None = None, optional: list[str] | tuple[str, ...] = (),
                 text: list[str] | tuple[str, ...] = (), rows: int = 1 << 16):
        self.path = require_file(path)
        if self.path.stat().st_size == 0:
            raise KunlunError(f"{self.path}: file is empty")
        self.parquet = self.path.suffix.lower() in PARQUET_SUFFIXES
        self.names, self.delimiter, self.encoding, self.rows = names, delimiter, encoding, rows
        header, has_rows = self._guard(self._header)
        wanted = list(dict.fromkeys([*(required if required is not None else header), *optional, *text]))
        counts = Counter(header)
        for c in wanted:
            if counts[c] > 1:
                raise KunlunError(f"{self.path}: column {c!r} appears {counts[c]} times in the header; column names must be unique")
        if not has_rows:
            raise KunlunError(f"{self.path}: file has a header but no rows")
        missing = [c for c in required or [] if c not in counts]
        if missing:
            raise KunlunError(f"{self.path}: missing column {missing[0]!r}; expected columns {required}, found {header}")
        self.header = header
        self.columns = [c for c in wanted if c in counts]
        self.types: dict[str, pa.DataType] = {c: pa.binary() for c in text if c in counts}  # as read_table reads them
        if self.parquet:
            self.num_rows = self._guard(lambda: pq.ParquetFile(self.path).metadata.num_rows)
        else:
            self.num_rows = self._csv_types()

    # --- pyarrow readers
    def _csv_reader(self, types: dict[str, pa.DataType], columns: list[str] | None):
        read = pacsv.ReadOptions(column_names=self.names, encoding=self.encoding, use_threads=False, block_size=CSV_BLOCK)
        quote = '"' if self.delimiter == "," else False
        convert = pacsv.ConvertOptions(column_types=types, include_columns=columns or [])
        # one thread: a parse error then names its line (as read_table's second, single-threaded read does)
        return pacsv.open_csv(self.path, read_options=read, parse_options=pacsv.ParseOptions(delimiter=self.delimiter, quote_char=quote),
                              convert_options=convert)

    def _header(self) -> tuple[list[str], bool]:
        if self.parquet:
            f = pq.ParquetFile(self.path)
            return f.schema_arrow.names, f.metadata.num_rows > 0
        reader = self._csv_reader({}, None)
        names = reader.schema.names
        for batch in reader:
            if batch.num_rows:
                return names, True
        return names, False

    def _csv_types(self) -> int:
        """Settle ``self.types`` to the whole file's column types (see the class docstring); the number of data rows."""
        while True:
            reader = None
            try:
                reader = self._csv_reader(self.types, self.columns)
                rows = sum(batch.num_rows for batch in reader)
                self.types = {f.name: f.type for f in reader.schema}
                return rows
            except pa.ArrowInvalid as exc:
                m = re.match(r"In CSV column #(\d+): .*CSV conversion error", str(exc))
                if not m:
                    raise self._problem(exc) from None
                column = self.header[int(m[1])]
                current = self.types[column] if column in self.types else reader.schema.field(column).type
                # the next type of pyarrow's order (binary, the last, converts anything); a type outside the order
                # (a future pyarrow's) steps to text, what the whole-file read gives a column of mixed values
                after = CSV_INFERENCE.index(current) + 1 if current in CSV_INFERENCE else CSV_INFERENCE.index(pa.string())
                self.types[column] = CSV_INFERENCE[after]
            except (UnicodeDecodeError, pa.ArrowException, OSError) as exc:
                raise self._problem(exc) from None

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self.parquet:
            return pq.ParquetFile(self.path).iter_batches(batch_size=self.rows, columns=self.columns)
        return iter(self._csv_reader(self.types, self.columns))

    # --- errors, as read_table words them
    def _problem(self, exc: BaseException) -> KunlunError:
        if isinstance(exc, UnicodeDecodeError):  # the header row (column names) is decoded by Python
            return KunlunError(f"{self.path}: the header row is not valid {self.encoding} text (byte {exc.start})")
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return KunlunError(f"{self.path}: cannot be read ({exc.strerror or exc})")
        if not self.parquet and "Empty CSV file" in str(exc):
            return KunlunError(f"{self.path}: the file holds only empty lines")
        m = re.search(r"Row #(\d+): Expected (\d+) columns, got (\d+)", str(exc))
        if m and not self.parquet:
            line, expected, found = m.groups()
            like = " like the header" if self.names is None else ""
            return KunlunError(f"{self.path}: line {line} has {found} fields, expected {expected}{like}")
        return KunlunError(f"{self.path}: cannot be parsed as {'Parquet' if self.parquet else 'CSV'} ({_first_line(exc)})")

    def _guard(self, read):
        try:
            return read()
        except (UnicodeDecodeError, pa.ArrowException, OSError) as exc:
            raise self._problem(exc) from None

    def __iter__(self) -> Iterator[tuple[int, pa.Table]]:
        first, pending, count = 0, [], 0
        batches = self._guard(self._batches)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise self._problem(exc) from None
            if batch is not None:
                pending.append(batch)
                count += batch.num_rows
            while count >= self.rows or (batch is None and count):
                table = pa.Table.from_batches(pending)
                take = min(self.rows, count)
                yield first, self._block(table.slice(0, take), first)
                pending, count, first = table.slice(take).to_batches(), count - take, first + take
            if batch is None:
                return

    def _block(self, table: pa.Table, first_row: int) -> pa.Table:
        for c in self.columns:  # text read as bytes: checked and decoded, as read_table does
            if _is_binary(table.column(c).type):
                table = table.set_column(table.column_names.index(c), c, _utf8(table.column(c), c, self.path, first_row))
        return table
