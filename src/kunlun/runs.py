"""Run records: one directory per run with everything needed to understand and reproduce it.

    <run>/config.yaml        resolved config (data, train, model)
    <run>/environment.json   code version (git commit, dirty flag, source hash), versions, device, threads,
                             command line, dataset fingerprint
    <run>/encoder/           schema, vocabularies and numeric statistics (to score new files)
                             and, for a dataset described by a schema file, a copy of that file (schema.yaml),
                             for a registered one, copies of the side files scoring reads besides the events (side/:
                             MovieLens's movie and user tables): scoring a file reads the copies when the dataset
                             folder is not found, so the run scores after its dataset folder moves
    <run>/epochs.jsonl       one JSON line per validation (each epoch's end, and every train.eval_every_steps steps):
                             epoch, step, examples seen, running train loss, validation metrics, time
    <run>/final.json         final metrics by split, FLOPs/example, parameters, wall time, examples/s
    <run>/checkpoints/best   weights with the best validation NE (safetensors + config + manifest of checksums)
    <run>/checkpoints/last   weights + optimizer and RNG state at the last epoch end or mid-epoch step (for --resume);
                             of a run trained by several processes, a torch.distributed.checkpoint (dcp/), which
                             resumes on any number of processes
    <run>/resumes.jsonl      one JSON line per resume: position, code, config keys changed (threads, data_dir, …)
    <run>/curves.png         learning curves (training loss, validation NE and AUC by step), drawn when training ends
    <run>/tensorboard/       TensorBoard event files, with train.tensorboard=true (kunlun.training.tracking)
    <run>/.lock              flock'ed by the process training the run (kunlun.processes)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kunlun.config import model_from_dict, model_to_dict
from kunlun.errors import KunlunError
from kunlun.processes import lock_holder

DEFAULT_RUNS_DIR = Path("runs")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # every time a run record writes (local time with its UTC offset)
SCHEMA_COPY = "schema.yaml"  # <run>/encoder/schema.yaml: the run's copy of its dataset's schema file
SIDE_COPY = "side"  # <run>/encoder/side/: its copies of the files besides the events that scoring a file reads


def new_run_dir(root: Path, model: str, dataset: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # a schema file or a folder (synthetic data) is named by its last part: the run stays one directory below root
    base = f"{stamp}-{model}-{Path(dataset).stem if dataset.endswith(('.yaml', '.yml')) else Path(dataset).name}"
    path, i = root / base, 1
    while path.exists():
        path, i = root / f"{base}-{i}", i + 1
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PACKAGE_DIR = Path(__file__).resolve().parent
# What the code version hashes: the package's Python source and packaged configs. Not the embedded data
# (a dataset is identified by its own fingerprint) and not _version.py (it changes with every commit,
# the code need not).
SOURCE_SUFFIXES = (".py", ".yaml")


def source_sha256(root: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the package's source files (relative path and bytes, in sorted order).

    This identifies the code that ran however it was installed (editable, wheel, copied tree); two
    commits that differ only outside the package (README, tests) have the same source hash.
    """
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
                   and p.name != "_version.py" and "__pycache__" not in p.parts)
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_version(root: Path) -> dict[str, Any] | None:
    """Commit and dirty flag when the package runs from a git checkout (editable install or source tree)."""
    # the package's own files must be tracked there: an installed copy inside some other checkout (a venv in
    # a clone, say) is not that checkout's code
    if _git(["ls-files", "--error-unmatch", "__init__.py"], root) is None:
        return None
    commit = _git(["rev-parse", "HEAD"], root)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=normal", "--", "."], root)
    return {"commit": commit, "dirty": bool(status), "origin": "git checkout"}


def _build_version(version: str) -> dict[str, Any] | None:
    """Commit and dirty flag stamped at build time by setuptools-scm (``0.1.1.dev52+gb10dea3[.d20261123]``)."""
    m = re.search(r"\+g([0-9a-f]{7,40})(\.d\d{8})?", version)
    if not m:
        return None
    return {"commit": m.group(1), "dirty": bool(m.group(2)), "origin": "build stamp"}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """What code produced a result: git commit (full from a checkout, abbreviated from a wheel's build
    stamp), whether the package source differed from it, and the SHA-256 of the source itself.

    ``source_sha256`` is what benchmarks compare before reusing a finished run; ``label`` is what tables print.
    """
    import kunlun

    info: dict[str, Any] = {"version": kunlun.__version__, "commit": None, "dirty": None, "origin": None,
                            "source_sha256": source_sha256()}
    info.update(_git_version(PACKAGE_DIR) or _build_version(kunlun.__version__) or {})
    info["label"] = version_label(info)
    return info


