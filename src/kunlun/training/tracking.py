"""Experiment tracking of a run: TensorBoard event files while it trains, learning curves drawn when it ends.

    <run>/tensorboard/   event files (``train.tensorboard=true``; the kunlun[tensorboard] extra), one scalar per tag:
                         train/loss, train/lr, train/examples_per_s, train/compute (FLOPs so far),
                         flops/executed_per_example, flops/useful_per_example, valid/<metric> (ne, auc, logloss, …)
    <run>/curves.png     training loss, validation NE and validation AUC against the optimizer step, drawn from
                         epochs.jsonl (one line per validation) after training ends

Watch a run with ``tensorboard --logdir runs`` (every run under ``runs/`` is one TensorBoard run).

Example::

    tracker = Tracker(run_dir, enabled=True)
    tracker.scalars(100, {"train/loss": 0.52, "train/lr": 1e-3})
    tracker.scalars(100, {"valid/ne": 0.93})
    tracker.close()
    draw_curves(run_dir)  # <run>/curves.png from <run>/epochs.jsonl
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

from kunlun.errors import KunlunError
from kunlun.files import atomic_write

TENSORBOARD_DIR = "tensorboard"
CURVES = "curves.png"
INSTALL = "pip install 'kunlun[tensorboard]'"


class Tracker:
    """Scalars of a run written as TensorBoard event files under ``<run>/tensorboard``; does nothing when not ``enabled``.

    Constructing it checks that TensorBoard is installed (a KunlunError naming the install command, before any file is
    written) but creates nothing: the event file is opened at the first ``scalars`` call, so a run that fails while
    it is set up leaves no directory behind. That first call's step also purges what an earlier process logged at
    that step or later (``SummaryWriter(purge_step=…)``): a resumed run's curves continue from its checkpoint instead
    of doubling back over the steps it trains again."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.run_dir, self.enabled, self.writer = Path(run_dir), enabled, None
        if enabled and importlib.util.find_spec("tensorboard") is None:
            raise KunlunError(f"config key train.tensorboard: TensorBoard is not installed; {INSTALL} (or set train.tensorboard=false)")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Write each ``tag: value`` at optimizer step ``step``, then flush (what is logged is on disk if the run dies)."""
        if not self.enabled:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=step)
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_validations(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``<run>/epochs.jsonl`` (one per validation: its step, training loss and validation metrics)."""
    path = Path(run_dir) / "epochs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw_curves(run_dir: Path, title: str = "") -> Path | None:
    """Draw ``<run>/curves.png``: training loss, validation NE and validation AUC against the optimizer step, one point
    per line of epochs.jsonl, the best validation NE marked. Returns the file, or None when the run has no validation
    yet (nothing is written). Drawn on a plain Agg canvas: no pyplot, no global backend switched."""
    records = [r for r in read_validations(run_dir) if isinstance(r.get("valid"), dict)]
    if not records:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r.get("step", r.get("epoch")) for r in records]
    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    panels = [("training loss (running mean of the epoch)", [r.get("train_loss") for r in records]),
              ("validation NE", [r["valid"].get("ne") for r in records]),
              ("validation AUC", [r["valid"].get("auc") for r in records])]
    for i, (name, values) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        points = [(s, v) for s, v in zip(steps, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3)
        if name == "validation NE" and points:
            best = min(points, key=lambda p: p[1])
            ax.plot(*best, marker="*", markersize=12, color="tab:red", linestyle="none", label=f"best {best[1]:.4f} (step {best[0]})")
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    # fixed margins rather than tight_layout, which draws the figure once more to measure it (a third of the time)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.8 if title else 0.88, wspace=0.22)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    path = Path(run_dir) / CURVES
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path
