"""Generated inputs for the data and schema readers: every one loads (and trains a step), or is one KunlunError.

Hypothesis writes CSV and Parquet files (random header names with duplicates, typed and junk cells, nulls,
bytes that are not UTF-8, separated and Parquet list columns, ragged rows, empty files) and schema YAMLs over
them (right and wrong key types, unknown columns and vocabularies, features listed twice), MovieLens and
Frappe folders, and arbitrary YAML documents as schema files. The property: reading either succeeds —
and then encoding, the prepared-data cache round trip, a batch of every split and a forward pass of a tiny
model succeed too — or raises KunlunError with a one-line message. Any other exception is a bug the CLI would
show as a traceback. Runs are derandomized (the same examples every time) and bounded in number.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_MODEL
from kunlun.errors import KunlunError

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (optional test dependency)")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

# "row" and "time" once clashed with internal names; "a.b", "type" and "items" are names PyTorch refuses for modules
NAMES = ["y", "u", "i", "p", "h", "e", "t", "ts", "row", "time", "a b", "é", "x/y", "a.b", "type", "items"]
KINDS = ["label", "id", "text_id", "float", "time", "items", "times", "junk"]  # and, for MovieLens, "user" and "rating"
JUNK = [b"", b"nan", b"inf", b"-", b"yes", b"1.5", b"-3", b"x y", b"\xff", b"a\xc3", b"\xe9t\xe9", b'"q,u"', b'"open', b'a"b',
        b'"two\nlines"', b"1|2", b"a||b", b"|", b"1e3", b"99999999999999999999", b"\xc2\xb2", b"\xd9\xa3"]


def text_cell(kind: str, length: int):
    """A well-formed CSV cell of a column of ``kind`` (list kinds hold ``length`` entries)."""
    return {
        "label": st.sampled_from([b"0", b"1"]),
        "id": st.integers(0, 5).map(lambda v: str(v).encode()),
        "user": st.sampled_from([b"1", b"2"]),
        "rating": st.sampled_from([b"1", b"2.5", b"4", b"5"]),
        "text_id": st.sampled_from([b"a", b"b", b"c", b"\xc3\xa9", b"1"]),
        "float": st.floats(-10, 10, allow_nan=False).map(lambda v: repr(v).encode()),
        "time": st.integers(0, 2000).map(lambda v: str(v).encode()),
        "items": st.lists(st.sampled_from([b"a", b"b", b"1", b"2"]), min_size=length, max_size=length).map(b"|".join),
        "times": st.lists(st.integers(0, 99).map(lambda v: str(v).encode()), min_size=length, max_size=length).map(b"|".join),
        "junk": st.sampled_from(JUNK),
    }[kind]


def arrow_values(kind: str, length: int):
    return {
        "label": st.sampled_from([0, 1]),
        "id": st.integers(-2, 5),
        "text_id": st.sampled_from(["a", "b", "é"]),
        "float": st.floats(-10, 10),
        "time": st.integers(0, 2000),
        "items": st.lists(st.sampled_from(["a", "b", "1"]), min_size=length, max_size=length),
        "times": st.lists(st.integers(0, 99), min_size=length, max_size=length),
        "junk": st.sampled_from(["x", "1.5", ""]),
    }[kind]


def odd_arrow_column(draw, n: int):
    """A Parquet column of a type no reader expects, or with nulls and non-finite values."""
    import pyarrow as pa

    t = draw(st.sampled_from(["bool", "binary", "null", "nested", "struct", "dict", "large_string", "float_list", "nan", "none_items",
                              "int_list_nulls"]))
    if t == "bool":
        return pa.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), pa.bool_())
    if t == "binary":
        return pa.array(draw(st.lists(st.sampled_from([b"a", b"\xff", b"1"]), min_size=n, max_size=n)), pa.binary())
    if t == "null":
        return pa.nulls(n)
    if t == "nested":
        return pa.array([[[1], [2, 3]]] * n, pa.list_(pa.list_(pa.int64())))
    if t == "struct":
        return pa.array([{"a": 1}] * n, pa.struct([("a", pa.int64())]))
    if t == "dict":
        return pa.array(draw(st.lists(st.sampled_from(["a", "b"]), min_size=n, max_size=n))).dictionary_encode()
    if t == "large_string":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.sampled_from(["1", "a"])), min_size=n, max_size=n)), pa.large_string())
    if t == "float_list":
        return pa.array(draw(st.lists(st.lists(st.floats(allow_nan=True), max_size=3), min_size=n, max_size=n)), pa.list_(pa.float64()))
    if t == "nan":
        return pa.array(draw(st.lists(st.sampled_from([0.0, 1.0, float("nan"), float("inf")]), min_size=n, max_size=n)), pa.float64())
    if t == "none_items":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.just("a")), max_size=2)), min_size=n, max_size=n)),
                        pa.list_(pa.string()))
    return pa.array(draw(st.lists(st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=2), min_size=n, max_size=n)),
                    pa.list_(pa.int64()))


@st.composite
def data_file(draw, columns: list[tuple[str, str]], suffix: str, messy: bool | None = None, rows: tuple[int, int] = (2, 6)):
    """A CSV (bytes) or Parquet (pyarrow table) file for ``columns`` = [(name, kind)]: well formed unless ``messy``
    (then some cells are junk, rows ragged, columns of odd types; None: drawn)."""
    messy = draw(st.booleans()) if messy is None else messy
    n = draw(st.integers(0, rows[1]) if messy else st.integers(*rows))
    lengths = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # entries per row, shared by the row's list columns
    odd = (lambda: draw(st.integers(0, 4)) == 0) if messy else (lambda: False)
    if suffix == ".parquet":
        import pyarrow as pa

        arrays = [odd_arrow_column(draw, n) if odd() else
                  pa.array([r % 2 if kind == "label" and r < 2 else draw(arrow_values(kind, k)) for r, k in enumerate(lengths)])
                  for _, kind in columns]
        return pa.Table.from_arrays(arrays, names=[c for c, _ in columns]) if columns else pa.table({})
    if messy and draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b"\n", b"\xff\xfe", b"y,u\n", b'"', b"\xef\xbb\xbfy,u\n1,a\n"]))
    lines = [b",".join(c.encode() for c, _ in columns)]
    for r, k in enumerate(lengths):  # the first two labels are 0 and 1: training needs both classes
        row = [draw(st.sampled_from(JUNK)) if odd() else b"01"[r:r + 1] if kind == "label" and r < 2 else draw(text_cell(kind, k))
               for _, kind in columns]
        if odd():  # ragged row
            row = row[: draw(st.integers(0, len(row)))] if row and draw(st.booleans()) else row + [b"extra"]
        lines.append(b",".join(row))
    newline = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    return newline.join(lines) + draw(st.sampled_from([newline, b"", newline * 2]))


JUNK_VALUES = [5, 1.5, True, None, ["a", "b"], {"a": 1}, "", "missing", "row", "time", "a/b", "../up"]


@st.composite
def dataset(draw):
    """A folder's worth: train/valid files (CSV or Parquet) and a schema over them — built valid, then given
    zero to two mistakes (a key of the wrong type, an unknown key or column, a feature listed twice, ...)."""
    kinds = ["label", draw(st.sampled_from(["id", "text_id"]))] + draw(st.lists(st.sampled_from(KINDS), max_size=5))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=len(kinds), max_size=len(kinds), unique=True))
    columns = list(zip(names, kinds))
    of = {k: [c for c, kk in columns if kk == k] for k in KINDS}
    label, cats = of["label"][0], of["id"] + of["text_id"]
    spec: dict = {"files": {}, "label": label}
    if draw(st.booleans()):
        spec["categorical"] = cats
        vocabs = cats
    else:
        spec["categorical"] = {c: draw(st.sampled_from([c, "v1", "a/b", "ü v", "train"])) for c in cats}
        vocabs = list(spec["categorical"].values())
    if of["float"] or of["label"][1:]:
        spec["numeric"] = of["float"] + of["label"][1:]
    if draw(st.booleans()):
        spec["group"] = draw(st.sampled_from(cats))
    if of["time"] and draw(st.booleans()):
        spec["time"] = of["time"][0]
    sequences = []
    times = list(of["times"])
    for i, c in enumerate(of["items"]):
        s = {"name": f"s{i}", "item": c, "item_vocab": draw(st.sampled_from(vocabs))}
        if times and draw(st.booleans()):
            s["time"] = times.pop()
        sequences.append(s)
    if sequences:
        spec["sequences"] = sequences
    if draw(st.booleans()):
        spec["name"] = draw(st.sampled_from(["toy", "a b", "ü"]))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        mistake = draw(st.sampled_from(["junk", "unknown_key", "twice", "as_label", "vocab", "missing", "drop", "dup_header", "seq_key"]))
        if mistake == "junk":
            spec[draw(st.sampled_from(list(spec)))] = draw(st.sampled_from(JUNK_VALUES))
        elif mistake == "unknown_key":
            spec[draw(st.sampled_from(["colour", "labels", "sequence"]))] = "x"
        elif mistake == "twice" and isinstance(spec.get("categorical"), list):
            spec["categorical"] = spec["categorical"] + [draw(st.sampled_from(spec["categorical"]))]
        elif mistake == "as_label":
            spec["numeric"] = [*(spec.get("numeric") or []), label]
        elif mistake == "vocab" and sequences:
            sequences[0]["item_vocab"] = "nope"
        elif mistake == "missing":
            spec[draw(st.sampled_from(["label", "group", "time"]))] = "missing"
        elif mistake == "drop":
            spec.pop(draw(st.sampled_from(["label", "categorical", "files"])), None)
        elif mistake == "dup_header":
            columns = columns + [(draw(st.sampled_from([c for c, _ in columns] + [""])), "junk")]
        elif mistake == "seq_key" and sequences:
            sequences[0][draw(st.sampled_from(["separator", "event", "time", "name", "extra"]))] = draw(st.sampled_from(JUNK_VALUES + [";", "items"]))
    files = {}
    for split in ("train", "valid"):
        suffix = draw(st.sampled_from([".csv", ".csv", ".parquet"]))
        files[f"{split}{suffix}"] = draw(data_file(columns, suffix, messy=draw(st.integers(0, 3)) == 3))
        if isinstance(spec.get("files"), dict):
            spec["files"][split] = f"{split}{suffix}"
    return files, spec


def tiny_model_forward(prepared) -> None:
    """A batch of every split through a small Kunlun model: what training would do first."""
    import torch

    from kunlun.blocks.embeddings import FeatureInfo
    from kunlun.config import load_config
    from kunlun.data.batches import Batcher
    from kunlun.training.trainer import build_from_info

    cfg = load_config(None, TINY_MODEL)
    model = build_from_info(cfg, FeatureInfo.from_encoder(prepared.encoder(), cfg.data.max_seq_len))
    with torch.no_grad():
        for name, split in prepared.splits.items():
            batch = Batcher(prepared, name, cfg.data.max_seq_len).batch(np.arange(len(split)))
            assert torch.isfinite(model(batch)).all(), name


def loads_or_one_line_error(load) -> str | None:
    """Run ``load()``; None when it worked, else the KunlunError's message (checked to be one line)."""
    try:
        load()
    except KunlunError as exc:
        message = str(exc)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        return message
    return None


