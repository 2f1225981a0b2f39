"""Keep a study's finished run records without their checkpoints, so that a study longer than one machine's life
can be continued on the next machine.

A finished run's record is its config.yaml, final.json (metrics, compute, the code that trained it),
environment.json and epochs.jsonl: about 16 kB, where its checkpoints and encoder take megabytes. ``kunlun sweep``
skips a run whose record is present with the same config and the same source hash, and ``kunlun fit`` reads points
from records alone, so records committed to the repository are enough to continue and refit a study:

    python benchmarks/run_records.py save WORK DEST      # copy each finished run's record under WORK to DEST
    python benchmarks/run_records.py restore DEST WORK   # put records back where WORK has no such run yet

Paths under DEST mirror WORK (``<sweep>/points/<label>/seed<k>/``). ``save`` overwrites older copies; ``restore``
never touches a run folder that WORK already has (it may be training).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

RECORD_FILES = ("config.yaml", "final.json", "environment.json", "epochs.jsonl")


def finished_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` with a final.json (finished runs), sorted."""
    return sorted(p.parent for p in root.rglob("final.json") if (p.parent / "config.yaml").is_file())


def copy_record(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save(work: Path, dest: Path) -> int:
    runs = finished_runs(work)
    for run in runs:
        copy_record(run, dest / run.relative_to(work))
    return len(runs)


def restore(dest: Path, work: Path) -> int:
    n = 0
    for run in finished_runs(dest):
        target = work / run.relative_to(dest)
        if not target.exists():
            copy_record(run, target)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "restore"])
    ap.add_argument("source", type=Path)
    ap.add_argument("target", type=Path)
    a = ap.parse_args(argv)
    if not a.source.is_dir():
        print(f"run_records.py: {a.source}: no such folder", file=sys.stderr)
        return 2
    n = (save if a.action == "save" else restore)(a.source, a.target)
    print(f"{a.action}: {n} run record(s) {a.source} -> {a.target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
