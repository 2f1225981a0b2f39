"""Fault injection for training: does a run survive what happens to real runs, and does it end as if nothing happened?

Every fault hits real ``kunlun train`` / ``kunlun sweep`` / ``kunlun eval`` processes of a tiny Kunlun on the embedded
ml-latest-small (2 epochs, a checkpoint every few steps), compared with one uninterrupted reference run of the same
config and seed:

* kill -9 at random times (twice per run), then ``--resume`` until done: final metrics and epoch records must equal
  the reference bit for bit, no temporary checkpoint left;
* a truncated / bit-flipped file of ``checkpoints/last`` (``--resume``) or ``checkpoints/best`` (``eval``): exit 2,
  one line naming the file, no file changed;
* a full disk while checkpointing (``RLIMIT_FSIZE`` in the child: Python ignores SIGXFSZ, so the write fails with
  EFBIG as a full disk fails with ENOSPC) and while starting a run: exit 2, one line, the previous checkpoint
  byte-identical, no temporary file; then, with room again, ``--resume`` ends with the reference's metrics;
* two ``train`` processes started together on one run directory, and a ``--resume`` of a run that is training:
  one trains, the other exits 2 ("in use by process N"), the record is the reference's;
* a sweep killed with kill -9: its training process must die with it, and the rerun sweep finishes the point with
  the reference's metrics.

"Data lost" counts runs whose record ended different from the reference or whose files were changed by a refused
command. Run from the repository root (about 10 minutes on 2 busy cores)::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/reliability.py [--kills 3] [--seed 0] [--keep DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from kunlun.processes import lock_holder  # noqa: E402
from kunlun.training.checkpoint import verify_checkpoint  # noqa: E402

MODEL = ["model.d_model=16", "model.num_layers=1", "model.num_heads=2", "model.num_seeds=4", "model.seq_summary_tokens=2",
         "model.summary_tokens=2", "model.fm_hidden=32", "model.output_hidden=[32]", "data.max_seq_len=8"]
TRAIN = ["train.epochs=2", "train.patience=0", "train.batch_size=4096", "train.warmup_steps=5", "train.checkpoint_every_steps=4",
         "train.threads=1"]
OVERRIDES = MODEL + TRAIN


class Bench:
    def __init__(self, work: Path, seed: int):
        self.work, self.rng = work, random.Random(seed)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
                    "KUNLUN_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
        self.rows: list[dict] = []
        self.reference: dict | None = None
        self.reference_records: list[dict] | None = None

    # ------------------------------------------------------------------ processes
    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kunlun", *map(str, args)]

    def start(self, args: list[str], log: Path, fsize: int | None = None) -> subprocess.Popen:
        cmd = self.cmd(*args)
        if fsize is not None:  # the child may write no file larger than fsize bytes
            cmd = [sys.executable, "-c", f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
                                         f"sys.argv = ['kunlun', *{list(map(str, args))!r}]; runpy.run_module('kunlun', run_name='__main__')"]
        return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=self.env, cwd=self.work)

    def run(self, args: list[str], fsize: int | None = None) -> tuple[int, str]:
        log = self.work / "logs" / f"{time.monotonic_ns()}.log"
        p = self.start(args, log, fsize)
        rc = p.wait()
        return rc, log.read_text()

    def train_args(self, run: Path) -> list[str]:
        return ["train", "--quiet", "--json", "--run-dir", str(run), *OVERRIDES]

    def resume_args(self, run: Path) -> list[str]:
        return ["train", "--quiet", "--json", "--resume", str(run)]

    # ------------------------------------------------------------------ checks
    @staticmethod
    def files(d: Path) -> dict[str, str]:
        """{path: sha256} of the files a user has in ``d``: not the lock file, nor what a kill inside a checkpoint swap
        left (``.last.old``, ``.last.tmp…``, which the next resume removes or puts back)."""
        return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)}

    @staticmethod
    def records(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "epochs.jsonl").read_text().splitlines()]

    @staticmethod
    def one_error_line(output: str, needle: str) -> bool:
        lines = output.strip().splitlines()
        errors = [line for line in lines if line.startswith("kunlun: error:")]
        return "Traceback" not in output and errors == lines[-1:] and needle in errors[0]

    @staticmethod
    def no_leftovers(run: Path) -> bool:
        ckpts = run / "checkpoints"
        return not ckpts.is_dir() or all(not p.name.startswith(".") for p in ckpts.iterdir())

    def identical(self, run: Path) -> bool:
        final = json.loads((run / "final.json").read_text()) if (run / "final.json").is_file() else None
        if final is None:
            return False
        keys = ("metrics", "steps", "epochs_run", "best_epoch", "train_examples")
        same = all(final[k] == self.reference[k] for k in keys) and self.records(run) == self.reference_records
        for name in ("best", "last"):
            verify_checkpoint(run / "checkpoints" / name)
        return same and self.no_leftovers(run)

    def row(self, fault: str, injected: int, handled: int, recovered: str, lost: int, note: str = "") -> None:
        self.rows.append({"fault": fault, "injected": injected, "handled": handled, "recovered": recovered, "lost": lost, "note": note})
        print(f"  {fault}: injected {injected}, handled {handled}, recovered {recovered}, data lost {lost}  {note}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ scenarios
    def make_reference(self) -> float:
        run = self.work / "reference"
        t0 = time.perf_counter()
        rc, out = self.run(self.train_args(run))
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"reference run failed:\n{out}")
        self.reference = json.loads((run / "final.json").read_text())
        self.reference_records = self.records(run)
        print(f"reference: {self.reference['steps']} steps in {wall:.1f}s, test NE {self.reference['metrics']['test']['ne']:.6f}",
              file=sys.stderr, flush=True)
        return wall

    def kills(self, n_runs: int, wall: float) -> None:
        injected = handled = recovered = lost = 0
        resumed_at = []
        for i in range(n_runs):
            run, kills = self.work / f"killed{i}", 0
            for _ in range(3):  # up to two kills per run, each at a random moment of what the process has left; then to the end
                # before its config.yaml is written a run directory holds nothing (a new start); after, --resume continues it
                args = self.resume_args(run) if (run / "config.yaml").is_file() else self.train_args(run)
                log = self.work / "logs" / f"killed{i}-{kills}.log"
                p = self.start(args, log)
                try:
                    p.wait(timeout=self.rng.uniform(0.15, 0.9) * wall if kills < 2 else None)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    kills += 1
                    continue
                break
            logs = " ".join((self.work / "logs" / f"killed{i}-{k}.log").read_text() for k in range(kills + 1))
            resumed_at.append("/".join(re.findall(r"\(step\s+(\d+)\)", logs)) or "new start")  # "resumed from … (step N)"
            ok = p.returncode == 0 and self.identical(run)
            injected += kills
            handled += kills if ok else 0
            recovered += ok
            lost += not ok
        self.row("kill -9 at a random time, then --resume", injected, handled, f"{recovered}/{n_runs} runs", lost,
                 f"resumed at steps {', '.join(resumed_at)} of {self.reference['steps']} (per run)")

    def stopped_run(self, name: str, min_step: int = 24) -> Path:
        """A run killed -9 once checkpoints/last holds at least ``min_step`` steps (past epoch 1: best exists too)."""
        run = self.work / name
        p = self.start(self.train_args(run), self.work / "logs" / f"{name}.log")
        manifest = run / "checkpoints" / "last" / "manifest.json"
        while p.poll() is None:
            try:
                if json.loads(manifest.read_text())["step"] >= min_step:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (run / "final.json").is_file():
            raise SystemExit(f"{name}: finished before it could be stopped")
        return run

    def corruption(self, base: Path) -> None:
        injected = handled = lost = 0
        cases = [("last", name, how) for name in ("model.safetensors", "trainer_state.pt", "config.yaml", "manifest.json")
                 for how in ("truncate", "flip")] + [("best", "model.safetensors", how) for how in ("truncate", "flip")]
        for which, name, how in cases:
            run = self.work / f"corrupt-{which}-{name}-{how}"
            shutil.copytree(base, run)
            path = run / "checkpoints" / which / name
            data = bytearray(path.read_bytes())
            if how == "truncate":
                data = data[: self.rng.randrange(len(data))]
            else:
                at = self.rng.randrange(max(len(data) - 64, 1))
                for j in range(at, min(at + 64, len(data))):
                    data[j] ^= 0xFF
            path.write_bytes(bytes(data))
            before = self.files(run)
            args = self.resume_args(run) if which == "last" else ["eval", str(run / "checkpoints" / "best"), "--json"]
            rc, out = self.run(args)
            injected += 1
            needle = "manifest.json" if name == "manifest.json" else str(path)
            ok = rc == 2 and self.one_error_line(out, needle)
            handled += ok
            lost += self.files(run) != before
        self.row("truncated / 64 flipped bytes in a checkpoint file", injected, handled, "n/a (refused, nothing changed)", lost,
                 "resume of last (4 files × 2), eval of best (weights × 2)")

    def full_disk(self, base: Path) -> None:
        injected = handled = lost = 0
        last = base / "checkpoints" / "last"
        weights, state = (last / "model.safetensors").stat().st_size, (last / "trainer_state.pt").stat().st_size
        recovered_run = None
        for label, fsize in (("weights", weights // 2), ("trainer state", (weights + state) // 2)):
            run = self.work / f"disk-{label.replace(' ', '-')}"
            shutil.copytree(base, run)
            before = self.files(run / "checkpoints")
            rc, out = self.run(self.resume_args(run), fsize=fsize)
            injected += 1
            needle = "could not write the checkpoint: File too large (EFBIG); the previous checkpoint there is unchanged"
            ok = rc == 2 and self.one_error_line(out, needle)
            ok = ok and self.files(run / "checkpoints") == before and self.no_leftovers(run)
            handled += ok
            lost += self.files(run / "checkpoints") != before
            recovered_run = run
        # a new run on a disk too full for its record: nothing half-made is left
        run = self.work / "disk-new"
        rc, out = self.run(self.train_args(run), fsize=4096)
        injected += 1
        ok = rc == 2 and self.one_error_line(out, "could not write") and not run.exists()
        handled += ok
        rc, _ = self.run(self.resume_args(recovered_run))  # room again
        same = rc == 0 and self.identical(recovered_run)
        lost += not same
        self.row("full disk (EFBIG via RLIMIT_FSIZE)", injected, handled, f"{int(same)}/1 runs", lost,
                 "while writing weights, trainer state, a new run's record")

    def concurrent(self) -> None:
        injected = handled = recovered = lost = 0
        run = self.work / "concurrent"
        a, b = (self.start(self.train_args(run), self.work / "logs" / f"concurrent-{x}.log") for x in "ab")
        rcs = [a.wait(), b.wait()]
        outs = [(self.work / "logs" / f"concurrent-{x}.log").read_text() for x in "ab"]
        injected += 1
        refused = [o for rc, o in zip(rcs, outs) if rc == 2]
        ok = sorted(rcs) == [0, 2] and (self.one_error_line(refused[0], "is in use by process")
                                        or self.one_error_line(refused[0], "already exists and is not empty"))
        same = self.identical(run)
        handled += ok
        recovered += same
        lost += not same
        # --resume of a run that is training
        run = self.work / "resume-while-training"
        p = self.start(self.train_args(run), self.work / "logs" / "busy.log")
        while not (lock_holder(run) and (run / "config.yaml").is_file()) and p.poll() is None:
            time.sleep(0.05)
        rc, out = self.run(self.resume_args(run))
        injected += 1
        ok = rc == 2 and self.one_error_line(out, f"run directory {run} is in use by process {p.pid}")
        same = p.wait() == 0 and self.identical(run)
        handled += ok
        recovered += same
        lost += not same
        self.row("two processes on one run directory", injected, handled, f"{recovered}/2 runs", lost,
                 "two simultaneous starts; --resume while training")

    def sweep(self) -> None:
        spec = self.work / "sweep.yaml"
        overrides = [o for o in OVERRIDES if not o.startswith(("train.threads", "model.d_model"))]
        spec.write_text(json.dumps({"name": "reliability", "model": "kunlun", "dataset": "ml-latest-small", "overrides": overrides,
                                    "axes": {"model.d_model": [16]}, "seeds": [0], "parallel": 1, "threads": 1}))
        out = self.work / "sweep"
        run = out / "points" / "d_model16" / "seed0"
        p = self.start(["sweep", str(spec), "--out", str(out)], self.work / "logs" / "sweep.log")
        while not (run / "checkpoints" / "last").is_dir() and p.poll() is None:
            time.sleep(0.05)
        child = lock_holder(run)
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 30
        while child and lock_holder(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        died = bool(child) and lock_holder(run) is None
        rc, _ = self.run(["sweep", str(spec), "--out", str(out)])
        same = rc == 0 and self.identical(run)
        self.row("sweep killed with kill -9", 1, int(died), f"{int(same)}/1 runs", int(not same),
                 f"training process {child} {'died with it' if died else 'outlived it'}; rerun sweep resumed the point")


def table(rows: list[dict]) -> str:
    lines = ["| fault | injected | handled as specified | recovered to identical metrics | data lost | what |", "|---|---:|---:|---|---:|---|"]
    lines += [f"| {r['fault']} | {r['injected']} | {r['handled']} | {r['recovered']} | {r['lost']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=3, help="runs killed (twice each) at random times")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary folder, removed)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    work = args.keep or Path(tempfile.mkdtemp(prefix="kunlun-reliability-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        b = Bench(work, args.seed)
        wall = b.make_reference()
        b.kills(args.kills, wall)
        base = b.stopped_run("stopped")
        b.corruption(base)
        b.full_disk(base)
        b.concurrent()
        b.sweep()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(b.rows, indent=1) if args.json else table(b.rows))
    print(f"\n{sum(r['injected'] for r in b.rows)} faults injected in {time.perf_counter() - t0:.0f}s; "
          f"data lost in {sum(r['lost'] for r in b.rows)} run(s)", file=sys.stderr)


if __name__ == "__main__":
    main()