def prepare_all(schema: Path) -> None:
    """What `kunlun train --dataset schema.yaml` does with the data: prepare (writing the cache), read the cache
    back (the same data), then batch and forward."""
    from kunlun.data.registry import prepare_dataset

    first = prepare_dataset(str(schema))
    again = prepare_dataset(str(schema))
    assert again.fingerprint() == first.fingerprint()
    tiny_model_forward(first)


def write_files(folder: Path, files: dict) -> None:
    import pyarrow.parquet as pq

    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            pq.write_table(content, folder / name)


@settings(FUZZ, max_examples=150)
@given(dataset())
def test_generated_schema_datasets_load_or_fail_in_one_line(case):
    files, spec = case
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write_files(folder, files)
        (folder / "schema.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
        loads_or_one_line_error(lambda: prepare_all(folder / "schema.yaml"))


def _found(train: bytes | dict, body: dict):
    """A dataset like those the fuzzing found problems with: train = valid = ``train`` (CSV bytes or Parquet columns)."""
    import pyarrow as pa

    name = "train.csv" if isinstance(train, bytes) else "train.parquet"
    content = train if isinstance(train, bytes) else pa.table(train)
    return ({name: content, "valid" + name[5:]: content}, {"files": {"train": name, "valid": "valid" + name[5:]}, "label": "y", **body})


@pytest.mark.parametrize("case,error", [
    (_found(b"y,u,i\n0,0,\n1,0,\n", {"categorical": ["u"], "sequences": [{"name": "s", "item": "i", "item_vocab": "u"}]}), None),
    (_found(b"y,u,p\n0,0,0.0\n1,0,1e-88\n", {"categorical": ["u"], "numeric": ["p"]}), None),
    (_found({"y": [0, 1], "u": [1, 2], "h": [["a", None], []]}, {"categorical": ["u"], "sequences": [{"name": "s", "item": "h", "item_vocab": "u"}]}),
     "column 'h' has a missing value inside its list at data row 1"),
    (_found({"y": [0, 1], "u": [1, 2], "h": [1, 2]}, {"categorical": ["u"], "sequences": [{"name": "s", "item": "h", "item_vocab": "u"}]}),
     "column 'h' must be a list (Parquet) or a separated string (CSV), found int64"),
    (_found({"y": [0, 1], "u": [[1], [2]]}, {"categorical": ["u"]}), "column 'u' must hold one id per row"),
    (_found(b"y,a.b,type\n0,x,1\n1,y,2\n", {"categorical": {"a.b": "a.b", "type": "items"}}), None),
], ids=["no-events-anywhere", "spread-zero-in-float32", "null-inside-a-list", "scalar-as-a-list", "list-as-a-categorical",
        "vocabularies-torch-refuses-as-module-names"])
def test_what_the_fuzzing_found(case, error):
    """Inputs the generators once hit: the valid ones load, the others name the problem."""
    files, spec = case
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write_files(folder, files)
        (folder / "schema.yaml").write_text(yaml.safe_dump(spec))
        message = loads_or_one_line_error(lambda: prepare_all(folder / "schema.yaml"))
        assert (message is None) if error is None else (error in (message or "")), message


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.sampled_from(["y", "u", "", "train.csv", "a/b"]),
              st.dates()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["name", "item", "item_vocab", "train", "valid", "u", "x"]),
                                                                       inner, max_size=3)),
    max_leaves=8,
)


