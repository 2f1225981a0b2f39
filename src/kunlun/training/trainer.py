"""The training loop: two optimizers, warm-up + schedule, early stopping on validation NE,
optional bf16 autocast, checkpoints, resume, and a progress bar with examples/s and running loss.

Determinism: the epoch-e shuffle comes from ``seed + e``, torch's RNG is seeded from ``seed`` and saved
in checkpoints (so are the stochastic-rounding generators of low-precision emulation), so the same seed and
config give the same metrics on the same machine, and a resumed run continues exactly where the interrupted
one stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kunlun import ops
from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import Config
from kunlun.console import log, stderr
from kunlun.data.batches import Batcher
from kunlun.data.prepare import Prepared
from kunlun.errors import KunlunError
from kunlun.files import atomic_write_text
from kunlun.formats.gemm import apply_precision, load_precision_state, precision_state
from kunlun.metrics import MetricAccumulator
from kunlun.models import RankingModel, build_model
from kunlun.runs import code_version, environment
from kunlun.training.checkpoint import load_trainer_state, load_weights, save_checkpoint
from kunlun.training.step import (  # noqa: F401  (autocast, lr_factor, make_optimizers, set_seed: re-exported)
    NonFiniteLoss,
    TrainModel,
    TrainStep,
    autocast,
    default_device,
    lr_factor,
    make_optimizers,
    make_schedulers,
    set_seed,
    to_device,
)

TRAIN_FLOPS_FACTOR = 3  # backward ≈ 2 × forward for every matmul


@torch.no_grad()
def predict(model: RankingModel, batcher: Batcher, batch_size: int, bf16: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, labels and groups of every row of ``batcher``'s split, in row order."""
    model.eval()
    device = next(model.parameters()).device
    probs, labels, groups = [], [], []
    for batch in batcher.iterate(batch_size):
        with autocast(device, bf16):
            logits = model(to_device(batch, device))
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        labels.append(batch.label.numpy())
        groups.append(batch.group.numpy())
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(groups)


def evaluate(model: RankingModel, data: Prepared, split: str, max_len: int, batch_size: int, bf16: bool = False) -> dict[str, float]:
    """Metrics of ``split``. The split's predictions go to the accumulator in one update, so NE, logloss and
    calibration are bit-identical to the numbers of earlier runs (per-batch updates would change the order of the
    float64 sums, hence the last bits; AUC and gAUC would not change)."""
    probs, labels, groups = predict(model, Batcher(data, split, max_len, model.event_windows), batch_size, bf16)
    acc = MetricAccumulator(data.train_ctr)
    acc.update(labels, probs, groups)
    return acc.compute()


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_ne: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: float = 0.0
    train_examples: int = 0
    best_examples: int = 0  # training examples seen when the best checkpoint was saved
    code_versions: list = field(default_factory=list)  # every code version that trained this run (resume may change it)


def build(cfg: Config, data: Prepared) -> RankingModel:
    return build_from_info(cfg, FeatureInfo.from_encoder(data.encoder(), cfg.data.max_seq_len))


def build_from_info(cfg: Config, info: FeatureInfo) -> RankingModel:
    """The model of ``cfg``, with its emulated low-precision GEMMs (none for fp32) — for training and for reloading.
    Selects the process's op implementations (``train.ops``) too."""
    ops.use(cfg.train.ops)
    model = build_model(cfg.model, info)
    apply_precision(model, cfg.precision, cfg.train.seed)
    return model


USEFUL_FLOPS_SAMPLE = 100_000  # rows: exact below this, a fixed random sample above (a full pass over 100M rows is not worth it)


@torch.no_grad()
def useful_flops(model: RankingModel, batcher: Batcher, batch_size: int) -> float:
    """Mean useful (unpadded) forward FLOPs per example over ``batcher``'s split: every row when the split
    has at most ``USEFUL_FLOPS_SAMPLE``, else a sample of that many rows drawn with a fixed seed."""
    n = len(batcher)
    if n <= USEFUL_FLOPS_SAMPLE:
        return model.useful_flops_per_example(batcher.iterate(batch_size))
    rows = np.sort(np.random.default_rng(0).choice(n, USEFUL_FLOPS_SAMPLE, replace=False))
    return model.useful_flops_per_example(batcher.batch(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))


