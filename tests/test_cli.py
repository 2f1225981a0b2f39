"""The CLI as a user runs it: subprocesses, exit codes, stdout JSON, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import LEARNS, SHARED_DATA, TINY_MODEL, needs_shared

TINY = TINY_MODEL + LEARNS + ["train.max_steps=30", "train.epochs=1"]
# this run's model scores test NE 0.9946 untrained and 0.9464 after its 30 steps (seed 0; conftest.LEARNS has the
# other seeds): a CLI that trains nothing, or scores another model, lands above the bound
TRAINED_NE_BOUND = 0.975


def kunlun(*args, cwd, expect=0):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "kunlun", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == expect, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    r = kunlun("train", "--run-dir", d / "run", "--json", "--quiet", *TINY, cwd=d)
    return d, json.loads(r.stdout)


def test_train_json_is_metrics_by_split(trained_run):
    d, out = trained_run
    assert set(out) == {"valid", "test"}
    assert {"ne", "logloss", "auc", "gauc", "calibration"} <= set(out["test"])
    assert 0.5 < out["test"]["ne"] < TRAINED_NE_BOUND


def test_eval_reproduces_training_metrics_and_scores_files(trained_run, tmp_path):
    d, out = trained_run
    r = kunlun("eval", d / "run", "--json", cwd=d)
    assert json.loads(r.stdout)["test"] == pytest.approx(out["test"])
    # a file of the same schema (a ratings file; histories come from the file itself)
    from kunlun.data.registry import EMBEDDED

    src = EMBEDDED / "ml-latest-small"
    lines = (src / "ratings.csv").read_text().splitlines()
    (tmp_path / "movies.csv").write_text((src / "movies.csv").read_text())
    (tmp_path / "ratings.csv").write_text("\n".join(lines[:3001]) + "\n")
    m = json.loads(kunlun("eval", d / "run" / "checkpoints" / "best", "--file", tmp_path / "ratings.csv", "--json", cwd=d).stdout)
    assert m["examples"] == 3000 and 0 < m["auc"] < 1


def test_predict_writes_probabilities_in_file_order(trained_run, tmp_path):
    d, _ = trained_run
    from kunlun.data.registry import EMBEDDED

    src = EMBEDDED / "ml-latest-small"
    lines = (src / "ratings.csv").read_text().splitlines()
    (tmp_path / "movies.csv").write_text((src / "movies.csv").read_text())
    (tmp_path / "ratings.csv").write_text("\n".join([lines[0]] + lines[1:501][::-1]) + "\n")  # not in time order
    kunlun("predict", d / "run", "--file", tmp_path / "ratings.csv", "--out", tmp_path / "p.csv", cwd=d)
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == '"row","probability","label"' and len(rows) == 501
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(500))
    ratings = [float(line.split(",")[2]) for line in lines[1:501][::-1]]
    assert [float(r.split(",")[2]) for r in rows[1:]] == [1.0 if x >= 4 else 0.0 for x in ratings]


def test_runs_table_and_data_info(trained_run):
    d, out = trained_run
    runs = json.loads(kunlun("runs", "--root", d, "--json", cwd=d).stdout)["runs"]
    assert runs[0]["status"] == "complete" and runs[0]["metrics"]["test"]["ne"] == pytest.approx(out["test"]["ne"])
    assert "complete" in kunlun("runs", "--root", d, cwd=d).stdout
    info = json.loads(kunlun("data", "info", "--json", cwd=d).stdout)
    assert info["splits"]["train"]["rows"] == 80896 and "history" in info["sequences"]


@needs_shared
def test_frappe_train_and_eval_of_a_held_out_file(tmp_path):
    lines = (SHARED_DATA / "frappe_x1" / "valid.csv").read_text().splitlines()
    (tmp_path / "test.csv").write_text("\n".join(lines[:2001]) + "\n")
    out = json.loads(kunlun("train", "--dataset", "frappe_x1", "--data-dir", SHARED_DATA, "--run-dir", tmp_path / "run",
                            "--json", "--quiet", *TINY, cwd=tmp_path).stdout)
    assert set(out) == {"valid"}  # Frappe_x1's test split is held out
    # this model scores valid NE 1.137 untrained and 0.776 after its 30 steps (seeds 1, 2: 1.059 → 0.655, 1.233 → 0.690)
    assert out["valid"]["ne"] < 0.9
    m = json.loads(kunlun("eval", tmp_path / "run", "--file", tmp_path / "test.csv", "--json", cwd=tmp_path).stdout)
    assert m["examples"] == 2000
    # eval's numbers agree with an independent computation over predict's output for the same file
    from sklearn.metrics import log_loss, roc_auc_score

    kunlun("predict", tmp_path / "run", "--file", tmp_path / "test.csv", "--out", tmp_path / "t.csv", cwd=tmp_path)
    pred = [r.split(",") for r in (tmp_path / "t.csv").read_text().splitlines()[1:]]
    y, p = [float(r[2]) for r in pred], [float(r[1]) for r in pred]
    assert y == [float(line.split(",")[0]) for line in lines[1:2001]]
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert m["logloss"] == pytest.approx(log_loss(y, p), abs=1e-6)
    # prediction needs no label column
    (tmp_path / "unlabelled.csv").write_text("\n".join(",".join(line.split(",")[1:]) for line in lines[:101]) + "\n")
    kunlun("predict", tmp_path / "run", "--file", tmp_path / "unlabelled.csv", "--out", tmp_path / "p.csv", cwd=tmp_path)
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == '"row","probability"' and len(rows) == 101
    assert all(0 < float(r.split(",")[1]) < 1 for r in rows[1:])
    # …but evaluation does
    r = kunlun("eval", tmp_path / "run", "--file", tmp_path / "unlabelled.csv", cwd=tmp_path, expect=2)
    assert "missing column 'label'" in r.stderr
    # a file whose columns differ from the training schema
    (tmp_path / "other.csv").write_text("label,user,item\n1,2,3\n")
    r = kunlun("eval", tmp_path / "run", "--file", tmp_path / "other.csv", cwd=tmp_path, expect=2)
    assert "missing column 'daytime'" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["train", "--dataset", "ml-100k", "--data-dir", "/no/such"], "/no/such: data directory not found"),
        (["train", "model.num_heads=5"], "model.num_heads: 5 heads do not divide"),
        (["train", "--dataset", "ml-100k", "--data-dir", "/no/such", "model.nope=1"], "config key model.nope is not known"),
        (["train", "--model", "bogus"], "unknown model 'bogus'"),
        (["train", "model.d_model"], "expected KEY=VALUE"),
        (["eval", "/no/run"], "/no/run: run or checkpoint not found"),
        (["train", "--config", "/no/cfg.yaml"], "/no/cfg.yaml: config file not found"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_leave_nothing(tmp_path, args, needle):
    r = kunlun(*args, cwd=tmp_path, expect=2)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_eval_of_a_bf16_run_reproduces_its_own_metrics(tmp_path):
    out = json.loads(kunlun("train", "--run-dir", tmp_path / "run", "--json", "--quiet", *TINY, "train.bf16=true", cwd=tmp_path).stdout)
    again = json.loads(kunlun("eval", tmp_path / "run", "--json", cwd=tmp_path).stdout)
    assert again == out  # bit for bit: scored under the same bf16 autocast as at the end of training


def test_a_config_error_is_named_before_torch_is_imported(tmp_path):
    """A mistyped key is named in well under a second: `kunlun train` loads and checks its config before anything
    imports torch (which alone takes seconds)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "kunlun", "train", "model.nope=1"], cwd=tmp_path,
                       capture_output=True, text=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    message = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert r.returncode == 2 and len(message) == 1 and "config key model.nope is not known" in message[0], message
    assert "kunlun.config" in imported and "torch" not in imported


