"""The raw runs behind a scaling or width fit, as one CSV (what `kunlun fit` reads from the run folders, plus what
each run record says about its compute): python benchmarks/points_csv.py SWEEP_DIR... > runs.csv

Columns: family, seed, layers, dataset, metric, compute (useful training FLOPs up to the best-on-validation
checkpoint), ne, valid_ne (that checkpoint's validation NE, what a choice between runs may read), flops_per_example
(useful), executed_flops_per_example, train_compute_total (every example processed), best_epoch, epochs_run,
best_step, steps (optimizer steps to the best checkpoint, and run), code, run, point. `kunlun fit runs.csv` refits
from it.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from kunlun.runs import read_json
from kunlun.scaling.points import load_points

COLUMNS = ["family", "seed", "layers", "dataset", "metric", "compute", "ne", "valid_ne", "flops_per_example", "executed_flops_per_example",
           "train_compute_total", "best_epoch", "epochs_run", "best_step", "steps", "code", "run", "point"]


def main(dirs: list[str]) -> None:
    roots = [Path(d).resolve() for d in dirs]
    out = csv.DictWriter(sys.stdout, COLUMNS, lineterminator="\n")
    out.writeheader()
    for p in load_points([Path(d) for d in dirs]):
        final = read_json(Path(p.source) / "final.json")
        rel = lambda path: next((str(Path(path).resolve().relative_to(r.parent)) for r in roots  # noqa: E731
                                 if Path(path).resolve().is_relative_to(r)), path)
        out.writerow({"family": p.family, "seed": p.seed, "layers": p.layers, "dataset": p.dataset, "metric": p.metric,
                      "compute": p.compute, "ne": p.ne,
                      "valid_ne": final.get("metrics", {}).get("valid", {}).get("ne"), "flops_per_example": p.flops_per_example,
                      "executed_flops_per_example": final.get("flops_per_example"),
                      "train_compute_total": final.get("useful_train_compute", final.get("train_compute")),
                      "best_epoch": final.get("best_epoch"), "epochs_run": final.get("epochs_run"),
                      "best_step": final.get("best_step"), "steps": final.get("steps"), "code": p.code,
                      "run": rel(p.source), "point": rel(p.point) if p.point else ""})


if __name__ == "__main__":
    main(sys.argv[1:])
