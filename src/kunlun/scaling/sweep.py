"""Compute sweeps: a grid of ordinary training runs, run as separate processes within a thread budget.

A sweep file (YAML)::

    name: kunlun-ml-latest-small      # default output folder: sweeps/<name>
    model: kunlun
    dataset: ml-latest-small
    config: null                      # optional base config file (default: the model's packaged config)
    overrides: [train.patience=0]     # applied to every point
    mode: zip                         # zip: the i-th value of every axis together; product: every combination
    axes:
      model.d_model: [4, 8, 16, 32]
      train.max_steps: [150, 300, 600, 1200]
    seeds: [0]
    noise: {seeds: [1, 2], points: [0, -1]}   # extra seeds at some points (indices into the point list)
    parallel: 2                       # processes at once
    threads: 1                        # torch threads per process
    launcher_options: {}              # for --launcher ray (ray.remote options: num_cpus, num_gpus) or submitit
                                      # (executor.update_parameters: timeout_min, slurm_partition, gpus_per_node, …)

Each (point, seed) is a normal run record under ``<out>/points/<label>/seed<k>`` whose ``final.json``
also holds its training compute C (``train_compute``). A finished point is skipped when its config and
the code that trained it (source hash) match the current ones (``reuse_stale`` keeps finished points of
other code too); an interrupted one is resumed when it was started by the current code; anything else
there is restarted — so a killed sweep continues where it stopped, and never mixes code versions silently.
Training processes die with the sweep (``kunlun.processes.die_with_parent``), and a point whose run directory
is locked by a process still training it is reported as failed, never restarted beside that process.
The same file runs unchanged on a GPU machine (the device is chosen per run), and on a cluster: ``--launcher ray``
or ``--launcher submitit`` (SLURM) run each training command there instead of as a child process here
(``kunlun.scaling.launchers``); reuse, resume, locks and logs are the same on every launcher.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kunlun.config import dataclass_from_dict, load_config, read_yaml
from kunlun.console import log, stderr
from kunlun.errors import KunlunError
from kunlun.files import atomic_write_text
from kunlun.model_configs import DEFAULT_MODEL
from kunlun.processes import lock_holder
from kunlun.runs import code_version, has_weights, read_json, reuse_state, run_code
from kunlun.scaling.launchers import check_launcher, make_launcher


@dataclass
class NoiseSpec:
    seeds: list[int] = field(default_factory=list)
    points: list[int] = field(default_factory=list)


@dataclass
class SweepSpec:
    name: str = "sweep"
    model: str = DEFAULT_MODEL
    dataset: str = "ml-latest-small"
    config: str | None = None
    data_dir: str | None = None
    overrides: list[str] = field(default_factory=list)
    mode: str = "product"
    axes: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    parallel: int = 1
    threads: int = 1
    launcher_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    label: str
    seed: int
    overrides: list[str]
    run_dir: Path


def load_sweep(path: Path) -> SweepSpec:
    raw = read_yaml(Path(path))
    try:
        spec = dataclass_from_dict(SweepSpec, raw, "sweep")
    except KunlunError as exc:
        raise KunlunError(f"{path}: {exc}") from None
    if spec.mode not in ("zip", "product"):
        raise KunlunError(f"{path}: key mode: expected zip or product, got {spec.mode!r}")
    if not spec.axes:
        raise KunlunError(f"{path}: key axes: expected at least one axis, e.g. model.d_model: [8, 16, 32]")
    for key, values in spec.axes.items():
        if "." not in key or not isinstance(values, list) or not values:
            raise KunlunError(f"{path}: axis {key!r}: expected a 'section.key' name with a non-empty list of values")
    if spec.mode == "zip" and len({len(v) for v in spec.axes.values()}) > 1:
        raise KunlunError(f"{path}: mode zip needs axes of equal length, got {({k: len(v) for k, v in spec.axes.items()})}")
    if spec.parallel < 1 or spec.threads < 0:
        raise KunlunError(f"{path}: keys parallel (>= 1) and threads (>= 0) are out of range")
    try:  # every point's config, now: a typo fails with the file's name, not in hour two
        validate(spec, jobs(spec, Path(spec.name)))
    except KunlunError as exc:
        raise KunlunError(f"{path}: {exc}") from None
    return spec


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The sweep's points in file order: each a {axis key: value} dict."""
    keys = list(spec.axes)
    rows = zip(*spec.axes.values()) if spec.mode == "zip" else itertools.product(*spec.axes.values())
    return [dict(zip(keys, row)) for row in rows]


def label(point: dict[str, Any]) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())


def jobs(spec: SweepSpec, out: Path) -> list[Job]:
    pts = points(spec)
    seeds_at = [list(spec.seeds) for _ in pts]
    for i in spec.noise.points:
        if not -len(pts) <= i < len(pts):
            raise KunlunError(f"sweep noise.points: index {i} is outside the {len(pts)} points")
        seeds_at[i] += [s for s in spec.noise.seeds if s not in seeds_at[i]]
    out_jobs = []
    for pt, seeds in zip(pts, seeds_at):
        lab = label(pt)
        extra = [*spec.overrides, *(f"{k}={json.dumps(v)}" for k, v in pt.items())]
        out_jobs += [Job(lab, s, extra, out / "points" / lab / f"seed{s}") for s in seeds]
    return out_jobs


