"""The scoring server (``kunlun serve RUN_OR_PACKAGE``): an HTTP JSON API over a ``Scorer``.

    POST /score    one example object, a list of them, or {"examples": [...]} → {"probabilities": [...]}
                   in request order; 400 naming the field and what was expected for a malformed request,
                   413 for a body or request too large, 503 + Retry-After when the queue is full
    GET  /health   {"status": "ok", runtime, queue depth, requests and examples served, peak memory, …}
    GET  /schema   the fields one example takes (with a valid example), the model and its code version

Server stack: **aiohttp** (aio-libs, maintained since 2014, C-accelerated HTTP parser, asyncio). One
well-kept package gives both the server and the HTTP client that ``kunlun bench serve`` and the tests load it
with; the alternative (Starlette + uvicorn, plus httpx for the client) is three. It is an optional extra,
``pip install "kunlun[serve]"``: training, evaluation and export need no web server, and a model exported here
can be served by anything that loads a PT2 package.

Micro-batching: request handlers (on the event loop) parse and validate their examples, then queue them; a
scoring thread takes queued requests together — up to ``max_batch`` examples, waiting at most ``max_wait_ms``
after the oldest request arrived for more to join (the latency budget) — encodes them in one pass with the run's
encoder and has them scored in one model call by its scoring process (``--workers``, ``kunlun.serving.workers``:
a model call in this process would hold up request parsing, see there); it waits on the pipe with the GIL free,
so the loop keeps accepting requests meanwhile. ``--workers 0`` (or a scorer built in memory) scores on a thread
of this process. The queue is bounded in examples (``max_queue``): a request that does not fit gets 503 with
``Retry-After`` instead of growing memory. A request is validated before it is queued, so a malformed one never
reaches a batch; if a batch still fails, its requests are scored one by one so only the one at fault gets the
error.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kunlun.console import log
from kunlun.errors import KunlunError
from kunlun.serving.examples import ExampleError, RawExamples, concat_examples, parse_examples
from kunlun.serving.export import Scorer, load_scorer
from kunlun.serving.options import ServeOptions
from kunlun.serving.workers import ScoringProcess

try:
    from aiohttp import web
except ImportError:  # pragma: no cover - the extra is not installed
    web = None


def require_aiohttp() -> None:
    if web is None:
        raise KunlunError('kunlun serve needs aiohttp: pip install "kunlun[serve]"')


class QueueFull(Exception):
    """No room in the queue for a request's examples now."""