@settings(FUZZ, max_examples=150)
@given(st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(["name", "files", "label", "group", "time", "categorical", "numeric", "sequences", "other"]),
                              st.integers(0, 2), st.booleans()), yaml_values, max_size=8),
    yaml_values,
    st.binary(max_size=40),
    st.text(max_size=40),
))
@example({1: "a", "other": 2})  # keys that are not text, and do not sort with text
def test_arbitrary_schema_documents_load_or_fail_in_one_line(document):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "train.csv").write_text("y,u\n1,a\n0,b\n")
        schema = folder / "schema.yaml"
        if isinstance(document, bytes):
            schema.write_bytes(document)
        elif isinstance(document, str):
            schema.write_text(document)
        else:
            schema.write_text(yaml.safe_dump(document, allow_unicode=True))
        loads_or_one_line_error(lambda: prepare_all(schema))


RATINGS = ["userId", "movieId", "rating", "timestamp"]
MOVIES = ["movieId", "title", "genres"]


@st.composite
def movielens_folder(draw):
    """ratings.csv and movies.csv of MovieLens latest-small, with generated (sometimes wrong) columns and cells."""
    def table(required, kinds):
        header = draw(st.one_of(st.just(required), st.just(required), st.permutations(required),
                                st.lists(st.sampled_from(required + ["x"]), max_size=5)))
        columns = [(c, kinds.get(c, "junk")) for c in header]
        return draw(data_file(columns, ".csv", messy=draw(st.integers(0, 3)) == 3, rows=(12, 24)))

    ratings = table(RATINGS, {"userId": "user", "movieId": "id", "rating": draw(st.sampled_from(["rating", "rating", "float", "junk"])),
                              "timestamp": "time"})
    movies = table(MOVIES, {"movieId": "id", "title": "text_id", "genres": "items"})
    return {"ratings.csv": ratings, "movies.csv": movies}


