"""`kunlun data info` / `data synth` / `data prepare` and the summaries behind them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import SHARED_DATA, needs_shared
from kunlun.data.registry import dataset_info, dataset_summary, prepare_dataset
from kunlun.runs import new_run_dir


def kunlun(*args, cwd, expect=0):
    r = subprocess.run([sys.executable, "-m", "kunlun", *map(str, args)], cwd=cwd, env=dict(os.environ), capture_output=True, text=True)
    assert r.returncode == expect, r.stderr[-2000:]
    return r


def test_history_lengths_per_event_type_count_the_events_in_each_history():
    p = prepare_dataset("ml-latest-small")
    s = dataset_summary(p)
    assert set(s["event_types"]["history"].values()) == {"liked", "not_liked"}
    ev, test = p.events["history"], p.splits["test"]
    lengths = test.seq_end["history"] - test.seq_start["history"]
    liked_code = {v: k for k, v in s["event_types"]["history"].items()}["liked"]
    liked = np.array([np.sum(ev.event[a:b] == liked_code) for a, b in zip(test.seq_start["history"], test.seq_end["history"])])
    row = s["splits"]["test"]
    assert row["history_by_event"]["liked"] == {"min": int(liked.min()), "median": float(np.median(liked)),
                                               "p90": float(np.percentile(liked, 90)), "max": int(liked.max()), "mean": float(liked.mean())}
    assert row["history_length"]["p90"] == float(np.percentile(lengths, 90)) and row["history_length"]["min"] == lengths.min()
    not_liked = row["history_by_event"]["not_liked"]
    assert abs(not_liked["mean"] + row["history_by_event"]["liked"]["mean"] - lengths.mean()) < 1e-9  # every event has a type


def test_a_folder_dataset_names_its_run_by_the_folder():
    assert new_run_dir(Path("runs"), "kunlun", "/data/worlds/synth-1m/").name.endswith("-kunlun-synth-1m")
    assert new_run_dir(Path("runs"), "dnn", "ml-1m-first-half").name.endswith("-dnn-ml-1m-first-half")
    assert new_run_dir(Path("runs"), "dnn", "cfg/my-data.yaml").name.endswith("-dnn-my-data")


def test_synth_then_info_from_the_command_line(tmp_path):
    r = kunlun("data", "synth", "--out", tmp_path / "w", "--examples", "12k", "--seed", "5", "--items", "1500",
               "--events-per-user", "25", "--shard-rows", "5k", "--json", "drift_days=20", "device_bias=0,-0.2,0.1",
               cwd=tmp_path)
    out = json.loads(r.stdout)
    assert out["manifest"]["world"]["drift_days"] == 20 and out["manifest"]["world"]["device_bias"] == [0, -0.2, 0.1]
    assert out["manifest"]["examples"] == 12_000 and [s["rows"] for s in out["manifest"]["shards"]] == [5000, 5000, 2000]
    assert out["manifest"]["world"]["items"] == 1500 and out["manifest"]["seed"] == 5
    assert f"wrote 12,000 impressions of {out['manifest']['users']:,} users" in r.stderr
    info = json.loads(kunlun("data", "info", tmp_path / "w", "--json", cwd=tmp_path).stdout)  # DATASET as an argument
    assert info["bayes"] == out["bayes"] and info["name"] == "w"
    assert sum(info["splits"][s]["rows"] for s in ("train", "valid", "test")) == 12_000
    table = kunlun("data", "info", "w", "--data-dir", tmp_path, cwd=tmp_path).stdout  # by name under --data-dir
    assert "Bayes NE" in table and f"{out['bayes']['splits']['test']['ne']:.4f}" in table and "history: like" in table
    # user errors: one line, exit status 2
    err = kunlun("data", "synth", "--out", tmp_path / "w", "--examples", "100", cwd=tmp_path, expect=2).stderr
    assert err.strip().count("\n") == 0 and "already exists and is not an empty directory" in err
    err = kunlun("data", "synth", "--out", tmp_path / "v", "--examples", "lots", cwd=tmp_path, expect=2).stderr
    assert "'lots' is not a count" in err and not (tmp_path / "v").exists()
    err = kunlun("data", "info", "nope", cwd=tmp_path, expect=2).stderr
    assert "unknown dataset 'nope'" in err and "kunlun data synth" in err


def test_prepare_builds_the_cache_once_and_reads_it_back(tmp_path):
    r = kunlun("data", "prepare", "--dataset", "ml-latest-small", cwd=tmp_path)
    assert r.stderr.count("preparing ml-latest-small") == 1 and "using cached ml-latest-small" in r.stderr


@needs_shared
def test_info_names_the_ml1m_subset_for_what_it_is():
    info = dataset_info("ml-1m-first-half", SHARED_DATA)
    assert info["title"] == "ML-1M users 1–2999" and info["splits"]["train"]["rows"] == 391327
    assert set(info["splits"]["test"]["history_by_event"]) == {"liked", "not_liked"}
    assert "bayes" not in info
