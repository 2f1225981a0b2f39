"""Where a sweep's training commands run: here (``local``, the default), on a Ray cluster (``ray``), or through
submitit (``submitit``: SLURM where ``sbatch`` is found, else submitit's local executor) — ``kunlun sweep --launcher``.

A launcher only runs one job's command line and reports its exit status; everything else — which points are
finished and reused, which interrupted ones are resumed, the run-directory locks, the logs, stopping — is the sweep's
own (``kunlun.scaling.sweep``), so a sweep behaves the same on every launcher. The command runs where the launcher
puts it, so the sweep folder, the data and this Python environment must be reachable there under the same paths
(a shared file system, as for any cluster job). Ray and submitit are optional extras: ``pip install "kunlun[ray]"`` /
``"kunlun[submitit]"``; asking for one that is not installed is a one-line error.

Example::

    launcher = make_launcher("ray", out=Path("sweeps/s"), options={"num_cpus": 1})
    job = launcher.start(["python", "-m", "kunlun", "train", ...], Path("sweeps/s/logs/a.log"))
    code = job.wait()
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from typing import Any, Protocol

from kunlun.errors import KunlunError
from kunlun.processes import child_env

LAUNCHERS = ("local", "ray", "submitit")


class Job(Protocol):
    def wait(self) -> int: ...

    def terminate(self) -> None: ...


def run_logged(cmd: list[str], log_path: str) -> int:
    """Run ``cmd`` with its output appended to ``log_path``, as a child that dies with this process; its exit status.
    What a Ray task or a submitit job executes (wherever it runs)."""
    with open(log_path, "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env()).returncode


class LocalJob:
    def __init__(self, cmd: list[str], log_path: Path):
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())

    def wait(self) -> int:
        return self.proc.wait()

    def terminate(self) -> None:
        self.proc.terminate()


class Local:
    """Each command a child process of this one."""

    name = "local"

    def start(self, cmd: list[str], log_path: Path) -> Job:
        return LocalJob(cmd, log_path)


class Ray:
    """Each command a Ray task (``options``: ``ray.remote`` options, e.g. ``num_cpus``, ``num_gpus``) on the cluster at
    ``$RAY_ADDRESS``, or on a local cluster started for the sweep when it is not set."""

    name = "ray"

    def __init__(self, options: dict[str, Any]):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.ray = ray
        self.task = ray.remote(**{"num_cpus": 1, "max_retries": 0, **options})(run_logged)

    def start(self, cmd: list[str], log_path: Path) -> Job:
        ray, ref = self.ray, self.task.remote(cmd, str(log_path))

        class RayJob:
            def wait(self) -> int:
                return ray.get(ref)

            def terminate(self) -> None:
                ray.cancel(ref, force=True)  # ends the worker; the training process dies with it

        return RayJob()


class Submitit:
    """Each command a submitit job: on SLURM when ``sbatch`` is there, else submitit's local executor. ``options`` go
    to ``executor.update_parameters`` (``timeout_min``, ``cpus_per_task``, ``gpus_per_node``, ``slurm_partition``, …);
    submitit's own files go to ``<out>/submitit``."""

    name = "submitit"

    def __init__(self, out: Path, options: dict[str, Any]):
        import submitit

        self.executor = submitit.AutoExecutor(folder=out / "submitit")
        self.executor.update_parameters(**{"timeout_min": 24 * 60, **options})

    def start(self, cmd: list[str], log_path: Path) -> Job:
        job = self.executor.submit(run_logged, cmd, str(log_path))

        class SubmititJob:
            def wait(self) -> int:
                try:
                    return int(job.result())
                except Exception:  # the job itself failed (killed, timed out): submitit raises its error here
                    return 1

            def terminate(self) -> None:
                job.cancel(check=False)

        return SubmititJob()


def check_launcher(name: str) -> None:
    """KunlunError (one line) for an unknown launcher or one whose package is not installed, before any work."""
    if name not in LAUNCHERS:
        raise KunlunError(f"--launcher {name}: expected one of {', '.join(LAUNCHERS)}")
    if name != "local" and importlib.util.find_spec(name) is None:
        raise KunlunError(f"--launcher {name}: {name} is not installed; pip install \"kunlun[{name}]\" (or run the sweep here with "
                          f"--launcher local)")


def make_launcher(name: str, out: Path, options: dict[str, Any] | None = None) -> Local | Ray | Submitit:
    check_launcher(name)
    if name == "ray":
        return Ray(options or {})
    if name == "submitit":
        return Submitit(out, options or {})
    return Local()