def job_config(spec: SweepSpec, job: Job, threads: int = 0) -> dict[str, Any]:
    """The resolved config the job's ``kunlun train`` process runs with (``data.data_dir`` aside)."""
    cfg = load_config(Path(spec.config) if spec.config else None, job.overrides, model=spec.model, dataset=spec.dataset,
                      seed=job.seed, threads=threads)
    return cfg.to_dict()


def validate(spec: SweepSpec, all_jobs: list[Job]) -> None:
    """Every point's config must load before any process starts (a typo fails now, not in hour two)."""
    for job in all_jobs:
        try:
            job_config(spec, job)
        except KunlunError as exc:
            raise KunlunError(f"sweep point {job.label}: {exc}") from None


def job_state(spec: SweepSpec, job: Job, threads: int) -> str:
    """``fresh`` / ``stale`` / ``config differs`` / ``missing``: see ``kunlun.runs.reuse_state``."""
    return reuse_state(job.run_dir, job_config(spec, job, threads))[0]


def resumable(job: Job) -> bool:
    """An interrupted run started by the code running now (a run is never continued by other code)."""
    codes = run_code(job.run_dir)
    return (has_weights(job.run_dir / "checkpoints" / "last") and (job.run_dir / "config.yaml").is_file()
            and bool(codes) and all(c.get("source_sha256") == code_version()["source_sha256"] for c in codes))


def command(spec: SweepSpec, job: Job, data_dir: str | None, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "kunlun", "train", "--quiet", "--json"]
    if read_json(job.run_dir / "final.json") is None and resumable(job):
        return [*cmd, "--resume", str(job.run_dir)]
    if job.run_dir.exists():
        # killed before its first checkpoint, or trained by other code or config: start again (the seed makes it identical)
        shutil.rmtree(job.run_dir)
    cmd += ["--model", spec.model, "--dataset", spec.dataset, "--seed", str(job.seed), "--run-dir", str(job.run_dir)]
    if spec.config:
        cmd += ["--config", spec.config]
    if data_dir or spec.data_dir:
        cmd += ["--data-dir", str(data_dir or spec.data_dir)]
    return [*cmd, *job.overrides, f"train.threads={threads}"]


def default_out(spec: SweepSpec) -> Path:
    """Where a sweep writes when no folder is given: ``sweeps/<name>``."""
    return Path("sweeps") / spec.name


def check_parallel(parallel: int | None) -> None:
    if parallel is not None and parallel < 1:
        raise KunlunError(f"--parallel: expected >= 1, got {parallel}")


def open_sweep(sweep_file: Path, out: Path | None = None, parallel: int | None = None, launcher: str = "local") -> tuple[SweepSpec, Path]:
    """The sweep file read and the command's settings checked, before anything runs: (spec, output folder, by default
    ``default_out``)."""
    check_launcher(launcher)
    spec = load_sweep(sweep_file)
    check_parallel(parallel)
    return spec, out or default_out(spec)


def plan(spec: SweepSpec, out: Path, threads: int | None = None) -> list[tuple[Job, str]]:
    """Every job with its state (``fresh`` / ``stale`` / ``config differs`` / ``missing``), after checking that every
    point's config loads — what ``kunlun sweep --dry-run`` lists; nothing is trained or written."""
    all_jobs = jobs(spec, out)
    validate(spec, all_jobs)
    t = spec.threads if threads is None else threads
    return [(j, job_state(spec, j, t)) for j in all_jobs]


def run_sweep(spec: SweepSpec, out: Path, data_dir: str | None = None, parallel: int | None = None, threads: int | None = None,
              on_done: Callable[[Job, str], None] | None = None, reuse_stale: bool = False, launcher: str = "local") -> dict[str, Any]:
    """Run every (point, seed) not yet complete with the current code and config; return {"done", "skipped",
    "failed"} lists of run dirs. ``launcher``: where the training commands run (``kunlun.scaling.launchers``)."""
    check_parallel(parallel)
    check_launcher(launcher)
    if launcher != "local":  # the commands run elsewhere, maybe in another working directory
        out = out.absolute()
    all_jobs = jobs(spec, out)
    validate(spec, all_jobs)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "w") as lock:
        try:  # one sweep per folder: two would train the same points into the same run directories
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise KunlunError(f"{out}: another sweep is running in this folder") from None
        return _run_jobs(spec, out, all_jobs, data_dir, parallel or spec.parallel, spec.threads if threads is None else threads, on_done,
                         reuse_stale, launcher)


def plan_lines(spec: SweepSpec, out: Path, threads: int | None = None) -> list[str]:
    """``plan`` as ``kunlun sweep --dry-run`` prints it: label, seed, state and overrides of each run, tab-separated."""
    return [f"{j.label}\tseed {j.seed}\t{state}\t{' '.join(j.overrides)}" for j, state in plan(spec, out, threads)]


