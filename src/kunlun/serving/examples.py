"""Examples as a user sends them (JSON objects with raw values) → the raw columns the training encoder reads.

A request example holds one value per input column of the trained model's schema, raw as in the logs:
categorical ids as integers or strings, numeric values as numbers, the request ``time`` in unix seconds (when
the schema has one), and each behaviour sequence as parallel lists, oldest event first::

    {"user": 414, "item": 2959, "genre": "Action", "year": 1999, "hour": 17, "weekday": 3,
     "log_history": 4.2, …, "time": 961514069,
     "history": {"item": [296, 318], "event": ["liked", "not_liked"], "genre": ["Comedy", "Crime"],
                 "time": [961513993, 961514011]}}

``GET /schema`` of a server (``request_schema``) lists every field of a trained model with an example: a real row of
the run's data set (``data_example``: the first test row, with its newest events), or, where the data set was not
found, one built from the vocabularies (first ids, mean numbers: values no row need hold). Keys
that the model does not read (a label, a row number) are ignored. The columns are those the *encoder* reads,
i.e. after the dataset adapter (for MovieLens: the genre, year, hour and weekday of the rating), so a file's
rows turn into requests with ``examples_from_raw``.

Nothing here encodes: ``encode_examples`` builds a one-split ``RawData`` and hands it to the training
``Encoder`` and ``Batcher``, so unknown ids, numeric standardisation, history truncation and time gaps are
exactly as in training. Validation is column-wise (one pass per field over all examples, in C where numpy can
do it); only a failing column is searched example by example, to name the first bad one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kunlun.data.batches import Batch, Batcher
from kunlun.data.prepare import OOV, PAD, Encoder
from kunlun.data.schema import RawData, RawSplit, Schema, SequenceSpec

SPLIT = "request"


class ExampleError(ValueError):
    """A malformed request: ``field`` is where (``examples[3].history.time``), ``str(exc)`` is
    ``"<field>: <what was expected, and what came>"``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class RawExamples:
    """n validated examples as raw columns: ``columns`` (categorical, numeric, ``time``) [n]; per sequence its
    raw event columns (``item``, ``event``, side columns, ``time``) flattened over the examples, and ``lengths`` [n]."""

    n: int
    columns: dict[str, np.ndarray]
    events: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- fields

ID = "an id (integer or string, as in the training logs)"
NUMBER = "a finite number"
SECONDS = "an integer (unix seconds)"
LIST_OF = {ID: "a list of ids (integers or strings)", SECONDS: "a list of integers (unix seconds)"}


def sequence_fields(seq: SequenceSpec) -> list[tuple[str, str]]:
    """(event field, what each value must be) of one sequence, in request order."""
    out = [("item", ID)]
    if seq.event_vocab:
        out.append(("event", ID))
    out += [(col, ID) for col, _ in seq.side]
    if seq.has_time:
        out.append(("time", SECONDS))
    return out


def needs_time(schema: Schema) -> bool:
    """The request time is read when the schema has one (time gaps of history events are taken from it)."""
    return schema.has_time


EXAMPLE_EVENTS = 3  # history events of the /schema example drawn from the data: its newest (the JSON stays readable)
BUILT_EXAMPLE = "the vocabularies (first ids, mean numbers; the data set was not found)"  # example_from of a built example


def request_schema(encoder: Encoder, max_len: int, example: tuple[dict[str, Any], str] | None = None) -> dict[str, Any]:
    """What ``POST /score`` expects from one example, with a valid example: ``example`` (a request example and where it
    comes from, ``data_example``: a real row), else one built from the vocabularies (first ids, the numeric means)."""
    s = encoder.schema
    fields: dict[str, Any] = {}
    built: dict[str, Any] = {}
    for col, vocab in s.categorical:
        keys = encoder.vocabs[vocab].keys
        fields[col] = {"type": ID, "vocabulary": vocab, "known_values": int(len(keys))}
        built[col] = keys[0].item() if len(keys) else 0
    for col, mean in zip(s.numeric, encoder.num_mean):
        fields[col] = {"type": NUMBER}
        built[col] = float(mean)
    if needs_time(s):
        fields["time"] = {"type": SECONDS + ": the request time; history time gaps are measured from it"}
        built["time"] = 1_000_000_000
    for seq in s.sequences:
        sub = {}
        event = {}
        for f, kind in sequence_fields(seq):
            sub[f] = {"type": LIST_OF[kind]}
            if f == "time":
                event[f] = [999_990_000, 999_999_000]
            else:
                vocab = seq.item_vocab if f == "item" else seq.event_vocab if f == "event" else dict(seq.side)[f]
                keys = encoder.vocabs[vocab].keys
                event[f] = [keys[i % len(keys)].item() if len(keys) else 0 for i in range(2)]
        fields[seq.name] = {"type": "an object of equally long lists, oldest event first (an empty history: empty lists)",
                            "fields": sub, "max_len": max_len,
                            "note": f"the {max_len} newest events are used, as in training"}
        built[seq.name] = event
    return {
        "fields": fields,
        "unknown_ids": f"map to the out-of-vocabulary index ({OOV}), as in training (padding is {PAD})",
        "request": 'one example object, a JSON list of them, or {"examples": [...]}',
        "response": '{"probabilities": [...]}, one per example, in request order',
        "example": example[0] if example else built,
        "example_from": example[1] if example else BUILT_EXAMPLE,
    }


