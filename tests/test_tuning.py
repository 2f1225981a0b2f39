"""`kunlun tune`: Optuna studies in SQLite over a model's search space, scored on validation NE only, resumable, whose
best trial is a config `kunlun train --config` takes; and its one-line message without Optuna."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import TINY_MODEL
from kunlun.config import Config, load_config
from kunlun.data.registry import prepare_dataset
from kunlun.errors import KunlunError
from kunlun.training.trainer import Trainer

# a study of a tiny Kunlun: two searched keys, trials of 8 steps of 512 (4096 examples), validated twice
SPACE = {
    "budget": {"trials": 2, "examples": 4096, "validations": 2},
    "common": {"train.lr": {"low": "1e-3", "high": 1.0e-2, "log": True}},
    "models": {"kunlun": {"model.dropout": {"low": 0.0, "high": 0.2}, "model.output_hidden": {"choices": [[32], [16, 16]]}}},
}
FIXED = [o for o in TINY_MODEL if not o.startswith("model.output_hidden")]


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def quiet(message):
    return None


def trials(study_dir):
    import optuna

    return optuna.load_study(study_name="kunlun-tune", storage=f"sqlite:///{study_dir / 'study.db'}").get_trials()


def test_tune_runs_trials_resumes_the_study_and_writes_a_best_config_that_trains(tmp_path, space, monkeypatch):
    """Two drawn trials and the packaged configuration's, then a second call asked for three adds one drawn trial to the
    same SQLite study (the first trials kept, not redrawn; the packaged one not run again). Every trial is scored on
    validation only (its run record has no test metrics), with the budget's steps and validations; best.yaml is the best
    trial's exact config: loaded by the config loader and trained again, it gives the trial's best validation NE, bit
    for bit. Another study with the same seed draws the same values (TPE seeded per trial); one made with another budget
    is refused."""
    pytest.importorskip("optuna")
    from kunlun.tuning import tune

    study = tmp_path / "study"
    first = tune("kunlun", "ml-latest-small", study, space=space, overrides=FIXED, logger=quiet)
    assert first["trials"] == {"complete": 3}
    before = trials(study)
    packaged = before[2]  # after the drawn trials: nothing drawn, the model's packaged values of the searched keys
    assert packaged.user_attrs["packaged"] and packaged.params == {} and packaged.user_attrs["drawn"] == {}
    untuned = load_config(None, FIXED, model="kunlun", dataset="ml-latest-small")
    trained = packaged.user_attrs["config"]
    assert (trained["train"]["lr"], trained["model"]["dropout"]) == (untuned.train.lr, untuned.model.dropout)
    second = tune("kunlun", "ml-latest-small", study, space=space, overrides=FIXED, trials=3, logger=quiet)
    after = trials(study)
    assert second["trials"] == {"complete": 4} and [t.number for t in after] == [0, 1, 2, 3]
    assert [(t.params, t.value, t.datetime_start) for t in after[:3]] == [(t.params, t.value, t.datetime_start) for t in before]
    assert len({json.dumps(t.params, sort_keys=True) for t in after}) == 4
    for t in after:
        run = study / "trials" / f"{t.number:04d}"
        final = json.loads((run / "final.json").read_text())
        assert set(final["metrics"]) == {"valid"}  # the test split is never scored
        assert (final["steps"], final["validations"], final["train_examples"]) == (8, 2, 4096)
        nes = [json.loads(line)["valid"]["ne"] for line in (run / "epochs.jsonl").read_text().splitlines()]
        assert t.value == min(nes) and t.intermediate_values == {1: nes[0], 2: nes[1]}
        assert not (run / "checkpoints" / "last").exists() and (run / "checkpoints" / "best").is_dir()
    best = min(after, key=lambda t: t.value)
    assert second["best_trial"] == best.number and second["best_valid_ne"] == best.value
    cfg = load_config(study / "best.yaml")
    assert cfg == Config.from_dict(best.user_attrs["config"])
    if best.params:  # a drawn trial (the packaged one draws nothing)
        assert cfg.train.lr == best.params["train.lr"] and cfg.model.output_hidden == tuple(json.loads(best.params["model.output_hidden"]))
    data = prepare_dataset(cfg.data.dataset)
    t = Trainer(cfg, data, tmp_path / "again", progress=False, logger=quiet)
    t.start_record()
    assert t.fit()["metrics"]["valid"]["ne"] == best.value

    other = tune("kunlun", "ml-latest-small", tmp_path / "other", space=space, overrides=FIXED, logger=quiet)
    assert other["trials"] == {"complete": 3}
    assert [t.params for t in trials(tmp_path / "other")] == [t.params for t in before]
    # the packaged trial takes a number but no draw: the third drawn trial draws what a study without it draws third
    import kunlun.tuning as tuning
    monkeypatch.setattr(tuning, "run_packaged_trial", lambda *a: None)
    tune("kunlun", "ml-latest-small", tmp_path / "drawn-only", space=space, overrides=FIXED, trials=3, logger=quiet)
    assert [t.params for t in trials(tmp_path / "drawn-only")] == [after[0].params, after[1].params, after[3].params]
    with pytest.raises(KunlunError, match="this study was made with examples=4096, not 8192"):
        tune("kunlun", "ml-latest-small", study, space=space, overrides=FIXED, examples=8192, logger=quiet)
    with pytest.raises(KunlunError, match="train.lr is searched"):
        tune("kunlun", "ml-latest-small", study, space=space, overrides=[*FIXED, "train.lr=0.1"], logger=quiet)


def test_the_packaged_trial_is_never_pruned(tmp_path, space, monkeypatch):
    """The packaged configuration's trial is the study's floor: with a pruner that cuts every trial at its first
    validation, the drawn trials are pruned and the packaged one runs to its end and is the best."""
    optuna = pytest.importorskip("optuna")
    from kunlun.tuning import tune

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    summary = tune("kunlun", "ml-latest-small", tmp_path / "s", space=space, overrides=FIXED, logger=quiet)
    ts = trials(tmp_path / "s")
    assert [t.state.name for t in ts] == ["PRUNED", "PRUNED", "COMPLETE"] and ts[2].user_attrs["packaged"]
    assert summary["best_trial"] == 2 and len(ts[2].intermediate_values) == 2


KILLED_TUNE = """
import os, signal, sys, time
from pathlib import Path
import kunlun.tuning as tuning
from kunlun.training.trainer import Trainer
tuning.HEARTBEAT_S, tuning.HEARTBEAT_GRACE_S = 1, 2
real = Trainer.start_record
def start_then_die(self):  # the process dies inside its first trial, after the trial's heartbeat was recorded
    real(self)
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGKILL)
Trainer.start_record = start_then_die
tuning.tune("kunlun", "ml-latest-small", Path(sys.argv[1]), space=Path(sys.argv[2]), overrides=sys.argv[3:], logger=print)
"""


def test_a_trial_killed_with_its_process_is_run_again_with_its_values(tmp_path, space, monkeypatch):
    """A process killed (SIGKILL) inside its first trial leaves it RUNNING in study.db; the next tune finds its
    heartbeat stale, marks it failed and runs its values again, then completes the budget with the values an
    uninterrupted study draws (the rerun takes a trial number but draws nothing)."""
    pytest.importorskip("optuna")
    from kunlun import tuning

    study = tmp_path / "study"
    r = subprocess.run([sys.executable, "-c", KILLED_TUNE, str(study), str(space), *FIXED], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    killed = trials(study)
    assert [t.state.name for t in killed] == ["RUNNING"]
    monkeypatch.setattr(tuning, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tuning, "HEARTBEAT_GRACE_S", 2)
    time.sleep(3.5)  # the killed trial's heartbeat is older than the grace period
    summary = tuning.tune("kunlun", "ml-latest-small", study, space=space, overrides=FIXED, logger=quiet)
    after = trials(study)
    assert [t.state.name for t in after] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"] and summary["trials"] == {"fail": 1, "complete": 3}
    assert after[1].params == killed[0].params  # the killed trial, again
    tuning.tune("kunlun", "ml-latest-small", tmp_path / "clean", space=space, overrides=FIXED, logger=quiet)
    assert [t.params for t in after[1:]] == [t.params for t in trials(tmp_path / "clean")]


def test_search_spaces_of_every_model_load_and_bad_entries_name_the_key(tmp_path):
    """The packaged file has a space for every model of the quality spec, each value of which loads as that model's
    config; a malformed entry is one KunlunError naming the file, model and key."""
    from kunlun.bench.spec import load_spec
    from kunlun.tuning import load_search_space

    for model in load_spec(None)["models"]:
        budget, params = load_search_space(model)
        assert budget.trials >= 10 and params and all(p.key.startswith(("train.", "model.")) for p in params)
    bad = tmp_path / "bad.yaml"
    for entry, needle in [({"low": 1, "high": 1}, "expected low < high"), ({"low": 0.0, "high": 1.0, "log": True}, "a log range needs low > 0"),
                          ({"choices": []}, "non-empty list"), ({"low": 1}, "both low and high"), ({"high": 2, "lo": 1}, "unknown field 'lo'")]:
        bad.write_text(yaml.safe_dump({**SPACE, "models": {"kunlun": {"model.dropout": entry}}}))
        with pytest.raises(KunlunError, match=f"{re.escape(str(bad))}: kunlun: model.dropout: .*{re.escape(needle)}"):
            load_search_space("kunlun", bad)
    bad.write_text(yaml.safe_dump({**SPACE, "models": {"kunlun": {"model.num_heads": {"choices": [2, 3]}}}}))
    with pytest.raises(KunlunError, match="model.num_heads=3 does not load: .*3 heads do not divide"):
        load_search_space("kunlun", bad)
    with pytest.raises(KunlunError, match="no search space for model 'dnn'"):
        load_search_space("dnn", bad)


def test_without_optuna_one_line_names_the_install_command(monkeypatch, tmp_path):
    from kunlun import tuning

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(KunlunError) as e:
        tuning.tune("kunlun", "ml-latest-small", tmp_path / "study")
    assert str(e.value) == 'kunlun tune needs Optuna, an optional extra: pip install "kunlun[tune]"'
    assert not (tmp_path / "study").exists()


def kunlun(*args, cwd, env=None, expect=0):
    r = subprocess.run([sys.executable, "-m", "kunlun", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == expect, r.stderr[-2000:]
    return r


def test_kunlun_tune_then_kunlun_train_config_best_yaml(tmp_path, space):
    """The commands as a user runs them: `kunlun tune` prints its summary (--json), and `kunlun train --config` takes
    the best.yaml it wrote, to the trial's validation NE."""
    pytest.importorskip("optuna")
    r = kunlun("tune", "kunlun", "--dataset", "ml-latest-small", "--study-root", tmp_path / "root", "--space", space, "--json", *FIXED,
               cwd=tmp_path)
    summary = json.loads(r.stdout)
    study = tmp_path / "root" / "kunlun-ml-latest-small"  # where bench quality --tuned ROOT looks for it
    assert summary["trials"] == {"complete": 3} and summary["best_config"] == str(study / "best.yaml")
    assert "trial 0: best valid NE" in r.stderr and "trial 1: best valid NE" in r.stderr
    out = json.loads(kunlun("train", "--config", study / "best.yaml", "--run-dir", tmp_path / "run", "--json", "--quiet",
                            cwd=tmp_path).stdout)
    assert out["valid"]["ne"] == summary["best_valid_ne"]