def test_log_lines_are_not_wrapped_when_stderr_is_not_a_terminal(capsys):
    from kunlun.console import log

    line = "train: " + ", ".join(f"{i}.02 MFLOPs/example" for i in range(20))  # far wider than 80 columns
    log(line)
    assert capsys.readouterr().err == line + "\n"


def test_runs_are_listed_by_start_time_and_a_run_in_progress_shows_its_config(tmp_path):
    """Newest first by when each run started (environment.json; config.yaml's time where that is missing), not by
    directory name; a run without final.json names its model, dataset and seed from its config, and says whether a
    process is training it now."""
    import yaml

    from kunlun.processes import lock_run_dir

    def record(name, model, started=None, final=False, mtime=None):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "ml-100k"}, "train": {"seed": 3}, "model": {"name": model}}))
        if started:
            (d / "environment.json").write_text(json.dumps({"started": started}))
        if final:
            (d / "final.json").write_text(json.dumps({"model": model, "dataset": "ml-100k", "seed": 3, "metrics": {}}))
        if mtime:
            os.utime(d / "config.yaml", (mtime, mtime))
        return d

    record("a-oldest", "dnn", "2026-01-01T10:00:00+0000", final=True)
    record("b-newer", "dcnv2", "2026-03-01T10:00:00+0000", final=True)
    record("c-middle", "din", "2026-02-01T10:00:00+0100")
    running = record("0-newest", "kunlun", mtime=1775044800)  # 2026-04-01, no environment.json yet
    with lock_run_dir(running):
        rows = json.loads(kunlun("runs", "--root", tmp_path / "runs", "--json", cwd=tmp_path).stdout)["runs"]
        table = kunlun("runs", "--root", tmp_path / "runs", cwd=tmp_path).stdout
    assert [r["run"] for r in rows] == ["0-newest", "b-newer", "c-middle", "a-oldest"]
    assert [r["status"] for r in rows] == ["running", "complete", "incomplete", "complete"]
    assert (rows[0]["model"], rows[0]["dataset"], rows[0]["seed"]) == ("kunlun", "ml-100k", 3)
    assert rows[2]["model"] == "din"
    line = next(line for line in table.splitlines() if "0-newest" in line)
    assert "running" in line and "kunlun" in line and "ml-100k" in line