def data_example(raw: RawData, name: str) -> tuple[dict[str, Any], str] | None:
    """The first row of ``raw``'s test split (else valid, else train; e.g. ``kunlun.data.registry.first_rows``) as a
    request example with its ``EXAMPLE_EVENTS`` newest history events, and where it comes from; None when ``raw``
    holds no row. Every value is one the data set holds (the numeric features are the row's own, e.g. its full
    history's length). ``name``: the data set's, for the description."""
    for split in ("test", "valid", "train"):
        if split in raw.splits and len(raw.splits[split]):
            example = examples_from_raw(raw, split, np.arange(1), newest=EXAMPLE_EVENTS)[0]
            kept = f", its {EXAMPLE_EVENTS} newest history events" if raw.schema.sequences else ""
            return example, f"the first {split} row of {name}{kept}"
    return None


# ------------------------------------------------------------------------------------------- parsing

def payload_examples(payload: Any) -> list[dict]:
    """The list of example objects in a parsed request body (one object, a list, or ``{"examples": [...]}``)."""
    if isinstance(payload, dict) and "examples" in payload:
        payload = payload["examples"]
        where = "examples"
    elif isinstance(payload, dict):
        payload = [payload]
        where = "request"
    else:
        where = "request"
    if not isinstance(payload, list):
        raise ExampleError(where, f"expected a list of example objects, got {type_name(payload)}")
    if not payload:
        raise ExampleError(where, "expected at least one example, got an empty list")
    if not all(type(e) is dict for e in payload):
        i = next(i for i, e in enumerate(payload) if type(e) is not dict)
        raise ExampleError(f"examples[{i}]", f"expected an object of feature values, got {type_name(payload[i])}")
    return payload


def type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _column(examples: list[dict], key: str, where, kind: str) -> list:
    try:
        return [e[key] for e in examples]
    except KeyError:
        i = next(i for i, e in enumerate(examples) if key not in e)
        raise ExampleError(f"{where(i)}.{key}", f"missing; expected {kind}") from None


def _first_bad(values: list, ok) -> int:
    return next(i for i, v in enumerate(values) if not ok(v))


def _ids(values: list, what) -> np.ndarray:
    """Categorical raw values → int64 (all integers) or str array, as ``kunlun.data.io.id_column`` reads a file."""
    kinds = set(map(type, values))
    if kinds <= {int}:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            i = _first_bad(values, lambda v: -(2**63) <= v < 2**63)
            raise ExampleError(what(i), f"expected {ID} within 64 bits, got {values[i]}") from None
    if kinds <= {int, str}:
        return np.array([v if type(v) is str else str(v) for v in values]) if int in kinds else np.array(values, dtype=str)
    i = _first_bad(values, lambda v: type(v) in (int, str))
    raise ExampleError(what(i), f"expected {ID}, got {type_name(values[i])} {short(values[i])}")


def _numbers(values: list, what) -> np.ndarray:
    if set(map(type, values)) <= {int, float}:
        arr = np.array(values, dtype=np.float64)
        if np.isfinite(arr).all():
            return arr
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ExampleError(what(i), f"expected {NUMBER}, got {values[i]}")
    i = _first_bad(values, lambda v: type(v) in (int, float))
    raise ExampleError(what(i), f"expected {NUMBER}, got {type_name(values[i])} {short(values[i])}")


def _seconds(values: list, what) -> np.ndarray:
    if set(map(type, values)) <= {int}:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    i = _first_bad(values, lambda v: type(v) is int and -(2**63) <= v < 2**63)
    raise ExampleError(what(i), f"expected {SECONDS}, got {type_name(values[i])} {short(values[i])}")


def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_examples(payload: Any, schema: Schema) -> RawExamples:
    """Validate a parsed request body against ``schema``; raise ExampleError naming the first bad field."""
    examples = payload_examples(payload)
    n = len(examples)
    single = isinstance(payload, dict) and "examples" not in payload
    name = (lambda i: "request") if single else (lambda i: f"examples[{i}]")
    columns: dict[str, np.ndarray] = {}
    for col, _ in schema.categorical:
        columns[col] = _ids(_column(examples, col, name, ID), lambda i, col=col: f"{name(i)}.{col}")
    for col in schema.numeric:
        columns[col] = _numbers(_column(examples, col, name, NUMBER), lambda i, col=col: f"{name(i)}.{col}")
    if needs_time(schema):
        columns["time"] = _seconds(_column(examples, "time", name, SECONDS), lambda i: f"{name(i)}.time")
    out = RawExamples(n, columns)
    for seq in schema.sequences:
        out.events[seq.name], out.lengths[seq.name] = _sequence(examples, seq, name)
    return out


