"""Scoring a file (``kunlun eval --file``, ``kunlun predict``): a row's history is its user's events before it in the
run's data set merged with the file's own earlier rows, so the test split written as a file scores as the test split;
rows without labels are predicted, and refused by eval with one line naming the missing column. A run keeps the files
besides the events that scoring reads (``encoder/side``), so it scores files after its data set's folder is moved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import LEARNS, SHARED_DATA, TINY_MODEL, needs_shared, run_cli, schema_dataset
from kunlun.config import load_config
from kunlun.data import registry
from kunlun.data.registry import DATASETS, DATASETS_DOCS, EMBEDDED, keep_side_files, load_raw, prepare_dataset
from kunlun.errors import KunlunError
from kunlun.serving.export import export_package, load_scorer
from kunlun.training.runner import evaluate_file, predict_file, train_run

ROOT = Path(__file__).resolve().parents[1]
RATINGS = EMBEDDED / "ml-latest-small" / "ratings.csv"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny Kunlun trained on the embedded ml-latest-small (seconds), with a cache of its own."""
    tmp = tmp_path_factory.mktemp("scoring")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUNLUN_CACHE", str(tmp / "cache"))
        cfg = load_config(None, [*TINY_MODEL, *LEARNS, "train.max_steps=30", "train.epochs=1", "train.threads=1"])
        train_run(cfg, tmp / "run", progress=False, logger=lambda m: None)
    return tmp / "run"


def ratings_file(path: Path, rows: list[int], columns: tuple[int, ...] = (0, 1, 2, 3), extra: tuple[str, ...] = ()) -> Path:
    """``path``: ratings.csv's header and data rows ``rows`` (0-based, in that order), keeping ``columns``; then ``extra``."""
    lines = RATINGS.read_text().splitlines()
    pick = lambda line: ",".join(line.split(",")[c] for c in columns)  # noqa: E731
    path.write_text("\n".join([pick(lines[0]), *(pick(lines[1 + r]) for r in rows), *extra]) + "\n")
    return path


cli = run_cli


def test_the_test_split_written_as_a_file_scores_as_the_test_split(run, tmp_path):
    test_rows = load_raw("ml-latest-small", None).splits["test"].row
    # in reverse file order: the file's order changes nothing
    file = ratings_file(tmp_path / "test.csv", sorted(test_rows.tolist(), reverse=True))
    notes: list[str] = []
    scored = evaluate_file(run, file, logger=notes.append)
    want = json.loads((run / "final.json").read_text())["metrics"]["test"]
    assert scored["examples"] == want["examples"] == len(test_rows) and notes == []
    for k in ("ne", "logloss", "auc", "gauc", "calibration"):
        assert scored[k] == pytest.approx(want[k], abs=1e-6), k


def test_a_file_without_ratings_is_predicted_and_refused_by_eval(run, tmp_path, monkeypatch, capsys):
    rows = list(range(1000, 1200))
    rated = ratings_file(tmp_path / "rated.csv", rows)
    unrated = ratings_file(tmp_path / "unrated.csv", rows, columns=(0, 1, 3))  # userId, movieId, timestamp
    code, _, err = cli(["predict", run, "--file", unrated, "--out", tmp_path / "u.csv"], monkeypatch, capsys)
    assert code == 0, err
    predict_file(run, rated, tmp_path / "r.csv")
    u, r = (tmp_path / "u.csv").read_text().splitlines(), (tmp_path / "r.csv").read_text().splitlines()
    assert u[0] == '"row","probability"' and r[0] == '"row","probability","label"' and len(u) == len(r) == 201
    # the rows are the data set's own ratings: the same histories, so the same probabilities, with or without ratings
    assert [line.split(",")[:2] for line in u[1:]] == [line.split(",")[:2] for line in r[1:]]
    code, _, err = cli(["eval", run, "--file", unrated], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"kunlun: error: {unrated}: missing column 'rating'") and "kunlun predict" in lines[0]