def version_label(code: dict[str, Any] | None) -> str:
    """``b10dea3c1f`` / ``b10dea3c1f+dirty`` / ``unknown``, always with the source hash: ``… (src 1a2b3c4d)``."""
    if not code:
        return "unknown (no code version recorded)"
    commit = (code.get("commit") or "unknown")[:10]
    return f"{commit}{'+dirty' if code.get('dirty') else ''} (src {code.get('source_sha256', '?')[:8]})"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    return f"cpu ({cpu_name()})"


def environment() -> dict[str, Any]:
    import pyarrow

    import kunlun

    env = {
        "code": code_version(),
        "kunlun": kunlun.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device_name(),
        "argv": sys.argv,
        "started": time.strftime(TIME_FORMAT),
    }
    return env


def has_weights(checkpoint: Path) -> bool:
    """A checkpoint directory with weights: model.safetensors, or the DCP folder of one written by several processes."""
    return (checkpoint / "model.safetensors").is_file() or (checkpoint / "dcp" / ".metadata").is_file()


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """A run directory or a checkpoint directory → (run_dir, checkpoint_dir)."""
    p = Path(path)
    if not p.exists():
        raise KunlunError(f"{p}: run or checkpoint not found")
    if has_weights(p):  # a checkpoint: <run>/checkpoints/<name>
        run = p.parent.parent
        return run, p
    if (p / "checkpoints").is_dir():
        for name in ("best", "last"):
            if has_weights(p / "checkpoints" / name):
                return p, p / "checkpoints" / name
    raise KunlunError(f"{p}: not a run directory or checkpoint (no checkpoints/best/model.safetensors)")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# config keys that say where a run's files were, how often it checkpointed and whether it wrote TensorBoard events, not
# what it computes
RECORD_ONLY_KEYS = ("data.data_dir", "train.checkpoint_every_steps", "train.checkpoint_every_minutes", "train.tensorboard")
# train keys added after runs were recorded without them, with the default that those runs ran with
KEYS_ADDED_AT_DEFAULT = (("distributed", "ddp"), ("embedding_sharding", "none"))


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run's resolved config without ``RECORD_ONLY_KEYS`` (where its files were, how often it checkpointed): what
    must match for a finished run to stand for a requested one."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key in RECORD_ONLY_KEYS:
        section, _, name = key.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    if isinstance(out.get("train"), dict):  # keys added later, at their defaults: a run recorded before them asked the same
        for name, default in KEYS_ADDED_AT_DEFAULT:
            out["train"].setdefault(name, default)
    model = out.get("model")
    if isinstance(model, dict) and "name" in model:
        # the model section with every default filled in: a run recorded with the defaults spelled out (as the packaged
        # config once did) and one recorded without them answer the same question
        try:
            out["model"] = model_to_dict(model_from_dict(model))
        except KunlunError:
            pass  # not a valid model section (any more): compared as written
    return out