def _sequence(examples: list[dict], seq: SequenceSpec, name) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One sequence of every example → (flat raw event columns, lengths); ``name(i)`` names example i."""
    n = len(examples)
    fields = sequence_fields(seq)
    kind = f"an object of lists ({', '.join(f for f, _ in fields)})"
    seqs = _column(examples, seq.name, name, kind)
    where = lambda i: f"{name(i)}.{seq.name}"  # noqa: E731
    if not all(type(s) is dict for s in seqs):
        i = _first_bad(seqs, lambda s: type(s) is dict)
        raise ExampleError(where(i), f"expected {kind}, got {type_name(seqs[i])}")
    events: dict[str, np.ndarray] = {}
    lengths = np.zeros(n, np.int64)
    for k, (f, values) in enumerate(fields):
        what = LIST_OF[values]
        lists = _column(seqs, f, where, what)
        if not all(type(v) is list for v in lists):
            i = _first_bad(lists, lambda v: type(v) is list)
            raise ExampleError(f"{where(i)}.{f}", f"expected {what}, got {type_name(lists[i])}")
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=n)
        if k == 0:
            lengths = lens
        elif not np.array_equal(lens, lengths):
            i = int(np.flatnonzero(lens != lengths)[0])
            raise ExampleError(f"{where(i)}.{f}", f"expected as many values as {seq.name}.item ({lengths[i]}), got {lens[i]}")
        starts = np.concatenate([[0], np.cumsum(lens)])

        def at(j: int, f=f, starts=starts) -> str:  # flat index → the example and position it came from
            i = int(np.searchsorted(starts, j, side="right") - 1)
            return f"{where(i)}.{f}[{j - starts[i]}]"

        flat = list(itertools.chain.from_iterable(lists))
        events[f] = (_seconds if f == "time" else _ids)(flat, at) if flat else np.zeros(0, np.int64)
    return events, lengths


def concat_examples(parts: list[RawExamples]) -> RawExamples:
    """Several requests' examples as one block (a micro-batch), in order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return RawExamples(
        n=sum(p.n for p in parts),
        # ids sent as integers by one request and as text by another become text, compared as text by Vocab.encode
        columns={k: np.concatenate([p.columns[k] for p in parts]) for k in first.columns},
        events={q: {k: np.concatenate([p.events[q][k] for p in parts]) for k in first.events[q]} for q in first.events},
        lengths={q: np.concatenate([p.lengths[q] for p in parts]) for q in first.lengths},
    )


# ------------------------------------------------------------------------------------------- encoding

def to_raw_data(ex: RawExamples, schema: Schema) -> RawData:
    """One split (``request``) of raw data, with histories as ranges into per-sequence event tables."""
    columns = {**ex.columns, schema.label: np.zeros(ex.n, dtype=np.float32)}
    time = columns.pop("time") if needs_time(schema) else None  # the request time lives apart from the columns
    split = RawSplit(columns=columns, time=time)
    for q, lengths in ex.lengths.items():
        end = np.cumsum(lengths)
        split.seq_start[q], split.seq_end[q] = end - lengths, end
    return RawData(schema, {SPLIT: split}, ex.events, source="request", has_labels=False)


def encode_examples(encoder: Encoder, ex: RawExamples, max_len: int, event_windows: dict[str, tuple[int, ...]] | None = None) -> Batch:
    """The batch the training pipeline makes of these examples: the run's ``Encoder`` and ``Batcher`` (with the
    per-event-type windows the model reads, ``RankingModel.event_windows``)."""
    data = encoder.prepare(to_raw_data(ex, encoder.schema), SPLIT)
    return Batcher(data, SPLIT, max_len, event_windows or False).batch(np.arange(ex.n))


def examples_from_raw(raw: RawData, split: str, rows: np.ndarray | None = None, newest: int | None = None) -> list[dict[str, Any]]:
    """Rows of a raw split (e.g. a file read by the dataset adapter) as request examples — what a client would
    send for them. ``rows``: positions in the split (default all). ``newest``: send only each history's newest
    events (the model reads its ``max_len`` newest, so sending that many scores the same)."""
    s, sp = raw.schema, raw.splits[split]
    rows = np.arange(len(sp)) if rows is None else np.asarray(rows)
    keys = [c for c, _ in s.categorical] + list(s.numeric) + (["time"] if needs_time(s) else [])
    cols = {k: (sp.time if k == "time" and needs_time(s) else sp.columns[k])[rows].tolist() for k in keys}
    out = [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))] if keys else [{} for _ in rows]
    for seq in s.sequences:
        ev = raw.events[seq.name]
        names = [f for f, _ in sequence_fields(seq)]
        values = {f: ev[f] for f in names}
        start, end = sp.seq_start[seq.name][rows], sp.seq_end[seq.name][rows]
        if newest is not None:
            start = np.maximum(start, end - newest)
        for ex, a, b in zip(out, start, end):
            ex[seq.name] = {f: values[f][a:b].tolist() for f in names}
    return out