class Trainer:
    """Trains ``cfg.model`` on ``data``, writing the run record into ``run_dir``."""

    def __init__(self, cfg: Config, data: Prepared, run_dir: Path, progress: bool = True, logger: Callable[[str], None] = log):
        self.cfg, self.data, self.run_dir, self.progress, self.log = cfg, data, run_dir, progress, logger
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        set_seed(t.seed)
        self.device = default_device()
        self.model = build(cfg, data).to(self.device)
        self.optimizers = make_optimizers(self.model, t)
        self.train_batches = Batcher(data, "train", cfg.data.max_seq_len, self.model.event_windows)
        self.steps_per_epoch = math.ceil(len(self.train_batches) / t.batch_size)
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.schedulers = make_schedulers(self.optimizers, t, self.total_steps)
        self.train_step = TrainStep(TrainModel(self.model, t.bf16), self.optimizers, self.schedulers, t.grad_clip)
        self.useful_flops = useful_flops(self.model, self.train_batches, t.eval_batch_size)
        self.state = TrainState()
        self.history: list[dict[str, Any]] = []
        if "valid" not in data.splits:
            raise KunlunError(f"dataset {data.name!r} has no validation split for early stopping")

    # ------------------------------------------------------------------ record
    def start_record(self) -> None:
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        (d / "environment.json").write_text(json.dumps({**environment(), "data": self.data.fingerprint()}, indent=1))
        self.data.encoder().save(d / "encoder")

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "train_state": vars(self.state).copy(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "torch_rng": torch.get_rng_state(),
            "precision_rng": precision_state(self.model),  # stochastic rounding's generators
            "history": self.history,
        }

    def resume(self, checkpoint: Path) -> None:
        load_weights(checkpoint, self.model)
        st = load_trainer_state(checkpoint)
        self.state = TrainState(**st["train_state"])
        for o, s in zip(self.optimizers, st["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, st["schedulers"]):
            sch.load_state_dict(s)
        torch.set_rng_state(st["torch_rng"])
        load_precision_state(self.model, st.get("precision_rng", []))
        self.history = st["history"]
        self.log(f"resumed from {checkpoint} after epoch {self.state.epoch} (step {self.state.step})")

    # ------------------------------------------------------------------ loop
    def train_epoch(self, epoch: int) -> float:
        t = self.cfg.train
        self.model.train()
        rng = np.random.default_rng(t.seed + epoch)
        total_loss, n_seen = 0.0, 0
        steps = min(self.steps_per_epoch, self.total_steps - self.state.step)
        columns = [TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[speed]:>7.0f} ex/s  loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
        with Progress(*columns, console=stderr, disable=not self.progress, transient=False) as bar:
            task = bar.add_task("train", total=steps, epoch=epoch + 1, speed=0.0, loss=float("nan"))
            t0 = time.perf_counter()
            for i, batch in enumerate(self.train_batches.iterate(t.batch_size, rng)):
                if i >= steps:
                    break
                batch = to_device(batch, self.device)
                try:
                    loss, _ = self.train_step(batch)
                except NonFiniteLoss:
                    raise KunlunError(
                        f"non-finite training loss at step {self.state.step + 1} (epoch {epoch + 1}); stopped. "
                        f"The last good checkpoint is in {self.run_dir / 'checkpoints'}"
                    ) from None
                self.state.step += 1
                total_loss += loss.item() * len(batch)
                n_seen += len(batch)
                elapsed = time.perf_counter() - t0
                bar.update(task, advance=1, speed=n_seen / max(elapsed, 1e-9), loss=total_loss / n_seen)
        self.state.train_seconds += time.perf_counter() - t0
        self.state.train_examples += n_seen
        return total_loss / max(n_seen, 1)

    def fit(self) -> dict[str, Any]:
        t, cfg = self.cfg.train, self.cfg
        code = code_version()
        if self.state.step and not self.state.code_versions:  # a checkpoint from before code versions were recorded
            self.state.code_versions.append({"commit": None, "source_sha256": None, "label": "unknown (before provenance)"})
        if not any(c.get("source_sha256") == code["source_sha256"] for c in self.state.code_versions):
            if self.state.code_versions:
                self.log(f"note: this run was started by code {self.state.code_versions[0].get('label')} and continues "
                         f"with {code['label']}; its record lists both")
            self.state.code_versions.append(code)
        ckpt_dir = self.run_dir / "checkpoints"
        if not (self.run_dir / "config.yaml").is_file():
            self.start_record()
        wall0 = time.perf_counter()
        while self.state.epoch < t.epochs and self.state.step < self.total_steps:
            epoch = self.state.epoch
            e0 = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            valid = evaluate(self.model, self.data, "valid", cfg.data.max_seq_len, t.eval_batch_size, t.bf16)
            self.state.epoch += 1
            improved = valid["ne"] < self.state.best_ne
            if improved:
                self.state.best_ne, self.state.best_epoch, self.state.bad_epochs = valid["ne"], epoch + 1, 0
                self.state.best_examples = self.state.train_examples
                save_checkpoint(ckpt_dir / "best", self.model, cfg.to_dict())
            else:
                self.state.bad_epochs += 1
            record = {"epoch": epoch + 1, "step": self.state.step, "train_loss": train_loss, "valid": valid,
                      "seconds": time.perf_counter() - e0}
            self.history.append(record)
            with open(self.run_dir / "epochs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(ckpt_dir / "last", self.model, cfg.to_dict(), self.checkpoint_state())
            self.log(f"epoch {epoch + 1}: train loss {train_loss:.4f}  valid NE {valid['ne']:.4f}  AUC {valid['auc']:.4f}"
                     + ("  (best)" if improved else ""))
            if self.state.bad_epochs >= t.patience > 0:
                self.log(f"early stop: no validation NE improvement for {t.patience} epoch(s)")
                break
        return self.finish(time.perf_counter() - wall0)

    def finish(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        load_weights(self.run_dir / "checkpoints" / "best", self.model)
        metrics, eval_seconds, eval_examples = {}, 0.0, 0
        for split in ("valid", "test"):
            if split in self.data.splits:
                e0 = time.perf_counter()
                metrics[split] = evaluate(self.model, self.data, split, cfg.data.max_seq_len, cfg.train.eval_batch_size, cfg.train.bf16)
                eval_seconds += time.perf_counter() - e0
                eval_examples += metrics[split]["examples"]
        final = {
            "code": code_version(),
            "code_versions": self.state.code_versions,
            "model": cfg.model.name,
            "dataset": self.data.name,
            "seed": cfg.train.seed,
            "metrics": metrics,
            "best_epoch": self.state.best_epoch,
            "epochs_run": self.state.epoch,
            "steps": self.state.step,
            "train_ctr": self.data.train_ctr,
            # FLOPs (README "FLOPs"): executed = every padded sequence slot, as the dense kernels compute them;
            # useful = only each example's real tokens (mean over the training split). Training compute C =
            # forward FLOPs/example × 3 (forward + backward) × training examples processed (in all, and up to the
            # best checkpoint); embedding lookups count 0 FLOPs.
            "flops_per_example": self.model.flops_per_example(),
            "useful_flops_per_example": self.useful_flops,
            "train_examples": self.state.train_examples,
            "train_compute": TRAIN_FLOPS_FACTOR * self.model.flops_per_example() * self.state.train_examples,
            "train_compute_at_best": TRAIN_FLOPS_FACTOR * self.model.flops_per_example() * self.state.best_examples,
            "useful_train_compute": TRAIN_FLOPS_FACTOR * self.useful_flops * self.state.train_examples,
            "useful_train_compute_at_best": TRAIN_FLOPS_FACTOR * self.useful_flops * self.state.best_examples,
            "flops_by_component": self.model.flops_by_component(),
            "parameters": self.model.num_parameters(),
            "wall_time_s": wall,
            "train_examples_per_s": self.state.train_examples / max(self.state.train_seconds, 1e-9),
            "eval_examples_per_s": eval_examples / max(eval_seconds, 1e-9),
        }
        atomic_write_text(self.run_dir / "final.json", json.dumps(final, indent=1))
        return final