def run_code(run_dir: Path, final: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every code version that trained the run (more than one when it was resumed under other code)."""
    final = final if final is not None else read_json(run_dir / "final.json") or {}
    if final.get("code_versions"):
        return final["code_versions"]
    env = read_json(run_dir / "environment.json") or {}
    return [env["code"]] if env.get("code") else []


def reuse_state(run_dir: Path, config: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """Can the finished run in ``run_dir`` stand for a run of ``config`` with the code running now?

    Returns (state, final.json): ``missing`` (no finished run), ``config differs`` (it answers another
    question), ``stale`` (same config, other or unknown code), ``fresh`` (same config, same source hash).
    """
    final = read_json(run_dir / "final.json")
    if final is None:
        return "missing", None
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "config differs", final
    if comparable_config(saved) != comparable_config(config):
        return "config differs", final
    codes = run_code(run_dir, final)
    now = code_version()["source_sha256"]
    if not codes or any(c.get("source_sha256") != now for c in codes):
        return "stale", final
    return "fresh", final


def provenance_line(codes: list[dict[str, Any]], stale: int = 0) -> str:
    """One line for a table or report: which code versions its runs came from, with counts."""
    counts = Counter(version_label(c) for c in codes)
    now = version_label(code_version())
    parts = [f"{label} × {n}" + (" (current)" if label == now else "") for label, n in counts.items()]
    line = f"Built from {sum(counts.values())} run(s) of code {'; '.join(parts) or 'unknown'}."
    if stale:
        line += f" **{stale} run(s) are stale** (trained by code other than the current {now}; marked †)."
    return line


def started_at(run_dir: Path) -> float:
    """When the run started (seconds since the epoch): environment.json's ``started``, else config.yaml's time."""
    env = read_json(run_dir / "environment.json")
    started = env.get("started") if isinstance(env, dict) else None
    try:
        return datetime.strptime(started, TIME_FORMAT).timestamp()
    except (TypeError, ValueError):
        return (run_dir / "config.yaml").stat().st_mtime


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Summaries of the runs under ``root``, newest first (by start time). A run without final.json is ``running``
    while a process holds its lock, else ``incomplete``; its model, dataset and seed come from its config.yaml."""
    if not root.is_dir():
        return []
    rows = []
    for d in root.iterdir():
        if not d.is_dir() or not (d / "config.yaml").is_file():
            continue
        final = read_json(d / "final.json")
        status = "complete" if final else "running" if lock_holder(d) else "incomplete"
        started = started_at(d)
        row: dict[str, Any] = {"run": d.name, "path": str(d), "status": status,
                               "started": time.strftime(TIME_FORMAT, time.localtime(started))}
        if final:
            row.update(
                model=final.get("model"), dataset=final.get("dataset"), seed=final.get("seed"),
                metrics=final.get("metrics", {}), flops_per_example=final.get("flops_per_example"),
                train_examples_per_s=final.get("train_examples_per_s"), wall_time_s=final.get("wall_time_s"),
            )
        else:
            row.update({k: v for k, v in _config_summary(d).items() if v is not None})
        rows.append((started, d.name, row))
    return [row for *_, row in sorted(rows, key=lambda r: r[:2], reverse=True)]


def _config_summary(run_dir: Path) -> dict[str, Any]:
    """Model, dataset and seed as a run's config.yaml names them (None for what it does not)."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        cfg = None

    def get(section: str, key: str) -> Any:
        part = cfg.get(section) if isinstance(cfg, dict) else None
        return part.get(key) if isinstance(part, dict) else None

    return {"model": get("model", "name"), "dataset": get("data", "dataset"), "seed": get("train", "seed")}


def runs_table(rows: list[dict[str, Any]], root: Path) -> None:
    """``list_runs(root)`` as a table on stdout (``kunlun runs``), or a line saying there are none."""
    from rich.table import Table

    from kunlun.console import out_console

    if not rows:
        print(f"no runs under {root}")
        return
    t = Table("run", "status", "model", "dataset", "seed", "valid NE", "test NE", "test AUC", "MFLOPs/ex", "train ex/s")

    def num(m, split, key, fmt="{:.4f}"):
        v = (m or {}).get(split, {}).get(key)
        return fmt.format(v) if v is not None else "-"

    for r in rows:
        m = r.get("metrics")
        t.add_row(r["run"], r["status"], str(r.get("model", "-")), str(r.get("dataset", "-")), str(r.get("seed", "-")),
                  num(m, "valid", "ne"), num(m, "test", "ne"), num(m, "test", "auc"),
                  f"{r['flops_per_example'] / 1e6:.2f}" if r.get("flops_per_example") is not None else "-",
                  f"{r['train_examples_per_s']:.0f}" if r.get("train_examples_per_s") else "-")
    out_console().print(t)


def show_runs(names: list[str] | tuple[str, ...], root: Path, as_json: bool = False) -> None:
    """What ``kunlun runs`` prints on stdout: the runs under ``root`` (``list_runs``), or, given ``names`` (run
    directories, or runs under ``root``), those runs side by side (``compare_runs``); a table, or one JSON object."""
    from kunlun.console import emit_json

    if names:
        result = compare_runs([find_run(n, root) for n in names])
        emit_json(result) if as_json else compare_table(result)
        return
    rows = list_runs(root)
    emit_json({"runs": rows}) if as_json else runs_table(rows, root)


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"section.key": value}`` (an empty section stays one key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_run(name: str | Path, root: Path) -> Path:
    """A run named on the command line: a run directory (one holding config.yaml), else the run of that name under ``root``."""
    for d in (Path(name), root / name):
        if (d / "config.yaml").is_file():
            return d
    raise KunlunError(f"{name}: not a run directory (no config.yaml there, nor a run of that name under {root})")


def _config(run_dir: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def compare_runs(run_dirs: list[Path]) -> dict[str, Any]:
    """Runs side by side (``kunlun runs A B …``): ``differences``, the config keys whose values differ between them
    (``{key: [value of each run]}``, None where a run lacks the key), and per run its status, code version(s), metrics
    by split, FLOPs, parameters, steps, wall time and speed. Configs are compared as ``comparable_config`` gives them:
    model defaults filled in, where the files were and how often the run checkpointed left out."""
    flat = [flat_keys(comparable_config(_config(d))) for d in run_dirs]
    keys = sorted(set().union(*flat), key=lambda k: (k != "model.name", k))
    differences = {k: [f.get(k) for f in flat] for k in keys if any(f.get(k) != flat[0].get(k) for f in flat)}
    same = {k: flat[0].get(k) for k in ("model.name", "data.dataset") if k not in differences}
    runs = []
    for d in run_dirs:
        final = read_json(d / "final.json") or {}
        runs.append({
            "run": d.name, "path": str(d),
            "status": "complete" if final else "running" if lock_holder(d) else "incomplete",
            "started": time.strftime(TIME_FORMAT, time.localtime(started_at(d))),
            "code": [version_label(c) for c in run_code(d, final)],
            "metrics": final.get("metrics", {}),
            "best_epoch": final.get("best_epoch"), "epochs_run": final.get("epochs_run"), "steps": final.get("steps"),
            "executed_flops_per_example": final.get("executed_flops_per_example", final.get("flops_per_example")),
            "useful_flops_per_example": final.get("useful_flops_per_example"),
            "train_compute": final.get("train_compute"),
            "parameters": (final.get("parameters") or {}).get("total"),
            "wall_time_s": final.get("wall_time_s"),
            "train_examples_per_s": final.get("train_examples_per_s"),
        })
    return {"same": same, "differences": differences, "runs": runs}


def compare_table(result: dict[str, Any]) -> None:
    """``compare_runs`` as one table on stdout, a column per run: config differences, then what each run measured."""
    from rich.table import Table

    from kunlun.console import out_console

    runs = result["runs"]
    same = result["same"]
    title = (f"{len(runs)} runs" + (f" of {same['model.name']}" if "model.name" in same else "")
             + (f" on {same['data.dataset']}" if "data.dataset" in same else ""))
    t = Table("", *[r["run"] for r in runs], title=title)
    plain = lambda v: "-" if v is None else json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)  # noqa: E731
    if not result["differences"]:
        t.add_row("config", *["same" if len(runs) > 1 else "-" for _ in runs])
    for key, values in result["differences"].items():
        t.add_row(key, *map(plain, values))
    t.add_section()

    def row(name: str, get, fmt: str) -> None:
        values = [get(r) for r in runs]
        t.add_row(name, *["-" if v is None else fmt.format(v) for v in values])

    for split in ("valid", "test"):
        if any(split in r["metrics"] for r in runs):
            for key, label in (("ne", "NE"), ("logloss", "logloss"), ("auc", "AUC"), ("gauc", "gAUC"), ("calibration", "calibration")):
                row(f"{split} {label}", lambda r, s=split, k=key: r["metrics"].get(s, {}).get(k), "{:.4f}")
    t.add_section()
    row("MFLOPs/example (executed)", lambda r: r["executed_flops_per_example"] and r["executed_flops_per_example"] / 1e6, "{:.2f}")
    row("MFLOPs/example (useful)", lambda r: r["useful_flops_per_example"] and r["useful_flops_per_example"] / 1e6, "{:.2f}")
    row("training compute (FLOPs)", lambda r: r["train_compute"], "{:.3g}")
    row("parameters", lambda r: r["parameters"], "{:,}")
    row("steps", lambda r: r["steps"], "{:,}")
    row("best epoch / epochs", lambda r: r["best_epoch"] and f"{r['best_epoch']} / {r['epochs_run']}", "{}")
    row("train examples/s", lambda r: r["train_examples_per_s"], "{:,.0f}")
    row("wall time (s)", lambda r: r["wall_time_s"], "{:.1f}")
    t.add_section()
    row("status", lambda r: r["status"], "{}")
    row("started", lambda r: r["started"], "{}")
    row("code", lambda r: " → ".join(r["code"]) or None, "{}")
    out_console().print(t)