def run_sweep_reported(spec: SweepSpec, out: Path, data_dir: str | None = None, parallel: int | None = None,
                       threads: int | None = None, reuse_stale: bool = False, launcher: str = "local", progress: bool = True,
                       logger: Callable[[str], None] = log) -> dict[str, Any]:
    """``run_sweep`` as ``kunlun sweep`` runs it: a line saying how many runs there are and how many are complete, a
    progress bar on stderr, a line of counts at the end. Failure policy: every run is tried and the others go on
    when one fails; then, if any failed, a KunlunError names the first (rerunning the sweep retries only those)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    all_jobs = jobs(spec, out)
    todo = len(pending(spec, all_jobs, spec.threads if threads is None else threads, reuse_stale))
    logger(f"sweep {spec.name}: {len(all_jobs)} runs, {len(all_jobs) - todo} already complete; output {out}"
           + (f"; launcher {launcher}" if launcher != "local" else ""))
    columns = [TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[last]}")]
    with Progress(*columns, console=stderr, disable=not progress) as bar:
        task = bar.add_task("sweep", total=todo, last="")
        result = run_sweep(spec, out, data_dir, parallel, threads,
                           on_done=lambda job, status: bar.update(task, advance=1, last=f"{job.label} seed {job.seed}: {status}"),
                           reuse_stale=reuse_stale, launcher=launcher)
    logger(f"sweep {spec.name}: {len(result['done'])} run, {len(result['skipped'])} skipped, {len(result['failed'])} failed")
    if result["failed"]:
        raise KunlunError(f"{len(result['failed'])} sweep run(s) failed, first: {result['failed'][0]} (rerun the sweep to retry them)")
    return result


def run_sweep_file(sweep_file: Path, out: Path | None = None, data_dir: str | None = None, parallel: int | None = None,
                   threads: int | None = None, dry_run: bool = False, reuse_stale: bool = False,
                   launcher: str = "local") -> dict[str, Any] | None:
    """What ``kunlun sweep`` does: the sweep file opened and the settings checked (``open_sweep``); with ``dry_run`` its
    plan printed on stdout (``plan_lines``) and None returned, else the sweep run (``run_sweep_reported``)."""
    spec, out = open_sweep(sweep_file, out, parallel, launcher)
    if dry_run:
        for line in plan_lines(spec, out, threads):
            print(line, flush=True)
        return None
    return run_sweep_reported(spec, out, data_dir, parallel, threads, reuse_stale, launcher)


def pending(spec: SweepSpec, all_jobs: list[Job], threads: int, reuse_stale: bool = False) -> list[Job]:
    """The jobs to (re)run: not finished, or finished with another config or (unless ``reuse_stale``) other code."""
    keep = ("fresh", "stale") if reuse_stale else ("fresh",)
    return [j for j in all_jobs if job_state(spec, j, threads) not in keep]


def _run_jobs(spec: SweepSpec, out: Path, all_jobs: list[Job], data_dir, parallel: int, threads: int, on_done,
              reuse_stale: bool, launcher: str = "local") -> dict[str, Any]:
    atomic_write_text(out / "sweep.json", json.dumps({"spec": dataclasses.asdict(spec), "jobs": [
        {"label": j.label, "seed": j.seed, "overrides": j.overrides, "run_dir": str(j.run_dir.relative_to(out))} for j in all_jobs]}, indent=1))
    (out / "logs").mkdir(exist_ok=True)
    todo = pending(spec, all_jobs, threads, reuse_stale)
    result: dict[str, list[str]] = {"done": [], "skipped": [str(j.run_dir) for j in all_jobs if j not in todo], "failed": []}
    runner = make_launcher(launcher, out, spec.launcher_options) if todo else None

    running: set = set()
    guard = threading.Lock()
    stopping = False

    def run_one(job: Job) -> tuple[Job, str]:
        log_path = out / "logs" / f"{job.label}-seed{job.seed}.log"
        holder = lock_holder(job.run_dir)
        if holder:  # e.g. a training process of an earlier sweep that outlived it: neither remove nor train beside it
            return job, f"failed (run directory {job.run_dir} is in use by process {holder})"
        with guard:
            if stopping:
                return job, "failed (the sweep was stopped)"
            proc = runner.start(command(spec, job, data_dir, threads), log_path)
            running.add(proc)
        try:
            returncode = proc.wait()
        finally:
            with guard:
                running.discard(proc)
        ok = returncode == 0 and read_json(job.run_dir / "final.json") is not None
        return job, "done" if ok else f"failed (exit {returncode}; see {log_path})"

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_one, j) for j in todo]
        try:
            for fut in as_completed(futures):
                job, status = fut.result()
                result["done" if status == "done" else "failed"].append(str(job.run_dir))
                if on_done:
                    on_done(job, status)
        except BaseException:  # Ctrl-C or SIGTERM: stop the training processes (each keeps its last checkpoint), then go
            with guard:
                stopping = True
                for f in futures:
                    f.cancel()
                for proc in running:
                    proc.terminate()
            raise
    return result

