"""Scaling points: one (compute, NE) per training run, from run directories, sweep folders or a CSV table.

Conventions (also in docs/scaling.md#conventions): L = NE on the test split (valid where the dataset has no test split) at
the best-on-validation checkpoint, and C = the training compute that produced that checkpoint: 3 × useful
forward FLOPs/example × training examples processed *up to that checkpoint* (``useful_train_compute_at_best``;
every matmul, attention, interaction and MLP FLOP over each example's real, unpadded tokens, at 2 FLOPs per
multiply-add; embedding lookups 0 FLOPs). Training on past the best checkpoint spends compute that did not
produce the NE, so it is not counted; padding is not work the model does on data, so it is not counted
either (how much padding a run executes is a batching choice). Runs recorded before useful FLOPs existed
fall back to executed FLOPs, and the point says so (``compute_kind``).
A CSV needs columns ``compute`` and ``ne``; ``family``, ``seed``, ``layers``, ``dataset``, ``metric``,
``flops_per_example``, ``code`` and ``point`` (runs sharing it differ only by seed) are optional.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from kunlun.errors import KunlunError
from kunlun.metrics import report_split
from kunlun.runs import read_json, run_code, version_label


@dataclass
class Point:
    compute: float
    ne: float
    family: str = ""
    seed: int | None = None
    layers: int | None = None
    dataset: str = ""
    metric: str = ""
    flops_per_example: float | None = None
    source: str = ""
    compute_kind: str = "useful"  # useful | executed (older run records) | csv
    code: str = ""  # the code version that trained the run (kunlun.runs.version_label); "" from a CSV without it
    # runs that differ only by seed share a point: a sweep point's folder, a CSV's ``point`` column. With C at the
    # best checkpoint, seeds of one point can land at different computes, so seed noise is grouped by this.
    point: str = ""


def _from_run(final_path: Path) -> Point:
    final = read_json(final_path)
    if final is None:
        raise KunlunError(f"{final_path}: unreadable run record")
    kind = "useful" if "useful_train_compute_at_best" in final else "executed"
    if f"{'useful_' if kind == 'useful' else ''}train_compute_at_best" not in final:
        raise KunlunError(f"{final_path}: no train_compute_at_best (the run predates compute tracking); retrain it or give a CSV")
    split = report_split(final.get("metrics", {}))
    layers = None
    cfg_path = final_path.parent / "config.yaml"
    if cfg_path.is_file():
        layers = (yaml.safe_load(cfg_path.read_text()) or {}).get("model", {}).get("num_layers")
    codes = run_code(final_path.parent, final)
    prefix = "useful_" if kind == "useful" else ""
    return Point(compute=float(final[f"{prefix}train_compute_at_best"]), ne=float(final["metrics"][split]["ne"]), family=final.get("model", ""),
                 seed=final.get("seed"), layers=layers, dataset=final.get("dataset", ""), metric=f"{split} NE",
                 flops_per_example=final.get(f"{prefix}flops_per_example"), source=str(final_path.parent), compute_kind=kind,
                 point=str(final_path.parent.parent) if final_path.parent.name.startswith("seed") else "",
                 code=" + ".join(version_label(c) for c in codes) if codes else version_label(None))


def _number(value: str, path: Path, line: int, column: str, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise KunlunError(f"{path}, line {line}, column {column!r}: expected a number, got {value!r}") from None


def _from_csv(path: Path) -> list[Point]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return _csv_points(path, csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise KunlunError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise KunlunError(f"{path}: not a readable CSV file ({exc})") from None


def _csv_points(path: Path, reader: csv.DictReader) -> list[Point]:
    cols = reader.fieldnames or []
    missing = [c for c in ("compute", "ne") if c not in cols]
    if missing:
        raise KunlunError(f"{path}: missing column {missing[0]!r} (need compute, ne; optional family, seed, layers, dataset, metric)")
    pts = []
    for line, row in enumerate(reader, start=2):
        if None in row or None in row.values():  # more cells than the header names, or fewer
            cells = len(cols) + len(row[None]) if None in row else sum(v is not None for v in row.values())
            raise KunlunError(f"{path}, line {line}: {cells} cells; the header names {len(cols)}")
        pts.append(Point(
            compute=_number(row["compute"], path, line, "compute"), ne=_number(row["ne"], path, line, "ne"),
            family=(row.get("family") or "").strip(),
            seed=_number(row["seed"], path, line, "seed", int) if row.get("seed") not in (None, "") else None,
            layers=_number(row["layers"], path, line, "layers", int) if row.get("layers") not in (None, "") else None,
            dataset=(row.get("dataset") or "").strip(), metric=(row.get("metric") or "").strip(),
            code=(row.get("code") or "").strip(), point=(row.get("point") or "").strip(),
            flops_per_example=_number(row["flops_per_example"], path, line, "flops_per_example")
            if row.get("flops_per_example") not in (None, "") else None,
            source=f"{path}:{line}", compute_kind="csv"))
    return pts


def load_points(inputs: list[Path]) -> list[Point]:
    """Points from CSV files, run directories, or folders searched for run records (``final.json``)."""
    pts: list[Point] = []
    for p in map(Path, inputs):
        if p.is_file() and p.suffix.lower() == ".csv":
            pts += _from_csv(p)
        elif p.is_dir() and (p / "final.json").is_file():
            pts.append(_from_run(p / "final.json"))
        elif p.is_dir():
            finals = sorted(p.rglob("final.json"))
            if not finals:
                raise KunlunError(f"{p}: no run records (final.json) under this folder")
            pts += [_from_run(f) for f in finals]
        else:
            raise KunlunError(f"{p}: not a CSV file or a folder of runs")
    check_points(pts)
    return pts


def check_points(pts: list[Point]) -> None:
    for p in pts:
        for name in ("compute", "ne"):
            v = getattr(p, name)
            if not (math.isfinite(v) and v > 0):
                raise KunlunError(f"{p.source}: {name} = {v!r}; expected a positive finite number")
    for attr, what in (("dataset", "datasets"), ("metric", "metrics"), ("compute_kind", "FLOP conventions (useful / executed)")):
        values = sorted({getattr(p, attr) for p in pts if getattr(p, attr) and getattr(p, attr) != "csv"})
        if len(values) > 1:
            raise KunlunError(f"runs from different {what} are mixed together ({', '.join(values)}); fit each separately")


def provenance(pts: list[Point]) -> str:
    """Which code versions the points came from, with counts (``unknown`` for CSV rows without a code column)."""
    counts: dict[str, int] = {}
    for p in pts:
        counts[p.code or "unknown"] = counts.get(p.code or "unknown", 0) + 1
    return "; ".join(f"{k} × {n}" for k, n in sorted(counts.items()))


def families(pts: list[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in pts:
        out.setdefault(p.family, []).append(p)
    return out