@settings(FUZZ, max_examples=60)
@given(movielens_folder())
def test_generated_movielens_folders_load_or_fail_in_one_line(files):
    from kunlun.data.prepare import Encoder
    from kunlun.data.registry import DATASETS

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write_files(folder, files)

        def load():
            raw = DATASETS["ml-latest-small"].load(folder)
            tiny_model_forward(Encoder.fit(raw).prepare(raw, "fuzz"))

        loads_or_one_line_error(load)


@st.composite
def ml100k_folder(draw):
    """u.data (tab-separated), u.item and u.user (|-separated, no header) of MovieLens 100K."""
    def rows(kinds, sep, n=(12, 24)):
        messy = draw(st.integers(0, 3)) == 3
        lines = []
        for _ in range(draw(st.integers(0 if messy else n[0], n[1]))):
            row = [draw(st.sampled_from(JUNK)) if messy and draw(st.integers(0, 9)) == 0 else draw(text_cell(k, 1)) for k in kinds]
            if messy and draw(st.integers(0, 10)) == 0:
                row = row[:-1]
            lines.append(sep.join(row))
        return b"\n".join(lines) + b"\n"

    return {
        "u.data": rows(["user", "id", draw(st.sampled_from(["rating", "rating", "float"])), "time"], b"\t"),
        "u.item": b"".join(b"%d|t|01-Jan-199%d||u|" % (i, i) + b"|".join(b"01"[(bits >> g) & 1: ((bits >> g) & 1) + 1] for g in range(19))
                           + b"\n" for i, bits in enumerate(draw(st.lists(st.integers(0, 2**19 - 1), min_size=1, max_size=6))))
        if draw(st.integers(0, 3)) else rows(["id", "text_id", "text_id", "text_id", "text_id"] + ["label"] * 19, b"|", n=(1, 4)),
        "u.user": rows(["user", "id", "text_id", "text_id", "id"], b"|"),
    }


