"""What a user's input does at the command line: a mistake is one line naming the file / column / row / key,
exit status 2, no traceback and nothing half-written; valid input that used to be refused is accepted.

Commands run in-process through ``kunlun.cli.main`` (the real top-level handler) for speed; ``test_cli.py``
runs the installed entry point in subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL, run_cli
from kunlun.errors import KunlunError

TINY = TINY_MODEL + ["train.max_steps=5", "train.epochs=1"]
kunlun = run_cli




def assert_user_error(result, *needles: str) -> str:
    """Exit status 2, no traceback, one error line — the last line on stderr — holding every needle."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("kunlun: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def write(path: Path, text: str | bytes) -> Path:
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def schema(folder: Path, body: str, train: str | bytes = "y,u,p\n1,a,1.5\n0,b,2.5\n", valid: str | bytes | None = None) -> Path:
    """A schema file ``s.yaml`` over train.csv / valid.csv in ``folder``."""
    write(folder / "train.csv", train)
    write(folder / "valid.csv", train if valid is None else valid)
    return write(folder / "s.yaml", "files: {train: train.csv, valid: valid.csv}\n" + body)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name)


# ------------------------------------------------------------------------------------------------ data files


@pytest.mark.parametrize(
    "train,needles",
    [
        ("y,u,u\n1,a,b\n0,c,d\n", ["train.csv", "column 'u' appears 2 times in the header"]),
        (b"y,u\n1,a\n0,caf\xe9\n", ["train.csv", "column 'u'", "not valid UTF-8", "data row 2"]),
        ("y,u\n1,a\nyes,b\n", ["train.csv", "column 'y'", "'yes'", "data row 2"]),
        ("y,u,p\n1,a,1.5\n0,b,cheap\n", ["train.csv", "column 'p'", "'cheap'", "data row 2"]),
        ("y,u,p\n1,a,1.5\n0,b\n", ["train.csv", "line 3 has 2 fields, expected 3"]),
        ("y,u,p\n1,a,1e300\n0,b,1\n", ["train.csv", "column 'p'", "data row 1", "float32"]),
        (b"y,\xff\n1,a\n", ["train.csv", "header row is not valid utf8"]),
        ("\n\n", ["train.csv", "only empty lines"]),
        ("y,u,p\n", ["train.csv", "no rows"]),
    ],
    ids=["duplicated-column", "bad-utf8-category", "label-yes", "text-in-numeric", "ragged-row", "beyond-float32", "bad-utf8-header",
         "empty-lines", "no-rows"],
)
def test_bad_data_files_are_one_line_naming_file_column_row(tmp_path, monkeypatch, capsys, train, needles):
    monkeypatch.chdir(tmp_path)
    numeric = "numeric: [p]\n" if (train if isinstance(train, bytes) else train.encode()).startswith(b"y,u,p") else ""
    s = schema(tmp_path, "label: y\ncategorical: [u]\n" + numeric, train, valid="y,u,p\n1,a,1\n0,b,2\n")
    assert_user_error(kunlun(["data", "info", "--dataset", s], monkeypatch, capsys), *needles)
    assert_user_error(kunlun(["train", "--dataset", s, "--run-dir", tmp_path / "run", *TINY], monkeypatch, capsys), *needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_history_whose_cells_hold_one_item_each_is_a_history(tmp_path, monkeypatch, capsys):
    # every cell holds at most one id, so a CSV reader infers integers — it is still a list column
    rows = "".join(f"{i % 2},{i % 3},{i % 4},{'' if i % 5 == 0 else i % 4}\n" for i in range(40))
    s = schema(tmp_path, "label: y\ncategorical: [u, i]\nsequences:\n  - {name: hist, item: hist, item_vocab: i}\n",
               "y,u,i,hist\n" + rows)
    code, out, err = kunlun(["data", "info", "--dataset", s, "--json"], monkeypatch, capsys)
    assert code == 0, err
    lengths = json.loads(out)["splits"]["train"]["hist_length"]
    assert lengths["max"] == 1 and lengths["mean"] == pytest.approx(32 / 40)
    from kunlun.data.registry import prepare_dataset

    p = prepare_dataset(str(s))
    hist = p.events["hist"].item[p.splits["train"].seq_start["hist"][1]]  # row 1: history "1" (item id 1, a known item)
    assert hist == p.vocabs["i"].encode(np.array([1]))[0] >= 2


def test_columns_named_row_and_time_are_ordinary_features(tmp_path):
    # "row" and "time" were internal names too: a user's column of that name overwrote the file's row order
    from kunlun.data.registry import prepare_dataset

    s = schema(tmp_path, "label: y\ntime: ts\ncategorical: [row]\nnumeric: [time]\n",
               "y,row,time,ts\n" + "".join(f"{i % 2},r{9 - i},{10 * i},{100 + i}\n" for i in range(10)))
    p = prepare_dataset(str(s))
    train = p.splits["train"]
    assert train.row.tolist() == list(range(10)) and train.time.tolist() == list(range(100, 110))
    assert np.allclose(train.num[:, 0] * p.num_std[0] + p.num_mean[0], np.arange(0, 100, 10), atol=1e-4)


# ------------------------------------------------------------------------------------------------ schema files


@pytest.mark.parametrize(
    "body,needles",
    [
        ("label: [a, b]\ncategorical: [u]\n", ["s.yaml", "key 'label' must be a column name", "['a', 'b']"]),
        ("label: y\ncategorical: 5\n", ["s.yaml", "key 'categorical' must be a list of column names"]),
        ("label: y\ncategorical: [u]\nnumeric: p\n", ["s.yaml", "key 'numeric' must be a list of column names", "'p'"]),
        ("label: y\ncategorical: [u, u]\n", ["s.yaml", "feature 'u' is listed twice"]),
        ("label: y\ncategorical: [u]\nnumeric: [p, y]\n", ["s.yaml", "feature 'y' is listed as the label and as numeric"]),
        ("label: y\ncategorical: [u]\nnumeric: [p]\nnumeric: [p]\n", ["s.yaml", "key 'numeric' is given twice at line 5"]),
        ("label: y\ncategorical: [u]\nsequences:\n  - {name: h, item: p, item_vocab: items}\n",
         ["s.yaml", "item_vocab 'items' is not the vocabulary of any categorical column"]),
        ("label: y\ncategorical: [u]\nsequences:\n  - {name: h, item: p, item_vocab: u, separator: ''}\n",
         ["s.yaml", "key 'sequences[0].separator' must be a non-empty string"]),
        ("label: y\ncategorical: {u: ../../x}\nsequences: [{name: ../h, item: p, item_vocab: ../../x}]\n",
         ["s.yaml", "sequences[0]: key 'name' must be a name without '.', '/' or '\\'"]),
        ("label: y\ncategorical: [u]\nsequences: [{name: items, item: p, item_vocab: u}]\n", ["s.yaml", "sequence name 'items' is taken"]),
        ("label: y\ncategorical: [u]\nnumeric: [p\n", ["s.yaml", "not valid YAML", "line"]),
        ("label: 1\ncategorical: [u]\n", ["s.yaml", "key 'label' must be a column name", "quote"]),
        ("label: y\ncategorical: [u]\ncolour: red\n", ["s.yaml", "unknown key 'colour'"]),
    ],
    ids=["label-list", "categorical-int", "numeric-string", "feature-twice", "label-as-feature", "key-twice", "unknown-item-vocab",
         "empty-separator", "unsafe-names", "reserved-sequence-name", "bad-yaml", "label-number", "unknown-key"],
)
def test_schema_mistakes_are_one_line_naming_the_key_when_the_schema_is_read(tmp_path, monkeypatch, capsys, body, needles):
    monkeypatch.chdir(tmp_path)
    s = schema(tmp_path, body)
    assert_user_error(kunlun(["data", "info", "--dataset", s], monkeypatch, capsys), *needles)
    # training stops before any data is read, let alone a model trained
    from kunlun.data import tabular

    monkeypatch.setattr(tabular, "read_table", lambda *a, **k: pytest.fail("data was read before the schema was checked"))
    assert_user_error(kunlun(["train", "--dataset", s, "--run-dir", tmp_path / "run", *TINY], monkeypatch, capsys), *needles)
    assert not (tmp_path / "run").exists()


def test_schema_file_that_is_not_utf8(tmp_path, monkeypatch, capsys):
    s = write(tmp_path / "s.yaml", b"label: caf\xe9\n")
    assert_user_error(kunlun(["data", "info", "--dataset", s], monkeypatch, capsys), "s.yaml", "not valid UTF-8")


def test_vocabulary_names_that_are_not_file_names_round_trip_through_the_cache(tmp_path):
    from kunlun.data.registry import prepare_dataset

    s = schema(tmp_path, "label: y\ncategorical: {u: 'users/all ü'}\n")
    first = prepare_dataset(str(s))
    again = prepare_dataset(str(s))  # from the cache
    assert list(again.vocabs) == ["users/all ü"] and again.fingerprint() == first.fingerprint()
    assert not (tmp_path / "users").exists()


# ------------------------------------------------------------------------------------------------ config overrides


@pytest.mark.parametrize("text", ["3e-4", "1e6", "1E-3", ".5", "2.5e+2"])
def test_float_keys_accept_any_float_syntax(text):
    from kunlun.config import load_config

    assert load_config(None, [f"train.lr={text}"]).train.lr == float(text)


@pytest.mark.parametrize("text,needle", [("fast", "expected a number"), ("nan", "expected a finite number"), (".inf", "expected a finite number"),
                                         ("true", "expected a number")])
def test_float_keys_reject_what_is_not_a_finite_number(text, needle):
    from kunlun.config import load_config

    with pytest.raises(KunlunError, match=f"train.lr: {needle}"):
        load_config(None, [f"train.lr={text}"])


def test_the_help_example_override_trains(tmp_path, monkeypatch, capsys):
    # `kunlun train --help` shows train.lr=3e-4: it must be accepted
    monkeypatch.chdir(tmp_path)
    s = schema(tmp_path, "label: y\ncategorical: [u]\n", "y,u\n" + "".join(f"{i % 2},{i % 3}\n" for i in range(20)))
    code, out, err = kunlun(["train", "--dataset", s, "--run-dir", tmp_path / "run", "--quiet", "--json", *TINY, "train.lr=3e-4"],
                            monkeypatch, capsys)
    assert code == 0, err
    assert "valid" in json.loads(out)


# ------------------------------------------------------------------------------------------------ run directories and --out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run on a small schema dataset, and a file to score."""
    from kunlun.config import load_config
    from kunlun.training.runner import train_run

    d = tmp_path_factory.mktemp("errs")
    rows = "".join(f"{i % 2},u{i % 7},{i % 5}\n" for i in range(60))
    s = schema(d, "label: y\ncategorical: [u]\nnumeric: [p]\n", "y,u,p\n" + rows)
    train_run(load_config(None, TINY, dataset=str(s)), d / "run", progress=False, logger=lambda m: None)
    return d / "run", write(d / "score.csv", "y,u,p\n" + rows)


@pytest.mark.parametrize("damage", ["truncated encoder.json", "encoder.json of another shape", "a vocabulary missing",
                                    "truncated weights"])
def test_a_damaged_run_directory_is_one_line_naming_the_file(run, tmp_path, monkeypatch, capsys, damage):
    import shutil

    run_dir, file = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    encoder = copy / "encoder" / "encoder.json"
    if damage == "truncated encoder.json":
        damaged = encoder
        encoder.write_text(encoder.read_text()[:50])
    elif damage == "encoder.json of another shape":
        damaged = encoder
        encoder.write_text(json.dumps({"schema": {}, "vocabs": [], "train_ctr": 0.5}))
    elif damage == "a vocabulary missing":
        damaged = copy / "encoder" / "vocab.u.npy"
        damaged.unlink()
    else:
        damaged = copy / "checkpoints" / "best" / "model.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:100])
    needle = f"{damaged}: truncated or corrupt checkpoint file" if damage == "truncated weights" else f"{damaged}: unreadable"
    for args in (["predict", copy, "--file", file, "--out", tmp_path / "p.csv"], ["eval", copy, "--file", file]):
        assert_user_error(kunlun(args, monkeypatch, capsys), needle)  # weights: checked against the manifest first
    assert not (tmp_path / "p.csv").exists()


def _out_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    folder = tmp_path / "folder"
    (folder / "keep").mkdir(parents=True)
    write(tmp_path / "afile", "mine\n")
    return {
        "a directory": (folder, [f"--out {folder}", "is a directory"]),
        "under a file": (tmp_path / "afile" / "p.csv", [str(tmp_path / "afile"), "is a file, not a folder"]),
        "the input file": (tmp_path / "score.csv", ["is the input file"]),
    }


@pytest.mark.parametrize("case", ["a directory", "under a file", "the input file"])
def test_predict_out_that_cannot_be_a_file_is_refused_before_any_work(run, tmp_path, monkeypatch, capsys, case):
    run_dir, file = run
    score = write(tmp_path / "score.csv", file.read_text())
    out, needles = _out_cases(tmp_path)[case]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    from kunlun.training import runner

    monkeypatch.setattr(runner, "load_trained", lambda *a: pytest.fail("the model was loaded before --out was checked"))
    assert_user_error(kunlun(["predict", run_dir, "--file", score, "--out", out], monkeypatch, capsys), *needles)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before  # nothing lost, nothing added


def test_predict_into_a_read_only_folder(run, tmp_path, monkeypatch, capsys):
    run_dir, file = run
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root: permissions do not apply; sysfs refuses new files even to root
            if not (sys.platform.startswith("linux") and Path("/sys/kernel").is_dir()):
                pytest.skip("no read-only folder for this user")
            ro = Path("/sys/kernel")
        out = ro / "kunlun-predictions.csv"
        assert_user_error(kunlun(["predict", run_dir, "--file", file, "--out", out], monkeypatch, capsys), f"--out {out}", "ermission denied")
        assert not out.exists() and not [p for p in ro.iterdir() if p.name.startswith(".kunlun-predictions")]
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_predict_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(run, tmp_path, monkeypatch, capsys):
    # a folder that refuses the write after the check (a full disk, a read-only mount): the temporary file
    # is removed and the previous predictions stay
    import pyarrow.csv as pacsv

    run_dir, file = run
    out = write(tmp_path / "p.csv", "old predictions\n")

    def half_written(table, path):
        Path(path).write_text('"row","probability"\n0,0.')
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pacsv, "write_csv", half_written)
    assert_user_error(kunlun(["predict", run_dir, "--file", file, "--out", out], monkeypatch, capsys),
                      f"--out {out}", "No space left on device")
    assert out.read_text() == "old predictions\n" and temp_files(tmp_path) == []