def test_kunlun_tune_without_optuna_is_one_line(tmp_path):
    shim = tmp_path / "shim" / "optuna"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("no optuna here")\n')
    r = kunlun("tune", "kunlun", "--dataset", "ml-latest-small", "--study-dir", tmp_path / "s", cwd=tmp_path, expect=2,
               env={"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])})
    assert r.stderr.strip().splitlines() == ['kunlun: error: kunlun tune needs Optuna, an optional extra: pip install "kunlun[tune]"']
    assert not (tmp_path / "s").exists()
    r = kunlun("tune", "kunlun", "--dataset", "ml-latest-small", "--study-dir", tmp_path / "s", "--study-root", tmp_path, cwd=tmp_path,
               expect=2)
    assert r.stderr.strip().splitlines()[-1] == "Error: give --study-dir or --study-root, not both" and not (tmp_path / "s").exists()


def test_bench_quality_tuned_trains_each_models_best_trial_with_every_seed(tmp_path, space):
    """`kunlun bench quality --tuned DIR`: each model trains the best trial of its study DIR/<model>-<dataset> with every
    seed (seed 0, the study's own, gives the trial's validation NE again, bit for bit); the table names each model's
    budget, best trial and values. Refused before anything trains: a missing study, studies of one data set at
    different budgets, a study tuned with other spec overrides than the spec's now."""
    pytest.importorskip("optuna")
    from kunlun.bench.quality import run_quality
    from kunlun.bench.spec import load_spec
    from kunlun.tuning import tune

    spec_path = tmp_path / "quality.yaml"
    spec = {"datasets": ["ml-latest-small"], "seeds": [0, 1], "models": {"logistic_regression": ["train.embedding_l2=0"], "kunlun": []}}
    spec_path.write_text(yaml.safe_dump(spec))
    space.write_text(yaml.safe_dump({**SPACE, "models": {**SPACE["models"], "logistic_regression": {}}}))
    tuned = tmp_path / "tuned"
    fixed = {"logistic_regression": [], "kunlun": FIXED}
    for model in fixed:
        tune(model, "ml-latest-small", tuned / f"{model}-ml-latest-small", space=space, overrides=fixed[model], quality_spec=spec_path,
             logger=quiet)
    res = run_quality(load_spec(spec_path), tmp_path / "out", tuned=tuned)
    md = (tmp_path / "out" / "quality.md").read_text()
    assert ("the same budget for every model: 2 finished drawn trials and a trial of the model's packaged configuration, "
            "each of at most 4,096 training examples, validated 2 times") in md
    for model in fixed:
        best = min(trials(tuned / f"{model}-ml-latest-small"), key=lambda t: t.value)
        row = res["results"]["ml-latest-small"][model]
        assert (row["tuned"]["trial"], row["tuned"]["valid_ne"], row["seeds"]) == (best.number, best.value, 2)
        assert f"| {model} | {best.number} | {best.value:.4f} |" in md
        runs = tmp_path / "out" / "runs" / "ml-latest-small" / model
        for seed in (0, 1):
            assert load_config(runs / f"seed{seed}" / "config.yaml") == load_config(best.user_attrs["config"], seed=seed)
        assert json.loads((runs / "seed0" / "final.json").read_text())["metrics"]["valid"]["ne"] == best.value
        assert set(json.loads((runs / "seed1" / "final.json").read_text())["metrics"]) == {"valid", "test"}

    missing = f"{tmp_path / 'none'}/kunlun-ml-latest-small: no tuning study of kunlun on ml-latest-small there"
    make = rf" \(make it with kunlun tune kunlun --dataset ml-latest-small --study-root {tmp_path / 'none'}\)"
    with pytest.raises(KunlunError, match=missing + make):
        run_quality(load_spec(spec_path, models=["kunlun"]), tmp_path / "out2", tuned=tmp_path / "none")
    spec_path.write_text(yaml.safe_dump({**spec, "models": {**spec["models"], "kunlun": ["train.embedding_l2=0.001"]}}))
    with pytest.raises(KunlunError, match=r"kunlun-ml-latest-small: tuned with the overrides \[.*\], but the spec now gives kunlun"):
        run_quality(load_spec(spec_path), tmp_path / "out2", tuned=tuned)
    spec_path.write_text(yaml.safe_dump(spec))
    tune("kunlun", "ml-latest-small", tuned / "kunlun-ml-latest-small", space=space, overrides=FIXED, quality_spec=spec_path,
         trials=3, logger=quiet)
    with pytest.raises(KunlunError, match="the studies on ml-latest-small differ in budget .*kunlun 4,096 examples × 2 validations, "
                                          "3 finished drawn trials and the packaged configuration"):
        run_quality(load_spec(spec_path), tmp_path / "out2", tuned=tuned)
    assert not (tmp_path / "out2").exists()
