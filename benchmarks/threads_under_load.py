"""Is the default thread setting fast on a busy machine? Times a short training run (README command 1's job, cut to
``--steps`` optimizer steps) with the default threads and with ``train.threads=1`` / ``2``, alternating, on a quiet
machine and beside ``--busy`` processes that each spin a core (a fixed synthetic load), and prints the median wall
time of each (setting, condition) and its ratio to the best setting of the condition.

    python benchmarks/threads_under_load.py --rounds 3 --steps 30 --busy 2 [--env OMP_WAIT_POLICY=ACTIVE]

``--env`` sets variables for the timed runs (e.g. ``OMP_WAIT_POLICY=ACTIVE``: OpenMP's spinning wait, what kunlun
ran with before it asked for the passive one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"default": [], "threads=1": ["train.threads=1"], "threads=2": ["train.threads=2"]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed_run(extra: list[str], steps: int, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kunlun", "train", "--quiet", "--run-dir", f"{tmp}/run",
                        f"train.max_steps={steps}", "train.epochs=1", *extra], check=True, env=env, capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--busy", type=int, default=2, help="spinning processes in the loaded condition")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the timed runs")
    ap.add_argument("--conditions", default="quiet,loaded")
    args = ap.parse_args()
    env = {**os.environ, **dict(e.split("=", 1) for e in args.env)}
    env.pop("OMP_NUM_THREADS", None)  # the settings under test choose the threads
    times: dict[str, dict[str, list[float]]] = {}
    for condition in args.conditions.split(","):
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy if condition == "loaded" else 0)]
        try:
            for r in range(args.rounds):
                for name, extra in SETTINGS.items():
                    t = timed_run(extra, args.steps, env)
                    times.setdefault(condition, {}).setdefault(name, []).append(t)
                    print(f"{condition} round {r} {name}: {t:.1f} s", flush=True)
        finally:
            for p in busy:
                p.kill()
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "steps": args.steps, "busy": args.busy, "env": args.env, "medians": {}}
    for condition, by in times.items():
        med = {n: statistics.median(v) for n, v in by.items()}
        best = min(med.values())
        result["medians"][condition] = {n: {"seconds": round(m, 2), "vs_best": round(m / best, 3), "runs": by[n]} for n, m in med.items()}
        print(f"{condition}: " + ", ".join(f"{n} {m:.1f} s ({m / best:.2f}× best)" for n, m in med.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