def test_runs_compares_chosen_runs_side_by_side(tmp_path):
    """`kunlun runs A B …`: a column per run with the config keys that differ between them (not those that are the same,
    nor where the data were), valid/test metrics, FLOPs, wall time and each run's code version; a run is named by its
    directory or by its name under --root, and a name that is neither is one line, exit 2."""
    import yaml

    from kunlun.config import load_config

    root = tmp_path / "runs"

    def record(name, overrides, ne=None, commit="abcdef1234567890", dirty=False):
        d = root / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump(load_config(None, TINY_MODEL + overrides).to_dict(), sort_keys=False))
        code = {"commit": commit, "dirty": dirty, "source_sha256": "0123456789abcdef" * 4}
        (d / "environment.json").write_text(json.dumps({"started": "2026-01-01T10:00:00+0000", "code": code}))
        if ne is not None:
            m = {"ne": ne, "logloss": 0.5, "auc": 0.75, "gauc": 0.7, "calibration": 1.01, "examples": 100}
            (d / "final.json").write_text(json.dumps({
                "model": "kunlun", "dataset": "ml-latest-small", "seed": 0, "metrics": {"valid": {**m, "ne": ne + 0.01}, "test": m},
                "code_versions": [code], "flops_per_example": 2.5e6, "executed_flops_per_example": 2.5e6,
                "useful_flops_per_example": 1.25e6, "train_compute": 3.0e12, "parameters": {"total": 12345}, "steps": 30,
                "best_epoch": 1, "epochs_run": 1, "wall_time_s": 12.34, "train_examples_per_s": 4567.0}))
        return d

    a = record("a", [], ne=0.95)
    record("b", ["model.d_model=32", "data.data_dir=/elsewhere"], ne=0.94, commit="fedcba9876543210", dirty=True)
    record("c", ["train.lr=0.01"])  # not finished: no final.json
    table = kunlun("runs", a, "b", "--root", root, cwd=tmp_path).stdout
    cells = [[c.strip() for c in line.strip().strip("│").split("│")] for line in table.splitlines() if line.strip().startswith("│")]
    rows = {r[0]: r[1:] for r in cells}
    assert "2 runs of kunlun on ml-latest-small" in table
    assert rows["model.d_model"] == ["16", "32"]
    assert not any(k in table for k in ("train.lr", "data.data_dir", "data.max_seq_len", "model.num_heads"))
    assert rows["test NE"] == ["0.9500", "0.9400"] and rows["valid NE"] == ["0.9600", "0.9500"]
    assert rows["MFLOPs/example (executed)"] == ["2.50", "2.50"] and rows["MFLOPs/example (useful)"] == ["1.25", "1.25"]
    assert rows["wall time (s)"] == ["12.3", "12.3"] and rows["status"] == ["complete", "complete"]
    assert rows["code"] == ["abcdef1234 (src 01234567)", "fedcba9876+dirty (src 01234567)"]

    out = json.loads(kunlun("runs", "a", "b", "c", "--root", root, "--json", cwd=tmp_path).stdout)
    assert out["differences"] == {"model.d_model": [16, 32, 16], "train.lr": [0.002, 0.002, 0.01]}
    assert [r["status"] for r in out["runs"]] == ["complete", "complete", "incomplete"]
    assert out["runs"][1]["metrics"]["test"]["ne"] == 0.94 and out["runs"][2]["metrics"] == {}
    assert out["runs"][2]["code"] == ["abcdef1234 (src 01234567)"]  # from environment.json: the run has no final.json yet

    r = kunlun("runs", "a", "nope", "--root", root, cwd=tmp_path, expect=2)
    assert "nope: not a run directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1