@dataclass
class Pending:
    examples: RawExamples
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Queues validated requests and scores them in batches on one thread (see the module docstring)."""

    def __init__(self, scorer: Scorer, opts: ServeOptions, loop: asyncio.AbstractEventLoop):
        self.scorer, self.opts, self.loop = scorer, opts, loop
        self.queue: deque[Pending] = deque()
        self.queued = 0  # examples in the queue
        self.cond = threading.Condition()
        self.stopped = False
        self.stats = {"requests": 0, "examples": 0, "batches": 0, "rejected_full": 0, "failed": 0, "split_batches": 0}
        # two scoring threads per scoring process: each takes a batch, encodes it, sends it and waits for the
        # probabilities with the GIL free; the process scores one batch at a time, so while it scores one thread's
        # batch the other encodes the next (one thread alone left the process idle for that time: ~60 % busy
        # under load). A scorer not loaded from a file (built in memory) is scored on one thread of this process.
        self.processes = []
        if opts.workers and getattr(scorer, "source", None):
            runtime = scorer.runtime if scorer.runtime in ("aoti", "exported_program") else "auto"
            for _ in range(opts.workers):
                self.processes.append(ScoringProcess(scorer.source, runtime, opts.threads))
        scorers = [replace(scorer, fn=p) for p in self.processes for _ in range(2)] or [scorer]
        self.threads = [threading.Thread(target=self._run, args=(s,), name=f"kunlun-scorer-{i}", daemon=True)
                        for i, s in enumerate(scorers)]
        for t in self.threads:
            t.start()

    def submit(self, examples: RawExamples) -> asyncio.Future:
        """Queue ``examples``; the returned future gets their probabilities. Raises QueueFull."""
        fut = self.loop.create_future()
        with self.cond:
            if self.stopped or self.queued + examples.n > self.opts.max_queue:
                self.stats["rejected_full"] += 1
                raise QueueFull
            self.queue.append(Pending(examples, fut))
            self.queued += examples.n
            self.cond.notify()
        return fut

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=10)
        for p in self.processes:
            p.close()

    def peak_rss_mb(self) -> float:
        """This process's peak RSS plus each scoring process's (as last reported)."""
        return peak_rss_mb() + sum(p.peak_rss_mb for p in self.processes)

    def _take(self) -> list[Pending] | None:
        """The next batch: wait for a request, then up to max_wait_ms (from its arrival) for more."""
        opts = self.opts
        with self.cond:
            while not self.queue and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return None
            deadline = self.queue[0].queued_at + opts.max_wait_ms / 1000
            while self.queued < opts.max_batch and not self.stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            batch, n = [], 0
            while self.queue and (not batch or n + self.queue[0].examples.n <= opts.max_batch):
                p = self.queue.popleft()
                batch.append(p)
                n += p.examples.n
            self.queued -= n
            return batch

    def _run(self, scorer: Scorer) -> None:
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        while (batch := self._take()) is not None:
            live = [p for p in batch if not p.future.done()]  # a client that gave up (timeout, disconnect) is skipped
            if live:
                self._score(live, scorer)

    def _score(self, batch: list[Pending], scorer: Scorer) -> None:
        try:
            probs = scorer.score_examples(concat_examples([p.examples for p in batch]))
        except Exception as exc:
            if len(batch) > 1:  # isolate the request at fault; the others are scored alone
                self.stats["split_batches"] += 1
                for p in batch:
                    self._score([p], scorer)
                return
            self.stats["failed"] += 1
            self._resolve(batch[0].future, exc)
            return
        self.stats["batches"] += 1
        start = 0
        for p in batch:
            self.stats["requests"] += 1
            self.stats["examples"] += p.examples.n
            self._resolve(p.future, probs[start : start + p.examples.n])
            start += p.examples.n

    def _resolve(self, fut: asyncio.Future, value: Any) -> None:
        def set_value():
            if fut.done():
                return
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

        self.loop.call_soon_threadsafe(set_value)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def error(status: int, message: str, field: str | None = None, headers: dict | None = None):
    body = {"error": message, **({"field": field} if field else {})}
    return web.json_response(body, status=status, headers=headers)


def make_app(scorer: Scorer, opts: ServeOptions | None = None):
    """The aiohttp application; its micro-batcher starts with the app and stops on cleanup."""
    require_aiohttp()
    opts = opts or ServeOptions()
    app = web.Application(client_max_size=int(opts.max_body_mb * 2**20))
    schema = scorer.encoder.schema
    started = time.time()
    meta = scorer.meta
    info = {"model": meta.get("model"), "dataset": meta.get("dataset"), "runtime": scorer.runtime,
            "code_version": meta.get("code_version"), "trained_code_version": meta.get("trained_code_version")}

    async def start_batcher(app):
        app["batcher"] = MicroBatcher(scorer, opts, asyncio.get_running_loop())

    async def stop_batcher(app):
        await asyncio.get_running_loop().run_in_executor(None, app["batcher"].close)

    app.on_startup.append(start_batcher)
    app.on_cleanup.append(stop_batcher)

    async def score(request):
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, f"request body: larger than {opts.max_body_mb:g} MB (--max-body-mb)")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return error(400, f"request body: expected JSON ({exc})")
        try:
            examples = parse_examples(payload, schema)
        except ExampleError as exc:
            return error(400, str(exc), exc.field)
        if examples.n > opts.max_queue:
            return error(413, f"request: {examples.n} examples, at most {opts.max_queue} per request (--max-queue)")
        batcher: MicroBatcher = request.app["batcher"]
        try:
            fut = batcher.submit(examples)
        except QueueFull:
            return error(503, f"server busy: {batcher.queued} examples queued (--max-queue {opts.max_queue}); retry later",
                         headers={"Retry-After": "1"})
        try:
            probs = await asyncio.wait_for(fut, opts.timeout_s)
        except asyncio.TimeoutError:
            return error(503, f"not scored within {opts.timeout_s:g} s (--timeout-s); retry later", headers={"Retry-After": "1"})
        except Exception as exc:  # validation passed but scoring failed: this request only
            return error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        return web.Response(body=json.dumps({"probabilities": np.asarray(probs, dtype=np.float64).tolist()}),
                            content_type="application/json")

    async def health(request):
        b: MicroBatcher = request.app["batcher"]
        return web.json_response({"status": "ok", **info, "uptime_s": round(time.time() - started, 1), "queued_examples": b.queued,
                                  "max_queue": opts.max_queue, **b.stats, "peak_rss_mb": round(b.peak_rss_mb(), 1),
                                  "scoring_processes": [p.stats() for p in b.processes],
                                  "options": asdict(opts)})

    async def schema_view(request):
        return web.json_response({**info, "max_len": scorer.max_len, "schema": scorer.request_schema,
                                  "inputs": meta.get("inputs"), "dynamic": meta.get("dynamic")})

    app.router.add_post("/score", score)
    app.router.add_get("/health", health)
    app.router.add_get("/schema", schema_view)
    return app


async def start_server(scorer: Scorer, host: str = "127.0.0.1", port: int = 0, opts: ServeOptions | None = None):
    """Start serving in the running loop; returns (runner, bound port). Stop with ``await runner.cleanup()``."""
    runner = web.AppRunner(make_app(scorer, opts), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise KunlunError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
    bound = runner.addresses[0][1]
    return runner, bound


def serve(scorer: Scorer, host: str, port: int, opts: ServeOptions, announce: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (SIGINT / SIGTERM); ``announce`` gets the URL once listening."""
    require_aiohttp()
    import signal

    async def main():
        runner, bound = await start_server(scorer, host, port, opts)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        (announce or (lambda m: print(m, file=sys.stderr, flush=True)))(f"http://{host}:{bound}")
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


def serve_target(target: Path, host: str, port: int, runtime: str = "auto", opts: ServeOptions | None = None,
                 logger: Callable[[str], None] = log) -> None:
    """What ``kunlun serve`` does: ``target`` (a package from ``export_package``, or a run directory) loaded with
    ``runtime`` (``load_scorer``) and served until interrupted; ``logger`` gets a line naming the model, its runtime
    and the URL once listening. A missing aiohttp is named before the model loads."""
    require_aiohttp()
    opts = opts or ServeOptions()
    scorer = load_scorer(target, runtime, opts.threads)
    serve(scorer, host, port, opts, lambda url: logger(f"kunlun: serving {scorer.meta.get('model')} ({scorer.runtime}) on {url}"))