def test_file_alone_histories_are_the_files_own_rows(run, tmp_path, monkeypatch, capsys):
    """--file-alone: a row's history is the file's own earlier rows only, as when the data set's events are not found
    (a --data-dir holding the side files alone) and unlike the default, which adds the data set's events."""
    test_rows = sorted(load_raw("ml-latest-small", None).splits["test"].row.tolist())[:800]
    file = ratings_file(tmp_path / "part.csv", test_rows)
    side = tmp_path / "side" / "ml-latest-small"
    side.mkdir(parents=True)
    shutil.copy(EMBEDDED / "ml-latest-small" / "movies.csv", side)
    code, _, err = cli(["predict", run, "--file", file, "--out", tmp_path / "alone.csv", "--file-alone"], monkeypatch, capsys)
    assert code == 0 and "not found" not in err, err
    notes: list[str] = []
    predict_file(run, file, tmp_path / "side.csv", data_dir=str(tmp_path / "side"), logger=notes.append)
    predict_file(run, file, tmp_path / "both.csv")
    alone, side_only, both = ((tmp_path / f).read_text() for f in ("alone.csv", "side.csv", "both.csv"))
    assert alone == side_only and alone != both and "not found" in notes[0]
    assert evaluate_file(run, file, file_alone=True) == evaluate_file(run, file, data_dir=str(tmp_path / "side"), logger=notes.append)