@settings(FUZZ, max_examples=60)
@given(ml100k_folder())
def test_generated_ml100k_folders_load_or_fail_in_one_line(files):
    from kunlun.data.prepare import Encoder
    from kunlun.data.registry import DATASETS

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write_files(folder, files)

        def load():
            raw = DATASETS["ml-100k"].load(folder)
            Encoder.fit(raw).prepare(raw, "fuzz")

        loads_or_one_line_error(load)


FRAPPE = ["label", "user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


@st.composite
def frappe_file(draw):
    header = draw(st.one_of(st.just(FRAPPE), st.just(FRAPPE), st.just(FRAPPE[1:]), st.lists(st.sampled_from(FRAPPE + ["x"]), max_size=13)))
    return draw(data_file([(c, "label" if c == "label" else draw(st.sampled_from(["id", "text_id", "junk"]))) for c in header], ".csv",
                          messy=draw(st.integers(0, 3)) == 3))


@FUZZ
@given(frappe_file(), st.booleans())
def test_generated_frappe_files_load_or_fail_in_one_line(content, labels):
    from kunlun.data.tabular import read_frappe_file

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.csv"
        path.write_bytes(content)
        loads_or_one_line_error(lambda: read_frappe_file(path, labels))


# ------------------------------------------------------------------ spec files: sweeps and benchmark specs

spec_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(allow_nan=True),
              st.sampled_from(["", "x", "zip", "ml-100k", "dnn", "kunlun", "bf16", "model.d_model", "model.d_model=8",
                               "train.lr=3e-4", "train.epochs=1"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["model.d_model", "dnn", "kunlun", "ml-100k", "dataset", "variants", "a"]),
                                            inner, max_size=3)),
    max_leaves=8,
)
SPEC_KEYS = {
    "sweep": ["name", "model", "dataset", "overrides", "mode", "axes", "seeds", "noise", "parallel", "threads", "other"],
    "quality": ["datasets", "seeds", "models", "dataset_overrides", "ablation", "other"],
    "formats": ["datasets", "seeds", "model", "overrides", "formats", "variant_formats", "variants", "other"],
}
VALID_SPEC = {  # a valid document of each kind: the fuzzed ones are it with keys replaced or added
    "sweep": {"name": "s", "model": "dnn", "dataset": "ml-100k", "axes": {"model.d_model": [8, 16]}, "seeds": [0]},
    "quality": {"datasets": ["ml-100k"], "seeds": [0], "models": {"dnn": []}, "ablation": {"dataset": "ml-100k", "variants": {"a": []}}},
    "formats": {"datasets": ["ml-100k"], "seeds": [0], "model": "kunlun", "formats": ["bf16", "hif4"], "variants": {"rht": []}},
}


