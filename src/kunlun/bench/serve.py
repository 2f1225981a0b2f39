"""``kunlun bench serve``: load a scoring server on loopback and report QPS, latency percentiles, errors and memory.

The server runs as its own process (``kunlun serve … --port 0``, as in production), the load from this one
(aiohttp client, request bodies encoded once beforehand, so the client spends its time on HTTP alone). The
requests are real rows — the run's dataset's test split (else valid) turned into examples as a client would
send them (histories cut to the ``max_seq_len`` newest events, all the model reads). Two kinds of phase, each
bounded by a duration and a request count:

- closed loop: C clients, each sending its next request when the previous one is answered (concurrency
  levels × examples per request): throughput;
- open loop: requests started at a fixed rate whatever the answers, latency measured from each request's
  scheduled start (a slow answer cannot hide the requests that queue behind it): latency at a given load.

Both machines' cores are shared: on a 2-core CPU the client takes part of the CPU the server would have.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kunlun.console import log
from kunlun.errors import KunlunError


@dataclass(frozen=True)
class Phase:
    """closed: ``concurrency`` clients back to back; open: ``rate`` requests/s. Both: ``examples`` per request."""

    mode: str
    examples: int
    concurrency: int = 0
    rate: float = 0.0

    @property
    def label(self) -> str:
        return f"closed c={self.concurrency}" if self.mode == "closed" else f"open {self.rate:g} req/s"


def load_phases(batches: list[int], concurrency: list[int], rates: list[float]) -> list[Phase]:
    """A closed-loop phase for every (examples per request, clients) pair, then an open-loop phase of single-example
    requests for every positive rate."""
    return [Phase("closed", b, concurrency=c) for b in batches for c in concurrency] + [Phase("open", 1, rate=r) for r in rates if r > 0]


def server_args(options: dict[str, Any]) -> list[str]:
    """Server settings by name (``max_batch=256``, ``runtime="auto"``, …) as the ``kunlun serve`` arguments that set
    them: the server process checks them as ``kunlun serve`` would."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def request_rows(target: Path, data_dir: str | None, n: int) -> list[dict[str, Any]]:
    """n real examples for ``target`` (a run or package): rows of its dataset's test split (else valid), each
    history cut to the ``max_seq_len`` newest events — all the model reads, so what a client would send."""
    from kunlun.data.registry import load_raw
    from kunlun.serving.examples import examples_from_raw
    from kunlun.serving.export import is_package, read_meta

    if is_package(target):
        cfg = read_meta(target)["config"]
    else:
        from kunlun.config import load_config
        from kunlun.runs import resolve_run

        _, ckpt = resolve_run(target)
        cfg = load_config(ckpt / "config.yaml").to_dict()
    raw = load_raw(cfg["data"]["dataset"], data_dir or cfg["data"].get("data_dir"))
    split = "test" if "test" in raw.splits else "valid"
    rows = np.arange(len(raw.splits[split]))
    if len(rows) > n:
        rows = np.sort(np.random.default_rng(0).choice(rows, n, replace=False))
    return examples_from_raw(raw, split, rows, newest=cfg["data"]["max_seq_len"])


class ServerProcess:
    """``kunlun serve`` in a subprocess on a free loopback port; ``url`` once it listens."""

    def __init__(self, target: Path, args: list[str], startup_s: float = 600):
        cmd = [sys.executable, "-m", "kunlun", "serve", str(target), "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + startup_s
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.stop()
            raise KunlunError(f"{target}: the server did not start: {' | '.join(self.lines[-3:]) or 'no output'}")
        log(f"bench serve: server up at {self.url} ({self.lines[-1].strip()})")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def percentile_ms(lat: list[float], q: float) -> float | None:
    return float(np.percentile(lat, q) * 1000) if lat else None


def summarise(phase: Phase, lat: list[float], statuses: list[int], seconds: float) -> dict[str, Any]:
    ok = [t for t, s in zip(lat, statuses) if s == 200]
    errors: dict[str, int] = {}
    for s in statuses:
        if s != 200:
            errors[str(s)] = errors.get(str(s), 0) + 1
    n = len(statuses)
    return {
        "phase": phase.label, "mode": phase.mode, "concurrency": phase.concurrency or None, "rate": phase.rate or None,
        "examples_per_request": phase.examples, "requests": n, "errors": n - len(ok), "error_statuses": errors,
        "seconds": round(seconds, 3), "qps": n / seconds if seconds else 0.0,
        "examples_per_s": len(ok) * phase.examples / seconds if seconds else 0.0,
        "p50_ms": percentile_ms(ok, 50), "p95_ms": percentile_ms(ok, 95), "p99_ms": percentile_ms(ok, 99),
        "max_ms": max(ok) * 1000 if ok else None,
    }


async def _post(session, url: str, body: bytes) -> int:
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return r.status
    except Exception:  # connection refused / reset: counted as an error, status 0
        return 0


async def run_phase(url: str, phase: Phase, bodies: list[bytes], duration_s: float, max_requests: int) -> dict[str, Any]:
    import aiohttp

    lat: list[float] = []
    statuses: list[int] = []
    score = url + "/score"
    limit = max(phase.concurrency, 1) if phase.mode == "closed" else 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout) as session:
        start = time.perf_counter()
        stop_at = start + duration_s
        if phase.mode == "closed":
            counter = iter(range(max_requests))

            async def client():
                for i in counter:
                    if time.perf_counter() >= stop_at:
                        return
                    t = time.perf_counter()
                    statuses.append(await _post(session, score, bodies[i % len(bodies)]))
                    lat.append(time.perf_counter() - t)

            await asyncio.gather(*(client() for _ in range(phase.concurrency)))
        else:
            total = min(max_requests, int(phase.rate * duration_s))

            async def one(i: int, scheduled: float):
                status = await _post(session, score, bodies[i % len(bodies)])
                statuses.append(status)
                lat.append(time.perf_counter() - scheduled)  # from the scheduled start: no coordinated omission

            tasks = []
            for i in range(total):
                scheduled = start + i / phase.rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, scheduled)))
            await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    return summarise(phase, lat, statuses, seconds)


