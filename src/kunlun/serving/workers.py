"""Scoring processes: the server's model calls run in child processes, so request parsing never waits on them.

Why processes and not a thread: an AOTInductor model holds the GIL for the whole call (its runner does not release
it), and an exported program releases and re-takes it at every small op, so a busy event loop delays it by up to
the interpreter's switch interval each time. Measured on the 2-core CPU (default Kunlun, 256-example requests):
a thread scoring beside the request-parsing loop took as long as the two run one after the other. A child
process owns its interpreter: the server process parses JSON, validates and encodes; the child only runs the
model on the encoded tensors, sent as NumPy arrays over a pipe (one batch of 256 examples is ~0.6 MB, well under
a millisecond to pass).

``ScoringProcess`` is a drop-in ``Scorer.fn``: called with ``ScoringModule``'s arguments it sends them to its
child and returns the probabilities; the child loads the same package or run (``load_scorer``) once at start.
A child that dies is started again and the batch it held is sent once more.
"""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

READY_TIMEOUT_S = 600  # loading a compiled package can take a while on a busy machine


class ScoringProcessError(RuntimeError):
    """The scoring process failed a batch, or could not start."""


def _child(conn, target: str, runtime: str, threads: int) -> None:
    """The child's loop: load the scorer, then answer (inputs) → ("ok", probabilities, peak RSS MB) until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then stops its children
    from kunlun.serving.export import load_scorer

    try:
        scorer = load_scorer(target, runtime, threads)
    except Exception as exc:  # sent back whole: the server reports it as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", scorer.runtime))
    with torch.inference_mode():
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the server went away
                return
            if msg is None:
                return
            try:
                probs = scorer.fn(*tree_map(torch.from_numpy, msg)).float().numpy()
                conn.send(("ok", probs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ScoringProcess:
    """One child process scoring for one server thread (calls are not concurrent: one per instance at a time)."""

    def __init__(self, target: str, runtime: str, threads: int):
        self.target, self.runtime, self.threads = target, runtime, threads
        self.peak_rss_mb = 0.0
        self.lock = threading.Lock()
        self.proc = self.conn = None
        self.start()

    def start(self) -> None:
        # a fresh interpreter (`python -m kunlun.serving.workers`) on one end of a socket pair, not multiprocessing's
        # fork (the server already runs threads, torch's included) or spawn (which re-runs the caller's main script)
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "kunlun.serving.workers", str(theirs.fileno()), self.target,
                                      self.runtime, str(self.threads)], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        status, detail = "error", f"not ready within {READY_TIMEOUT_S} s"
        try:
            if self.conn.poll(READY_TIMEOUT_S):
                status, detail = self.conn.recv()
        except EOFError:
            status, detail = "error", f"exited with code {self.proc.wait(5)}"
        if status != "ready":
            self.close()
            raise ScoringProcessError(f"scoring process could not load {self.target}: {detail}")

    def __call__(self, *inputs) -> torch.Tensor:
        """``ScoringModule``'s arguments (CPU tensors) → probabilities [B] float32, scored in the child. A child found
        dead, or dying with the batch, is replaced and the batch sent once more (a batch that kills two children in
        a row fails with ScoringProcessError)."""
        arrays = tree_map(lambda t: t.numpy() if isinstance(t, torch.Tensor) else t, inputs)
        with self.lock:
            for attempt in range(2):
                if self.proc is None or self.proc.poll() is not None:
                    self.close()
                    self.start()
                try:
                    self.conn.send(arrays)
                    reply = self.conn.recv()
                    break
                except (EOFError, OSError):
                    code = self._reap()
                    if attempt:
                        raise ScoringProcessError(f"scoring process exited (code {code}) twice on this batch") from None
        if reply[0] != "ok":
            raise ScoringProcessError(reply[1])
        self.peak_rss_mb = max(self.peak_rss_mb, reply[2])
        return torch.from_numpy(np.asarray(reply[1]))

    def _reap(self) -> int | None:
        """The exit code of a child that closed its end (killing it if it has not exited within 5 s)."""
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.conn.close()
        self.proc = None

    def stats(self) -> dict[str, Any]:
        return {"pid": self.proc.pid if self.proc else None, "peak_rss_mb": round(self.peak_rss_mb, 1)}


if __name__ == "__main__":  # the child: python -m kunlun.serving.workers FD TARGET RUNTIME THREADS
    _child(Connection(int(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4]))