def load_spec_file(kind: str, path: Path):
    if kind == "sweep":
        from kunlun.scaling.sweep import load_sweep

        return load_sweep(path)
    if kind == "quality":
        from kunlun.bench.spec import load_spec

        return load_spec(path)
    from kunlun.bench.formats import load_formats_spec

    return load_formats_spec(path)


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(sorted(SPEC_KEYS)), st.data())
def test_sweep_and_benchmark_spec_files_load_or_fail_in_one_line(kind, data):
    """A sweep file or a quality / ablation / formats spec with keys of any type (or unknown keys) loads, or fails
    with one line naming the file — never a traceback, and never later, when points are already training."""
    document = dict(VALID_SPEC[kind])
    document.update(data.draw(st.dictionaries(st.sampled_from(SPEC_KEYS[kind]), spec_values, max_size=3)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(yaml.safe_dump(document, allow_unicode=True))
        message = loads_or_one_line_error(lambda: load_spec_file(kind, path))
        assert message is None or str(path) in message, message


@pytest.mark.parametrize("kind", sorted(SPEC_KEYS))
def test_valid_spec_files_load(kind, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(VALID_SPEC[kind]))
    spec = load_spec_file(kind, path)
    seeds = spec.seeds if kind == "sweep" else spec["seeds"]
    assert seeds == VALID_SPEC[kind]["seeds"]  # the document's values came through, not only "no exception"
    if kind != "sweep":
        assert spec["datasets"] == VALID_SPEC[kind]["datasets"]


FIT_COLUMNS = ["compute", "ne", "family", "seed", "layers", "flops_per_example", "x"]
FIT_CELLS = [b"1e12", b"2e12", b"0.8", b"0.7", b"-1", b"0", b"nan", b"inf", b"a", b"", b"1.5", b"3", b"\xff", b'"q,u"', b'"open']


@settings(FUZZ, max_examples=100)
@given(st.lists(st.sampled_from(FIT_COLUMNS), min_size=0, max_size=5),
       st.lists(st.lists(st.sampled_from(FIT_CELLS), min_size=0, max_size=6), min_size=0, max_size=6))
@example(["compute", "ne"], [[b"1e12", b"0.8", b"9"]])  # a row with more cells than the header
def test_fit_csv_files_load_or_fail_in_one_line(header, rows):
    """`kunlun fit`'s CSV tables: any header and cells load as scaling points or fail with one line naming the file."""
    from kunlun.scaling.points import load_points

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "runs.csv"
        path.write_bytes(b"\n".join([",".join(header).encode(), *(b",".join(r) for r in rows)]) + b"\n")
        message = loads_or_one_line_error(lambda: load_points([path]))
        assert message is None or str(path) in message or "compute" in message, message
