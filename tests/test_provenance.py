"""Provenance: every run records the code that produced it, and benchmarks reuse only runs of the same
config and code (or say loudly that a row is stale)."""

import json
import shutil

import pytest

from conftest import TINY_MODEL
from kunlun import runs
from kunlun.bench import quality
from kunlun.data.registry import prepare_dataset
from kunlun.runs import code_version, provenance_line, source_sha256

SHORT = ["train.max_steps=3", "train.epochs=1", "data.max_seq_len=4"]


def test_source_hash_covers_the_package_source_and_nothing_else(tmp_path):
    pkg = tmp_path / "kunlun"
    shutil.copytree(runs.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "embedded"))
    before = source_sha256(pkg)
    assert before == source_sha256(runs.PACKAGE_DIR)  # embedded data is not code
    (pkg / "_version.py").write_text("__version__ = 'something else'\n")
    (pkg / "notes.txt").write_text("not source")
    assert source_sha256(pkg) == before
    model = pkg / "models" / "dnn.py"
    model.write_text(model.read_text() + "\n# one more line\n")
    assert source_sha256(pkg) != before


def test_build_stamp_is_parsed():
    assert runs._build_version("0.1.1.dev52+gb10dea32e.d20261123") == {"commit": "b10dea32e", "dirty": True, "origin": "build stamp"}
    assert runs._build_version("0.1.1.dev52+gb10dea32e")["dirty"] is False
    assert runs._build_version("0.1.0") is None


def test_run_record_names_its_code_and_data(tmp_path):
    from kunlun.config import load_config
    from kunlun.training.trainer import Trainer

    cfg = load_config(None, TINY_MODEL + SHORT)
    data = prepare_dataset(cfg.data.dataset)
    final = Trainer(cfg, data, tmp_path / "r", progress=False, logger=lambda m: None).fit()
    env = json.loads((tmp_path / "r" / "environment.json").read_text())
    assert env["code"]["source_sha256"] == source_sha256() == final["code"]["source_sha256"]
    assert [c["source_sha256"] for c in final["code_versions"]] == [source_sha256()]
    if runs._git_version(runs.PACKAGE_DIR):  # running from a checkout: the full commit is known
        assert len(env["code"]["commit"]) == 40
    assert env["device"].startswith(("cpu", "cuda"))
    assert env["data"]["rows"]["train"] == len(data.splits["train"]) and len(env["data"]["sha256"]) == 64


def _other_code(monkeypatch):
    fake = {**code_version(), "source_sha256": "0" * 64, "commit": "f" * 40}
    fake["label"] = runs.version_label(fake)
    monkeypatch.setattr(runs, "code_version", lambda: fake)


def test_benchmark_reuses_only_runs_of_the_same_config_and_code(tmp_path, monkeypatch):
    data = prepare_dataset("ml-latest-small")
    run_dir = tmp_path / "p" / "seed0"

    def point(overrides=(), reuse_stale=False):
        return quality.run_point("ml-latest-small", data, "logistic_regression", SHORT + list(overrides), 0, run_dir, None, 1,
                                 reuse_stale)

    first = point()
    stamp = (run_dir / "final.json").stat().st_mtime_ns
    assert point()["stale"] is False and (run_dir / "final.json").stat().st_mtime_ns == stamp  # fresh: reused

    point(["train.lr=0.5"])  # another config: retrained, not passed off as the old one
    assert (run_dir / "final.json").stat().st_mtime_ns != stamp
    point()
    stamp = (run_dir / "final.json").stat().st_mtime_ns

    with monkeypatch.context() as m:
        _other_code(m)
        kept = point(reuse_stale=True)  # other code, kept on request: marked stale
        assert kept["stale"] is True and (run_dir / "final.json").stat().st_mtime_ns == stamp
        row = quality.summarise([kept])
        assert row["stale_seeds"] == [0]
        line = quality.provenance([row])
        assert "1 run(s) are stale" in line and first["code"]["source_sha256"][:8] in line
        retrained = point()  # other code, default: retrained
        assert retrained["stale"] is False and (run_dir / "final.json").stat().st_mtime_ns != stamp


def test_tables_name_their_code_versions():
    a = {**code_version()}
    b = {"commit": "1" * 40, "dirty": False, "source_sha256": "2" * 64}
    line = provenance_line([a, a, b], stale=1)
    assert f"{runs.version_label(a)} × 2 (current)" in line
    assert "1111111111 (src 22222222) × 1" in line and "1 run(s) are stale" in line


@pytest.mark.parametrize("state", ["fresh", "stale"])
def test_sweep_skips_only_fresh_points(tmp_path, monkeypatch, state):
    from kunlun.config import Config
    from kunlun.scaling import sweep
    from kunlun.training.trainer import Trainer

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(json.dumps({"model": "logistic_regression", "overrides": SHORT, "axes": {"train.lr": [0.01]}}))
    spec = sweep.load_sweep(spec_path)
    (job,) = sweep.jobs(spec, tmp_path / "out")
    assert sweep.pending(spec, [job], 1) == [job]
    cfg = Config.from_dict(sweep.job_config(spec, job, 1))
    Trainer(cfg, prepare_dataset("ml-latest-small"), job.run_dir, progress=False, logger=lambda m: None).fit()
    if state == "stale":
        _other_code(monkeypatch)
        assert sweep.pending(spec, [job], 1) == [job] and sweep.pending(spec, [job], 1, reuse_stale=True) == []
    else:
        assert sweep.pending(spec, [job], 1) == []
        assert sweep.pending(spec, [job], 2) == [job]  # another thread count is another config


def test_an_installed_copy_inside_another_checkout_is_not_that_checkouts_code(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    (repo / ".venv").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text(".venv/\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    pkg = repo / ".venv" / "kunlun"
    shutil.copytree(runs.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "embedded"))
    assert runs._git_version(pkg) is None  # falls back to the build stamp
    subprocess.run(["git", "-C", str(repo), "add", "-f", ".venv/kunlun"], check=True)
    assert runs._git_version(pkg)["commit"]  # tracked there: that checkout's code
