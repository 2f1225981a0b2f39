"""Run records: one directory per run with everything needed to understand and reproduce it.

    <run>/config.yaml        resolved config (data, train, model)
    <run>/environment.json   versions, CPU, threads, command line
    <run>/encoder/           schema, vocabularies and numeric statistics (to score new files)
    <run>/epochs.jsonl       one JSON line per epoch: train loss, validation metrics, time
    <run>/final.json         final metrics by split, FLOPs/example, parameters, wall time, examples/s
    <run>/checkpoints/best   weights with the best validation NE (safetensors + config)
    <run>/checkpoints/last   weights + optimizer state of the last epoch (for --resume)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kunlun.errors import KunlunError

DEFAULT_RUNS_DIR = Path("runs")


def new_run_dir(root: Path, model: str, dataset: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{model}-{Path(dataset).stem if dataset.endswith(('.yaml', '.yml')) else dataset}"
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


def environment() -> dict[str, Any]:
    import pyarrow

    import kunlun

    env = {
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
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """A run directory or a checkpoint directory → (run_dir, checkpoint_dir)."""
    p = Path(path)
    if not p.exists():
        raise KunlunError(f"{p}: run or checkpoint not found")
    if (p / "model.safetensors").is_file():  # a checkpoint: <run>/checkpoints/<name>
        run = p.parent.parent
        return run, p
    if (p / "checkpoints").is_dir():
        for name in ("best", "last"):
            if (p / "checkpoints" / name / "model.safetensors").is_file():
                return p, p / "checkpoints" / name
    raise KunlunError(f"{p}: not a run directory or checkpoint (no checkpoints/best/model.safetensors)")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Summaries of the runs under ``root`` (newest first)."""
    if not root.is_dir():
        return []
    rows = []
    for d in sorted(root.iterdir(), reverse=True):
        if not d.is_dir() or not (d / "config.yaml").is_file():
            continue
        final = read_json(d / "final.json")
        row: dict[str, Any] = {"run": d.name, "path": str(d), "status": "complete" if final else "incomplete"}
        if final:
            row.update(
                model=final.get("model"), dataset=final.get("dataset"), seed=final.get("seed"),
                metrics=final.get("metrics", {}), flops_per_example=final.get("flops_per_example"),
                train_examples_per_s=final.get("train_examples_per_s"), wall_time_s=final.get("wall_time_s"),
            )
        rows.append(row)
    return rows
