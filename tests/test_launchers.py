"""``kunlun sweep --launcher ray|submitit``: the same sweep file, its training commands run as Ray tasks or submitit
jobs instead of child processes; finished points are reused and interrupted ones resumed exactly as locally. Ray and
submitit are optional extras: each test skips, with the reason, where its package is not installed, and asking for
a missing one is a one-line error."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

SWEEP = ("name: tiny\nmodel: kunlun\ndataset: ml-latest-small\n"
         "overrides: [train.epochs=1, train.max_steps=3, train.warmup_steps=1, train.eval_batch_size=4096, model.num_layers=1]\n"
         "mode: zip\naxes:\n  model.d_model: [4, 8]\n  train.batch_size: [32, 64]\nparallel: 2\nthreads: 1\n")


def sweep(*args):
    return subprocess.run([sys.executable, "-m", "kunlun", "sweep", *map(str, args)], capture_output=True, text=True, timeout=600)


def metrics(out):
    return {f.parent.parent.name: json.loads(f.read_text())["metrics"] for f in sorted(out.glob("points/*/seed0/final.json"))}


@pytest.mark.parametrize("launcher", ["ray", "submitit"])
def test_a_sweep_on_a_cluster_launcher_reuses_and_resumes_as_locally(launcher, tmp_path):
    if importlib.util.find_spec(launcher) is None:
        pytest.skip(f"{launcher} is not installed (pip install \"kunlun[{launcher}]\")")
    (tmp_path / "s.yaml").write_text(SWEEP)
    out = tmp_path / launcher
    r = sweep(tmp_path / "s.yaml", "--out", out, "--launcher", launcher)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 run, 0 skipped, 0 failed" in r.stderr
    first = metrics(out)
    assert len(first) == 2
    r = sweep(tmp_path / "s.yaml", "--out", tmp_path / "local")  # the same file, run here
    assert r.returncode == 0 and metrics(tmp_path / "local") == first

    (out / "points" / "d_model4-batch_size32" / "seed0" / "final.json").unlink()  # an interrupted point (its last checkpoint kept)
    r = sweep(tmp_path / "s.yaml", "--out", out, "--launcher", launcher)
    assert r.returncode == 0 and "1 run, 1 skipped, 0 failed" in r.stderr, r.stderr[-2000:]
    assert "resumed from" in (out / "logs" / "d_model4-batch_size32-seed0.log").read_text()
    assert metrics(out) == first


@pytest.mark.parametrize("launcher", ["ray", "submitit"])
def test_a_launcher_that_is_not_installed_is_a_one_line_error(launcher, tmp_path):
    if importlib.util.find_spec(launcher) is not None:
        pytest.skip(f"{launcher} is installed here")
    (tmp_path / "s.yaml").write_text(SWEEP)
    r = sweep(tmp_path / "s.yaml", "--out", tmp_path / "out", "--launcher", launcher)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert r.stderr.strip() == (f"kunlun: error: --launcher {launcher}: {launcher} is not installed; pip install \"kunlun[{launcher}]\" "
                                f"(or run the sweep here with --launcher local)")


def test_an_unknown_launcher_is_a_one_line_error(tmp_path):
    (tmp_path / "s.yaml").write_text(SWEEP)
    r = sweep(tmp_path / "s.yaml", "--launcher", "k8s")
    assert r.returncode == 2 and r.stderr.strip() == "kunlun: error: --launcher k8s: expected one of local, ray, submitit"