async def get_json(url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.json()


def make_bodies(rows: list[dict[str, Any]], per_request: int, count: int = 64) -> list[bytes]:
    """Up to ``count`` distinct request bodies of ``per_request`` examples each (cycling over ``rows``)."""
    bodies = []
    for k in range(count):
        a = (k * per_request) % len(rows)
        chunk = [rows[(a + j) % len(rows)] for j in range(per_request)]
        bodies.append(json.dumps(chunk[0] if per_request == 1 else {"examples": chunk}).encode())
        if per_request * (k + 1) >= len(rows):
            break
    return bodies


def run_serve_bench(target: Path, phases: list[Phase], *, duration_s: float = 10.0, max_requests: int = 20000,
                    data_dir: str | None = None, server_args: list[str] = (), rows: int = 4096) -> dict[str, Any]:
    """Start the server on ``target``, run every phase, stop it; the result holds one row per phase and the
    server's health (peak memory, runtime)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise KunlunError('kunlun bench serve needs aiohttp: pip install "kunlun[serve]"') from None
    if duration_s <= 0 or max_requests < 1:
        raise KunlunError("--duration and --max-requests: expected positive values")
    examples = request_rows(target, data_dir, rows)
    bodies = {e: make_bodies(examples, e) for e in sorted({p.examples for p in phases})}
    server = ServerProcess(target, list(server_args))
    try:
        asyncio.run(run_phase(server.url, Phase("closed", 1, concurrency=2), bodies[min(bodies)], 2.0, 200))  # warm-up
        results = []
        for phase in phases:
            r = asyncio.run(run_phase(server.url, phase, bodies[phase.examples], duration_s, max_requests))
            log(f"bench serve: {phase.label}, {phase.examples} ex/request: {r['qps']:.0f} req/s, {r['examples_per_s']:.0f} ex/s, "
                f"p99 {r['p99_ms'] or float('nan'):.1f} ms, {r['errors']} errors")
            results.append(r)
        health = asyncio.run(get_json(server.url + "/health"))
    finally:
        code = server.stop()
    return {"target": str(target), "runtime": health.get("runtime"), "model": health.get("model"), "phases": results,
            "server": {"peak_rss_mb": health.get("peak_rss_mb"), "batches": health.get("batches"), "requests": health.get("requests"),
                       "examples": health.get("examples"), "rejected_full": health.get("rejected_full"), "exit_code": code,
                       "options": health.get("options")},
            "duration_s": duration_s, "max_requests": max_requests}


def serve_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"`{result['target']}` ({result['model']}, runtime {result['runtime']}); server peak RSS "
             f"{fmt(result['server']['peak_rss_mb'], '{:.0f}')} MB, {result['server']['batches']} model batches", "",
             "| load | examples/request | requests | QPS | examples/s | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["phases"]:
        errs = f"{r['errors']}" + (f" ({', '.join(f'{k}: {v}' for k, v in r['error_statuses'].items())})" if r["errors"] else "")
        lines.append(f"| {r['phase']} | {r['examples_per_request']} | {r['requests']} | {r['qps']:,.0f} | {r['examples_per_s']:,.0f} | "
                     f"{fmt(r['p50_ms'])} | {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {errs} |")
    return "\n".join(lines)