def test_predict_into_a_new_folder_works(run, tmp_path, monkeypatch, capsys):
    run_dir, file = run
    out = tmp_path / "new" / "deeper" / "p.csv"
    code, _, err = kunlun(["predict", run_dir, "--file", file, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 61 and temp_files(tmp_path) == []


# ------------------------------------------------------------------------------------------------ the top-level handler


def test_handler_turns_file_system_errors_into_one_line_and_lets_bugs_raise(tmp_path, monkeypatch, capsys):
    from kunlun.data import registry

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/clicks.csv")

    monkeypatch.setattr(registry, "prepare_dataset", denied)
    assert_user_error(kunlun(["data", "info"], monkeypatch, capsys), "/data/clicks.csv: Permission denied")

    def bug(*a, **k):
        raise RuntimeError("a bug in kunlun")

    monkeypatch.setattr(registry, "prepare_dataset", bug)
    with pytest.raises(RuntimeError, match="a bug in kunlun"):  # a traceback, not a one-line "user error"
        kunlun(["data", "info"], monkeypatch, capsys)

    def multi_line(*a, **k):
        raise KunlunError("first\nsecond")

    monkeypatch.setattr(registry, "prepare_dataset", multi_line)
    assert assert_user_error(kunlun(["data", "info"], monkeypatch, capsys)) == "kunlun: error: first second"


def test_user_error_classifies_exceptions():
    import yaml

    from kunlun.cli import user_error

    assert user_error(FileNotFoundError(errno.ENOENT, "x", "a.csv")) == "a.csv: No such file or directory"
    assert "not valid utf-8 text" in user_error(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert "not valid YAML" in user_error(yaml.YAMLError("oops"))
    assert user_error(ValueError("bug")) is None and user_error(KeyError("k")) is None