def test_a_file_rows_history_is_the_data_sets_earlier_events_and_the_files_own(tmp_path):
    lines = RATINGS.read_text().splitlines()[1:]
    user1 = [(i, line.split(",")) for i, line in enumerate(lines) if line.startswith("1,")]
    times = sorted({int(f[3]) for _, f in user1})
    t = times[len(times) // 2]  # a second in the middle of user 1's timeline
    before = sum(int(f[3]) < t for _, f in user1)
    data_row = next(i for i, f in user1 if int(f[3]) < t)
    # a new rating at t, one of its data ratings again (the same event), a candidate without a rating, all then seen
    # from t + 10; and a user the data set has never seen
    file = tmp_path / "f.csv"
    file.write_text("userId,movieId,rating,timestamp\n"
                    f"1,999001,5.0,{t}\n{lines[data_row]}\n1,999002,,{t + 5}\n1,999003,4.0,{t + 10}\n99999,1,4.0,{t}\n")
    with pytest.raises(KunlunError, match="column 'rating' has a missing or NaN value at data row 3"):
        load_raw("ml-latest-small", None, file=file, labels=False)  # an empty rating is an error, not "no rating"
    file.write_text(file.read_text().replace(f"1,999002,,{t + 5}\n", ""))
    raw = load_raw("ml-latest-small", None, file=file)
    split, events = raw.splits["file"], raw.events["history"]
    history = [events["item"][s:e].tolist() for s, e in zip(split.seq_start["history"], split.seq_end["history"])]
    times_of = [events["time"][s:e] for s, e in zip(split.seq_start["history"], split.seq_end["history"])]
    assert len(history[0]) == before and (times_of[0] < t).all()  # the data set's events strictly before t
    assert history[1] == history[0][: len(history[1])]  # the data rating's own history: the data's, before it
    # t + 10 sees the data set's events before it and the file's new rating at t, and the repeated data rating once
    assert len(history[2]) == sum(int(f[3]) < t + 10 for _, f in user1) + 1 and history[2].count(999001) == 1
    assert history[2].count(int(lines[data_row].split(",")[1])) == 1
    assert history[3] == [] and split.columns["log_history"][3] == 0  # a user without events
    assert raw.note == ""
    # candidates without ratings are scored from the events before them, and are not events of any history
    unrated = tmp_path / "u.csv"
    unrated.write_text(f"userId,movieId,timestamp\n1,999001,{t}\n1,999003,{t + 10}\n")
    raw = load_raw("ml-latest-small", None, file=unrated, labels=False)
    ends = raw.splits["file"].seq_end["history"] - raw.splits["file"].seq_start["history"]
    assert not raw.has_labels and ends.tolist() == [before, sum(int(f[3]) < t + 10 for _, f in user1)]
    assert 999001 not in raw.events["history"]["item"].tolist()


def test_without_the_data_set_a_file_is_its_own_history_and_the_command_says_so(run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data" / "ml-latest-small"  # the movies, not the ratings
    folder.mkdir(parents=True)
    (folder / "movies.csv").write_bytes((EMBEDDED / "ml-latest-small" / "movies.csv").read_bytes())
    file = ratings_file(tmp_path / "f.csv", list(range(0, 300)))
    raw = load_raw("ml-latest-small", tmp_path / "data", file=file)
    split = raw.splits["file"]
    assert len(raw.events["history"]["item"]) == 300  # the file's rows are the only events
    assert (split.seq_end["history"] - split.seq_start["history"] < 300).all()
    assert raw.note.startswith(f"{folder / 'ratings.csv'}: not found") and "\n" not in raw.note
    code, _, err = cli(["eval", run, "--file", file, "--data-dir", tmp_path / "data"], monkeypatch, capsys)
    assert code == 0, err
    assert err.count("not found, so each row's history is only the file's own earlier rows") == 1


def test_files_without_labels_of_the_other_timeline_data_sets(tmp_path):
    """UserBehavior (no behaviour field) and KuaiRand (no is_click, is_like): predicted, not evaluated; histories from
    the data set."""
    ub = tmp_path / "taobao-userbehavior"
    ub.mkdir()
    (ub / "UserBehavior.csv").write_text("1,10,7,pv,100\n1,11,7,cart,200\n1,12,7,pv,300\n1,13,7,buy,400\n1,14,7,pv,500\n"
                                         "1,15,7,pv,600\n1,16,7,pv,700\n1,17,7,fav,800\n1,18,7,pv,900\n1,19,7,pv,1000\n")
    (tmp_path / "ub.csv").write_text("1,20,7,650\n2,21,8,650\n")
    raw = load_raw("taobao-userbehavior", tmp_path, file=tmp_path / "ub.csv", labels=False)
    split = raw.splits["file"]
    assert not raw.has_labels and (split.seq_end["history"] - split.seq_start["history"]).tolist() == [6, 0]
    with pytest.raises(KunlunError, match=r"ub.csv: missing the behaviour field .*`kunlun eval` needs it"):
        load_raw("taobao-userbehavior", tmp_path, file=tmp_path / "ub.csv")
    kr = tmp_path / "kuairand-pure"
    kr.mkdir()
    head = "user_id,video_id,time_ms,is_click,is_like,tab"  # the columns the adapter reads, of the logs' 19
    rows = [f"1,{v},{1649400000000 + 1000 * v},{v % 2},0,1" for v in range(6)]
    (kr / "log_standard_4_08_to_4_21_pure.csv").write_text("\n".join([head, *rows[:3]]) + "\n")
    (kr / "log_standard_4_22_to_5_08_pure.csv").write_text("\n".join([head, *rows[3:]]) + "\n")
    (tmp_path / "kr.csv").write_text(f"user_id,video_id,time_ms,tab\n1,99,{1649400000000 + 5500},1\n")
    raw = load_raw("kuairand-pure", tmp_path, file=tmp_path / "kr.csv", labels=False)
    split = raw.splits["file"]
    assert not raw.has_labels and (split.seq_end["history"] - split.seq_start["history"]).tolist() == [5]
    with pytest.raises(KunlunError, match=r"kr.csv: missing column 'is_click'"):
        load_raw("kuairand-pure", tmp_path, file=tmp_path / "kr.csv")


def test_a_missing_data_set_names_where_its_download_commands_are(tmp_path):
    with pytest.raises(KunlunError) as e:
        prepare_dataset("ml-100k", tmp_path)
    assert "pass --data-dir" in str(e.value) and DATASETS_DOCS in str(e.value) and "\n" not in str(e.value)
    page, anchor = DATASETS_DOCS.split("#")
    assert any(line.strip() == "## Downloading" for line in (ROOT / page).read_text().splitlines()) and anchor == "downloading"


# a registered data set's files (where the tests take them from) and rows of a file to score: the later half of a
# few users' ratings, whose histories are their earlier ratings in the data set and their own earlier rows in the file
MOVABLE = {
    "ml-100k": (SHARED_DATA / "ml-100k", ("2", "3", "4"), "\t"),
    "ml-latest-small": (EMBEDDED / "ml-latest-small", ("2", "3", "5"), ","),
}


@pytest.mark.parametrize("dataset", [pytest.param("ml-100k", marks=needs_shared), "ml-latest-small"])
def test_a_movielens_run_scores_files_after_its_dataset_folder_is_moved(dataset, tmp_path, monkeypatch, capsys):
    """The run keeps u.item / u.user (movies.csv) in encoder/side: after the data set's folder is moved, eval --file,
    predict, export and serving read the run alone; the histories are the file's own rows, as with a data folder that
    holds the side files only, and one line says so. A run without the copy (trained before runs kept one) needs the
    folder, as before."""
    source, users, sep = MOVABLE[dataset]
    monkeypatch.setenv("KUNLUN_CACHE", str(tmp_path / "cache"))
    data, side_only = tmp_path / "data" / dataset, tmp_path / "side-only" / dataset
    for folder, names in ((data, DATASETS[dataset].files), (side_only, DATASETS[dataset].scoring_needs)):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes((source / name).read_bytes())
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY_MODEL, *LEARNS, f"data.dataset={dataset}", f"data.data_dir={tmp_path / 'data'}",
                             "train.max_steps=5", "train.epochs=1", "train.threads=1"])
    train_run(cfg, run, progress=False, logger=lambda m: None)
    assert sorted(f.name for f in (run / "encoder" / "side").iterdir()) == sorted(DATASETS[dataset].scoring_needs)
    events = next(f for f in DATASETS[dataset].files if f not in DATASETS[dataset].scoring_needs)
    lines = (data / events).read_text().splitlines()
    head = [lines[0]] if sep == "," else []
    file = tmp_path / "rows.txt"
    rows = [line.split(sep) for line in lines[len(head):] if line.split(sep)[0] in users]
    # each user's ratings after their first 10
    later = [sep.join(r) for r in rows if sum(o[0] == r[0] and int(o[3]) < int(r[3]) for o in rows) >= 10]
    file.write_text("\n".join([*head, *later]) + "\n")
    # the references: the data set present (histories from its events too), and its side files alone (the file's rows)
    with_events = evaluate_file(run, file)
    alone = evaluate_file(run, file, data_dir=str(tmp_path / "side-only"))
    assert alone["examples"] == len(file.read_text().splitlines()) - len(head) > 50
    assert alone["logloss"] != with_events["logloss"]  # the rows' histories count: the two are told apart
    predict_file(run, file, tmp_path / "alone.csv", data_dir=str(tmp_path / "side-only"))

    data.rename(tmp_path / "moved")
    note = f"{data / events}: not found, so each row's history is only the file's own earlier rows; " \
           f"{', '.join(DATASETS[dataset].scoring_needs)} read from the run's copy in {run / 'encoder' / 'side'}"
    code, out, err = cli(["eval", run, "--file", file, "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out) == alone, err
    assert err.count(note) == 1 and "Traceback" not in err, err
    code, _, err = cli(["predict", run, "--file", file, "--out", tmp_path / "moved.csv"], monkeypatch, capsys)
    assert code == 0 and err.count(note) == 1, err
    assert (tmp_path / "moved.csv").read_text() == (tmp_path / "alone.csv").read_text()
    # serving the run directory and exporting it read nothing of the folder (GET /schema's example is then built)
    scorer = load_scorer(run, "eager")
    assert len(scorer.score_payload(scorer.request_schema["example"])) == 1
    export_package(run, tmp_path / "m.pt2", compile="none", logger=lambda m: None)
    assert (tmp_path / "m.pt2").is_file()

    # a run recorded before runs kept the copy: the folder is needed, and the error says where it was looked for
    shutil.rmtree(run / "encoder" / "side")
    code, _, err = cli(["predict", run, "--file", file, "--out", tmp_path / "old.csv"], monkeypatch, capsys)
    assert code == 2 and f"dataset {dataset!r} not found" in err and len(err.strip().splitlines()) == 1, err


def test_a_large_side_file_is_not_copied_and_the_run_log_says_scoring_needs_the_data_set(tmp_path, monkeypatch):
    (tmp_path / "ml-latest-small").mkdir()
    for name in DATASETS["ml-latest-small"].files:
        (tmp_path / "ml-latest-small" / name).write_bytes((EMBEDDED / "ml-latest-small" / name).read_bytes())
    lines: list[str] = []
    assert keep_side_files("ml-latest-small", tmp_path, tmp_path / "kept", lines.append) == ["movies.csv"]
    assert (tmp_path / "kept" / "movies.csv").read_bytes() == (EMBEDDED / "ml-latest-small" / "movies.csv").read_bytes()
    assert lines == []
    monkeypatch.setattr(registry, "SIDE_COPY_MAX_BYTES", 100_000)  # movies.csv: 494 KB
    assert keep_side_files("ml-latest-small", tmp_path, tmp_path / "large", lines.append) == []
    assert not (tmp_path / "large").exists()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'ml-latest-small' / 'movies.csv'}: larger than 0 MB")
    assert "scoring a file with this run needs the data set's folder" in lines[0]
    # a schema file (the run copies the schema itself) and data sets whose files scoring does not read keep nothing
    assert keep_side_files("criteo", tmp_path, tmp_path / "none", lines.append) == [] and not (tmp_path / "none").exists()


@needs_shared
def test_data_sets_whose_rows_carry_their_features_score_files_without_their_folder(tmp_path):
    """Criteo and Frappe read nothing of their folder to score a file: a run scores after the folder is gone."""
    criteo = tmp_path / "criteo.txt"
    criteo.write_text("\n".join((SHARED_DATA / "samples" / "criteo_sample.txt").read_text().splitlines()[:6]) + "\n")
    frappe = tmp_path / "frappe.csv"
    frappe.write_text("\n".join((SHARED_DATA / "frappe_x1" / "valid.csv").read_text().splitlines()[:6]) + "\n")
    for dataset, file in (("criteo", criteo), ("frappe_x1", frappe)):
        raw = load_raw(dataset, tmp_path / "gone", file=file)
        assert len(raw.splits["file"]) == 5 and raw.note == "", dataset


def test_a_run_of_a_schema_dataset_scores_files_after_its_dataset_folder_is_moved(tmp_path, monkeypatch, capsys):
    """The run keeps a copy of its schema file (encoder/schema.yaml): eval --file, predict and export read the run
    alone, and score as before the move."""
    monkeypatch.chdir(tmp_path)

    def kunlun(*args, expect=0):
        code, out, err = cli(args, monkeypatch, capsys)
        assert code == expect, err[-2000:]
        return SimpleNamespace(stdout=out, stderr=err)

    schema = schema_dataset(tmp_path / "data")
    test, run = tmp_path / "test.csv", tmp_path / "run"
    kunlun("train", "--dataset", schema, "--run-dir", run, "--json", "--quiet", *TINY_MODEL, *LEARNS,
           "train.max_steps=5", "train.epochs=1")
    before = json.loads(kunlun("eval", run, "--file", test, "--json").stdout)
    kunlun("predict", run, "--file", test, "--out", tmp_path / "before.csv")
    (tmp_path / "data").rename(tmp_path / "moved")
    assert not schema.exists()
    after = json.loads(kunlun("eval", run, "--file", test, "--json").stdout)
    assert after == before and after["examples"] == 600
    kunlun("predict", run / "checkpoints" / "best", "--file", test, "--out", tmp_path / "after.csv")
    assert (tmp_path / "after.csv").read_text() == (tmp_path / "before.csv").read_text()
    kunlun("export", run, "--out", tmp_path / "m.pt2", "--compile", "none")
    assert (tmp_path / "m.pt2").is_file()
    # scoring the dataset's own splits needs the dataset: one line naming the missing schema file
    r = kunlun("eval", run, expect=2)
    assert "schema file not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a run recorded before runs kept a copy reads the schema file where it was at training time
    (tmp_path / "moved").rename(tmp_path / "data")
    (run / "encoder" / "schema.yaml").unlink()
    assert json.loads(kunlun("eval", run, "--file", test, "--json").stdout) == before
