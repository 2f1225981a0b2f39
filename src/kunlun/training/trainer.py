"""The training loop: two optimizers, warm-up + schedule, early stopping on validation NE (or AUC),
optional bf16 autocast, checkpoints, resume, and a progress bar with examples/s and running loss.

Validation: at every epoch's end and, with ``train.eval_every_steps`` = N, every N steps inside it (as recommender
data wants: one pass over a large split is one long epoch). Each validation is a line of ``epochs.jsonl`` (epoch, step,
training examples seen, running training loss, validation metrics), may write ``checkpoints/best`` (so the best
checkpoint is kept at step granularity), counts towards early stopping (``train.patience`` validations without
improvement; an early stop inside an epoch ends the epoch there) and, with ``train.schedule=plateau``, may lower the
learning rates. ``train.recipe=one_pass`` is one epoch, the warm-up + schedule over it, validated
``ONE_PASS_VALIDATIONS`` times unless ``train.eval_every_steps`` says otherwise (``kunlun.config.RECIPES``).

Determinism: the epoch-e shuffle comes from ``seed + e`` (a full permutation, or with ``train.shuffle_block_rows`` a
block-wise one for a split larger than memory: ``kunlun.data.batches.shuffled_rows``), torch's RNG is seeded from ``seed`` and saved
in checkpoints (so are the stochastic-rounding generators of low-precision emulation), so the same seed and
config give the same metrics on the same machine, and a resumed run continues exactly where the interrupted
one stopped.

Checkpoints: ``checkpoints/best`` when the validation metric ``train.monitor`` (NE, or AUC) improves;
``checkpoints/last`` (with the trainer state) at every epoch end and, inside an epoch, every
``train.checkpoint_every_steps`` steps / ``checkpoint_every_minutes`` minutes. A mid-epoch checkpoint records the
position in the epoch and the epoch's running loss, so a resumed run skips the batches already trained on and ends
with the metrics of an uninterrupted one, bit for bit.

The loop does not synchronise with the device each step: batches are assembled ahead on a thread
(``Prefetcher``; pinned and copied asynchronously on a GPU), the running loss and the first non-finite step are
kept on the device (``NonFiniteWatch``) and read every ``SYNC_SECONDS``, before every checkpoint and at the
epoch's end. A non-finite loss therefore stops training up to half a second of steps after it happened (naming
the step where it happened), and since weights are only saved after a check, the last checkpoint is always good.

Several processes (``torchrun``, ``kunlun.training.distributed``): each rank trains on its share of every global
batch, so the state — steps, epoch position, the data order — is that of one process, and a checkpoint resumes at
any world size. The synchronisation points must then be the same steps on every rank: the first comes after one
step, and at each one the ranks agree (one all-gather) on the summed loss, the first non-finite step anywhere, rank
0's choice of the number of steps until the next one (about ``SYNC_SECONDS``) and whether a timed checkpoint is due.
Rank 0 alone writes the run record and ``checkpoints/best``; every rank writes its shard of ``checkpoints/last``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
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
from kunlun.config import ONE_PASS_VALIDATIONS, Config
from kunlun.console import log, stderr
from kunlun.data.batches import Batcher, Prefetcher
from kunlun.data.prepare import Prepared
from kunlun.data.registry import is_schema_file, keep_side_files
from kunlun.errors import KunlunError
from kunlun.files import atomic_dir, atomic_write_text, os_error_text
from kunlun.formats.gemm import apply_precision, load_precision_state, precision_state
from kunlun.metrics import MetricAccumulator
from kunlun.models import RankingModel, build_model
from kunlun.runs import SCHEMA_COPY, SIDE_COPY, code_version, environment
from kunlun.training.checkpoint import (
    full_state_dict,
    is_sharded,
    load_sharded,
    load_trainer_state,
    load_weights,
    read_manifest,
    save_checkpoint,
    save_sharded,
    verify_checkpoint,
)
from kunlun.training.distributed import (
    World,
    agree,
    all_gather,
    barrier,
    check_world,
    current,
    evaluate_sharded,
    rank_seed,
    shard_scale,
    wrap_for_training,
)
from kunlun.training.sharding import clip_sharded_grad_norm
from kunlun.training.step import (  # noqa: F401  (autocast, lr_factor, make_optimizers, set_seed: re-exported)
    NonFiniteLoss,
    NonFiniteWatch,
    TrainModel,
    TrainStep,
    autocast,
    default_device,
    lr_factor,
    make_optimizers,
    make_schedulers,
    set_seed,
)
from kunlun.training.torchrec_sharding import sharded_tables
from kunlun.training.tracking import Tracker

TRAIN_FLOPS_FACTOR = 3  # backward ≈ 2 × forward for every matmul
SYNC_SECONDS = 0.5  # the training loop reads the loss from the device (a host sync) at most this often, and before
# every checkpoint and validation
PLATEAU_FACTOR, PLATEAU_MIN_LR = 0.1, 1e-6  # train.schedule=plateau: each epoch without improvement, lr × 0.1 (≥ 1e-6)


@torch.no_grad()
def predict(model: RankingModel, batcher: Batcher, batch_size: int, bf16: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, labels and groups of every row of ``batcher``'s split, in row order: [n] float32, float32, int64.

    Written into arrays of the split's size as batches come (16 bytes per row in all): keeping each batch's output
    tensor instead pinned memory torch had allocated among the batch's freed temporaries, and grew the heap by
    ~800 bytes per row (3 GB for a 4M-row split)."""
    model.eval()
    device = next(model.parameters()).device
    n = len(batcher)
    probs, labels, groups = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.int64)
    done = 0
    for batch in batcher.iterate(batch_size):
        with autocast(device, bf16):
            logits = model(batch.to(device))
        k = len(batch)
        probs[done : done + k] = torch.sigmoid(logits.float()).cpu().numpy()
        labels[done : done + k] = batch.label.numpy()
        groups[done : done + k] = batch.group.numpy()
        done += k
    return probs, labels, groups


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
    best_ne: float = float("inf")  # valid NE of the best checkpoint (the best NE when train.monitor=ne)
    best_auc: float = float("-inf")  # valid AUC of the best checkpoint (the best AUC when train.monitor=auc)
    best_epoch: int = 0  # the epoch (1-based) of the best validation
    best_step: int = 0  # the optimizer step of the best validation
    bad_epochs: int = 0  # validations since the last improvement (epochs when validation is at epoch ends only)
    train_seconds: float = 0.0
    train_examples: int = 0
    best_examples: int = 0  # training examples seen when the best checkpoint was saved
    code_versions: list = field(default_factory=list)  # every code version that trained this run (resume may change it)
    # inside epoch ``epoch`` (a mid-epoch checkpoint): steps done, Σ loss × batch size, examples, training seconds
    epoch_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_examples: int = 0
    epoch_seconds: float = 0.0


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
# what each FLOP figure of a run record is (recorded beside them, so a record says which is which)
FLOPS_KINDS = {
    "flops_per_example": "executed: counted from the aten ops one forward dispatches, every padded slot (= executed_flops_per_example)",
    "useful_flops_per_example": "useful: analytic, each example's real tokens, mean over the training split",
    "analytic_flops_per_example": "analytic at every padded slot (a sliding window counted as its band)",
    "flops_by_component": "analytic at every padded slot, by component",
    "train_compute": "3 x executed x training examples", "useful_train_compute": "3 x useful x training examples",
}
EXECUTED_FLOPS_ROWS = 8  # rows of the forward executed FLOPs are counted on (per example they do not depend on it: tests)


def executed_flops(model: RankingModel, batcher: Batcher, device: torch.device | str = "cpu",
                   logger: Callable[[str], None] = log) -> tuple[float, bool]:
    """Executed forward FLOPs per example (``kunlun.models.flop_count``): counted over one forward of ``model`` on the
    split's first rows, padded as every batch is (``max_len``), with the op implementation selected now. A forward
    that runs a matrix-product op the counter has no formula for (a kernel of some other device or torch release) does
    not stop the run: the analytic figure at every padded slot stands in, and the log says so.
    → (FLOPs per example, whether they were counted)."""
    from kunlun.models.flop_count import UncountedOp

    batch = batcher.batch(np.arange(min(EXECUTED_FLOPS_ROWS, len(batcher)))).to(device)
    try:
        return model.executed_flops_per_example(batch), True
    except UncountedOp as e:
        logger(f"executed FLOPs not counted ({e}); the analytic figure at every padded slot stands in")
        return float(model.flops_per_example()), False


def flops_kinds(counted: bool) -> dict[str, str]:
    """``FLOPS_KINDS``, saying so where the executed figure is the analytic stand-in (``executed_flops``'s fallback)."""
    if counted:
        return FLOPS_KINDS
    return {**FLOPS_KINDS, "flops_per_example": "executed, NOT counted (an op of the forward had no FLOP formula): the "
                                                "analytic figure at every padded slot (= executed_flops_per_example)"}


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

    def __init__(self, cfg: Config, data: Prepared, run_dir: Path, progress: bool = True, logger: Callable[[str], None] = log,
                 world: World | None = None, on_validation: Callable[[dict[str, Any]], None] | None = None,
                 final_splits: tuple[str, ...] = ("valid", "test")):
        """``world``: the processes training together (default: this process's process group, if any); only rank 0
        logs, shows progress and writes the run record. ``on_validation``: called with each validation's record (the
        line of epochs.jsonl) once it is written, checkpoints included; what it raises stops training (a tuner's
        pruning). ``final_splits``: the splits final.json scores with the best checkpoint (a tuner: valid only)."""
        self.on_validation, self.final_splits = on_validation, final_splits
        self.world = w = current() if world is None else world
        check_world(cfg.train, w)
        if not w.main:
            progress, logger = False, _silent
        self.cfg, self.data, self.run_dir, self.progress, self.log = cfg, data, run_dir, progress, logger
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        set_seed(t.seed)
        self.device = w.device() if w.distributed else default_device()
        self.model = build(cfg, data).to(self.device)
        for note in self.model.config_notes():
            logger(f"note: {note}")
        self.parameter_counts = self.model.num_parameters()  # before TorchRec takes the tables out of the model
        self.train_batches = Batcher(data, "train", cfg.data.max_seq_len, self.model.event_windows, t.shuffle_block_rows,
                                     t.shuffle_window_blocks)
        # counted on the whole model before any wrapping shards it (its forward would gather sharded parameters;
        # TorchRec takes its tables out)
        self.executed_flops, self.executed_counted = executed_flops(self.model, self.train_batches, self.device, logger)
        # some parameters are sharded over the ranks: all with FSDP, the vocabulary tables with row sharding (DTensors)
        # or TorchRec (ShardedTensors)
        self.sharded = w.distributed and (t.distributed == "fsdp" or t.embedding_sharding in ("row", "torchrec"))
        if w.distributed:
            if w.rank:  # the same weights everywhere (built from the seed), independent dropout draws
                torch.manual_seed(rank_seed(t.seed, w.rank))
            self.train_model = wrap_for_training(self.model, t, w)
        else:
            self.train_model = TrainModel(self.model, t.bf16)
        self.optimizers = make_optimizers(self.model, t)  # after FSDP sharding: the optimizers hold the shards
        # TorchRec's tables update themselves in the backward; their optimizer is here for its learning-rate schedule
        self.tables = sharded_tables(self.model) if w.distributed and t.embedding_sharding == "torchrec" else None
        fused = [self.tables.optimizer] if self.tables is not None else []
        self.steps_per_epoch = math.ceil(len(self.train_batches) / t.batch_size)
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        # validation every this many steps inside an epoch (0: at epoch ends only)
        self.eval_every = t.eval_every_steps or (math.ceil(self.total_steps / ONE_PASS_VALIDATIONS) if t.recipe == "one_pass" else 0)
        self.schedulers = make_schedulers(self.optimizers + fused, t, self.total_steps)
        if t.compile:  # the same module and parameters, run through Inductor; evaluation stays eager
            self.train_model = torch.compile(self.train_model)
        self.train_step = TrainStep(self.train_model, self.optimizers + fused, self.schedulers, t.grad_clip,
                                    check_finite=False,  # the epoch loop watches the loss (NonFiniteWatch)
                                    clip=clip_sharded_grad_norm if w.distributed and t.embedding_sharding == "row" else None)
        if w.distributed:  # what a rank whose share of a last, short batch is empty trains on, with weight 0
            self.stand_in = self.train_batches.batch(np.zeros(1, np.int64)).to(self.device)
        self.useful_flops = useful_flops(self.model, self.train_batches, t.eval_batch_size)
        self.tracker = Tracker(run_dir, t.tensorboard and w.main)  # TensorBoard scalars (train.tensorboard)
        self.state = TrainState()
        self.history: list[dict[str, Any]] = []
        self.recorded = cfg.to_dict()  # what the run and its checkpoints record
        self.last_saved = time.monotonic()
        if "valid" not in data.splits:
            raise KunlunError(f"dataset {data.name!r} has no validation split for early stopping")

    # ------------------------------------------------------------------ record
    def distributed_record(self) -> dict:
        """How this run is spread: world size and ranks, dense strategy (ddp / fsdp) and table sharding."""
        t = self.cfg.train
        return {**self.world.describe(), "strategy": t.distributed, "embedding_sharding": t.embedding_sharding}

    def start_record(self) -> None:
        """Write the run's config, environment and encoder, and no epoch records yet (a run started over from the
        beginning drops those of its earlier, never checkpointed start)."""
        if not self.world.main:
            return
        d = self.run_dir
        env = {**environment(), "data": self.data.fingerprint()}
        if self.world.distributed:
            env["distributed"] = self.distributed_record()
        with writing(d):
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "config.yaml", yaml.safe_dump(self.recorded, sort_keys=False))
            atomic_write_text(d / "environment.json", json.dumps(env, indent=1))
            atomic_dir(d / "encoder", self.save_encoder)
            (d / "epochs.jsonl").unlink(missing_ok=True)

    def save_encoder(self, directory: Path) -> None:
        """The encoder, and what scoring a file reads besides the data set's events, so that the run scores files after
        its dataset folder is moved or deleted: the schema file of a dataset that has one (``encoder/schema.yaml``),
        a registered data set's side files (``encoder/side/``: MovieLens's movie and user tables; ``keep_side_files``)."""
        self.data.encoder().save(directory)
        if is_schema_file(self.cfg.data.dataset):
            shutil.copyfile(self.cfg.data.dataset, directory / SCHEMA_COPY)
        else:
            keep_side_files(self.cfg.data.dataset, self.cfg.data.data_dir, directory / SIDE_COPY, self.log)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything ``resume`` needs besides the weights: tensors and plain values only (loaded with weights_only).
        Several processes: the optimizer states go into the DCP folder with the weights, and every rank's RNG states
        are kept (a collective: every rank calls this)."""
        state = {
            "train_state": _plain(vars(self.state)),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "precision_rng": precision_state(self.model),  # stochastic rounding's generators
            "history": _plain(self.history),
        }
        if self.world.distributed:
            del state["optimizers"]
            cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)
            state["rank_rng"] = all_gather([torch.get_rng_state(), cuda], self.world)
        return state

    def resume(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` (a ``last``): weights, optimizer, schedules, RNG states, position. The run's
        ``epochs.jsonl`` is rewritten from the checkpoint's own record, so it lists each epoch once, as the
        checkpoint knows it (a kill between the two writes leaves one line more). Every file of the checkpoint is
        checked against its manifest first."""
        verify_checkpoint(checkpoint)
        sharded = is_sharded(checkpoint)
        torchrec = bool((read_manifest(checkpoint) or {}).get("torchrec_tables"))
        if torchrec != (self.tables is not None):
            raise KunlunError(f"{checkpoint}: written with train.embedding_sharding=torchrec, whose tables' optimizer state is "
                              f"TorchRec's: it resumes with train.embedding_sharding=torchrec on several processes (its weights "
                              f"load anywhere: kunlun eval, export)" if torchrec else
                              f"{checkpoint}: not written with train.embedding_sharding=torchrec: a TorchRec run resumes its own "
                              f"checkpoints only")
        if sharded:  # written by several processes: weights and optimizer states resharded to this world
            extra = self.tables_state()
            load_sharded(checkpoint, self.model, self.optimizers, extra)
            if self.tables is not None:
                self.tables.optimizer.load_state_dict(extra["table_optimizer"])
        elif self.sharded:
            raise KunlunError(f"{checkpoint}: a one-process checkpoint does not resume with sharded parameters "
                              f"(train.distributed=fsdp or train.embedding_sharding=row or torchrec); resume it with plain "
                              f"ddp first")
        else:
            load_weights(checkpoint, self.model)
        st = load_trainer_state(checkpoint)
        w = self.world
        try:
            state = TrainState(**st["train_state"])
            if not sharded:
                for o, s in zip(self.optimizers, st["optimizers"], strict=True):
                    o.load_state_dict(s)
            for sch, s in zip(self.schedulers, st["schedulers"], strict=True):
                sch.load_state_dict(s)
            if self.tables is not None:  # its learning rate is not in its state (the dense optimizers' is): the schedule's
                for group, lr in zip(self.tables.optimizer.param_groups, self.schedulers[-1].get_last_lr(), strict=True):
                    group["lr"] = lr
            ranks = st.get("rank_rng") or []
            if len(ranks) == w.size:  # the same world size: every rank continues its own random stream
                torch.set_rng_state(ranks[w.rank][0])
                if len(ranks[w.rank][1]) and torch.cuda.is_available():
                    torch.cuda.set_rng_state(ranks[w.rank][1])
            else:  # rank 0 continues the checkpoint's rank 0; other ranks start streams of their own
                torch.set_rng_state(st["torch_rng"])
                if st.get("cuda_rng") and torch.cuda.is_available() and not w.distributed:
                    torch.cuda.set_rng_state_all(st["cuda_rng"])
                if w.rank:
                    torch.manual_seed(rank_seed(self.cfg.train.seed + state.step, w.rank))
            load_precision_state(self.model, st.get("precision_rng", []))
            history = list(st["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise KunlunError(f"{checkpoint / 'trainer_state.pt'}: does not fit this run's model and optimizers "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.state, self.history = state, history
        self.write_epochs()
        where = (f"at step {state.epoch_step} of epoch {state.epoch + 1}" if state.epoch_step
                 else f"after epoch {state.epoch}")
        self.log(f"resumed from {checkpoint} {where} (step {state.step})")

    def write_epochs(self) -> None:
        if not self.world.main:
            return
        path = self.run_dir / "epochs.jsonl"
        with writing(path):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))

    def save_last(self) -> None:
        s = self.state
        info = {"epoch": s.epoch, "epoch_step": s.epoch_step, "step": s.step}
        if self.tables is not None:
            info["torchrec_tables"] = True
        if self.world.distributed:  # every rank writes its shard
            save_sharded(self.run_dir / "checkpoints" / "last", self.model, self.optimizers, self.recorded, self.checkpoint_state(),
                         info, self.world, self.tables_state())
        else:
            save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, self.recorded, self.checkpoint_state(), info=info)
        self.last_saved = time.monotonic()

    def tables_state(self) -> dict[str, Any]:
        """What a distributed checkpoint holds besides the model and its optimizers: the state of TorchRec's fused
        optimizer (ShardedTensors, written and read in place), if the tables are TorchRec's."""
        return {"table_optimizer": self.tables.optimizer.state_dict()} if self.tables is not None else {}

    def save_best(self) -> None:
        """``checkpoints/best``: one safetensors file of the whole weights, written by rank 0 (FSDP: gathered first,
        by every rank)."""
        tensors = full_state_dict(self.model, sharded=True) if self.sharded else None
        if self.world.main:
            s = self.state
            info = {"epoch": s.epoch, "step": s.step, **({"epoch_step": s.epoch_step} if s.epoch_step else {})}
            save_checkpoint(self.run_dir / "checkpoints" / "best", self.model, self.recorded, info=info, tensors=tensors)

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of ``split`` with the model as it stands (several processes: each scores a share, see
        ``kunlun.training.distributed``; the numbers are those of one process)."""
        cfg = self.cfg
        if self.world.distributed:
            return evaluate_sharded(self.model, self.data, split, cfg.data.max_seq_len, cfg.train.eval_batch_size, self.world, cfg.train.bf16)
        return evaluate(self.model, self.data, split, cfg.data.max_seq_len, cfg.train.eval_batch_size, cfg.train.bf16)

    def checkpoint_due(self) -> bool:
        t = self.cfg.train
        if t.checkpoint_every_steps and self.state.step % t.checkpoint_every_steps == 0:
            return True
        return bool(t.checkpoint_every_minutes) and time.monotonic() - self.last_saved >= 60 * t.checkpoint_every_minutes

    def done(self) -> bool:
        """Training is over: epochs or steps used up, or early-stopped, and no epoch is half done."""
        t, s = self.cfg.train, self.state
        return s.epoch_step == 0 and (s.epoch >= t.epochs or s.step >= self.total_steps or s.bad_epochs >= t.patience > 0)

    def early_stopped(self) -> bool:
        t = self.cfg.train
        return self.state.bad_epochs >= t.patience > 0

    def judge(self, valid: dict[str, float], epoch: int) -> bool:
        """Book validation ``valid`` (during epoch ``epoch``, 0-based, at the current step): on an improvement of
        ``train.monitor`` the best metrics, step and ``checkpoints/best``; otherwise one more bad validation (and, with
        the plateau schedule, lower rates). → whether it improved."""
        t, s = self.cfg.train, self.state
        improved = valid["auc"] > s.best_auc if t.monitor == "auc" else valid["ne"] < s.best_ne
        if improved:
            s.best_ne, s.best_auc, s.best_epoch, s.best_step, s.bad_epochs = valid["ne"], valid["auc"], epoch + 1, s.step, 0
            s.best_examples = s.train_examples
            self.save_best()
        else:
            s.bad_epochs += 1
            if t.schedule == "plateau":
                self.lower_learning_rates()
        return improved

    def record(self, epoch: int, epoch_step: int, train_loss: float, valid: dict[str, float], seconds: float, end: bool,
               improved: bool) -> dict[str, Any]:
        """Append a validation's line to the run record (epochs.jsonl) and log it. ``seconds``: the epoch's training
        time so far plus this validation's. ``epoch_step``: steps of the epoch done; ``end``: at the epoch's end."""
        s, t = self.state, self.cfg.train
        rec = {"epoch": epoch + 1, "step": s.step, "train_loss": train_loss, "valid": valid, "seconds": seconds,
               "epoch_step": epoch_step, "end_of_epoch": end, "examples": s.train_examples}
        self.history.append(rec)
        self.write_epochs()
        self.tracker.scalars(s.step, {f"valid/{k}": v for k, v in valid.items()})
        where = f"epoch {epoch + 1}" if end else f"epoch {epoch + 1} step {epoch_step}"
        self.log(f"{where}: train loss {train_loss:.4f}  valid NE {valid['ne']:.4f}  AUC {valid['auc']:.4f}"
                 + ("  (best)" if improved else ""))
        if self.early_stopped():
            unit = "epoch(s)" if not self.eval_every else "validation(s)"
            self.log(f"early stop: no validation {t.monitor.upper()} improvement for {t.patience} {unit}")
        return rec

    def close_epoch(self) -> None:
        s = self.state
        s.epoch += 1
        s.epoch_step, s.epoch_loss_sum, s.epoch_examples, s.epoch_seconds = 0, 0.0, 0, 0.0

    def lower_learning_rates(self) -> None:
        """``train.schedule=plateau``: every base rate × PLATEAU_FACTOR (not below PLATEAU_MIN_LR), in force from the
        next step. Base rates are scheduler state, so checkpoints keep them and a resumed run goes on with them."""
        for sch in self.schedulers:
            sch.base_lrs = [max(lr * PLATEAU_FACTOR, PLATEAU_MIN_LR) for lr in sch.base_lrs]
            for group, base, factor in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
                group["lr"] = base * factor(sch.last_epoch)

    # ------------------------------------------------------------------ loop
    def train_epoch(self, epoch: int) -> float:
        """Train epoch ``epoch`` (0-based) from where the state stands in it, validating every ``eval_every`` steps
        (not at its last step: ``fit`` validates there); returns its mean training loss. Returns early when a
        validation inside it stops the run (``early_stopped``)."""
        t, s, w = self.cfg.train, self.state, self.world
        self.train_model.train()
        rng = np.random.default_rng(t.seed + epoch)
        steps = min(self.steps_per_epoch, self.total_steps - (s.step - s.epoch_step))  # this epoch's steps in all
        start, n_seen = s.epoch_step, 0
        columns = [TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[speed]:>7.0f} ex/s  loss {task.fields[loss]}"), TimeRemainingColumn()]
        with Progress(*columns, console=stderr, disable=not self.progress, transient=False) as bar:
            task = bar.add_task("train", total=steps, completed=start, epoch=epoch + 1, speed=0.0,
                                loss=running_loss_text(s.epoch_loss_sum, s.epoch_examples))
            t0 = mark = last_sync = time.perf_counter()
            # several processes: each watch sums its own rank's losses from here on; the ranks' sums are added at sync
            base_loss = s.epoch_loss_sum
            watch = NonFiniteWatch(self.device, 0.0 if w.distributed else s.epoch_loss_sum)
            clock = {"next": s.step + 1, "step": s.step, "time": t0}  # several processes: when the ranks sync next

            def sync() -> bool:  # the loop's only host synchronisation: loss sum and non-finite check
                due = False
                if w.distributed:  # one all-gather; rank 0's clock decides when the next one is, for every rank
                    local, bad = watch.read()
                    now = time.perf_counter()
                    per_step = (now - clock["time"]) / max(s.step - clock["step"], 1)
                    timed = bool(t.checkpoint_every_minutes) and time.monotonic() - self.last_saved >= 60 * t.checkpoint_every_minutes
                    a = agree(w, self.device, local, bad, timed, min(10_000, max(1, int(SYNC_SECONDS / max(per_step, 1e-9)))))
                    s.epoch_loss_sum, bad, due = base_loss + a.loss_sum, a.first_bad, a.checkpoint
                    clock.update(next=s.step + a.every, step=s.step, time=now)
                else:
                    s.epoch_loss_sum, bad = watch.read()
                if bad is not None:
                    raise NonFiniteLoss(
                        f"non-finite training loss at step {bad} (epoch {epoch + 1}); stopped. "
                        f"The last good checkpoint is in {self.run_dir / 'checkpoints'}"
                    )
                if self.tracker.enabled and s.epoch_examples:  # nothing built for a run without tracking
                    self.tracker.scalars(s.step, {
                        "train/loss": s.epoch_loss_sum / s.epoch_examples, "train/lr": self.optimizers[0].param_groups[0]["lr"],
                        "train/examples_per_s": n_seen / max(time.perf_counter() - t0, 1e-9),
                        "train/compute": TRAIN_FLOPS_FACTOR * self.executed_flops * s.train_examples})
                bar.update(task, loss=running_loss_text(s.epoch_loss_sum, s.epoch_examples))
                return due

            shares = {"rank": w.rank, "world": w.size} if w.distributed else {}  # one process: the call as it always was
            batches = self.train_batches.iterate(t.batch_size, rng, start=start, **shares)
            for batch in Prefetcher(itertools.islice(batches, max(steps - start, 0)), depth=2, device=self.device):
                batch = batch.to(self.device)
                if w.distributed:  # this rank's share of the global batch, its loss scaled so that DDP's mean is right
                    scale, mine, rows = shard_scale(s.epoch_step, len(self.train_batches), t, w)
                    loss, _ = self.train_step(batch if mine else self.stand_in, scale=scale if mine else 0.0)
                    watch.add(loss, rows / w.size if mine else 0, s.step + 1)  # loss × N / W = Σ of this rank's losses
                else:
                    loss, _ = self.train_step(batch)
                    rows = len(batch)
                    watch.add(loss, rows, s.step + 1)
                s.step += 1
                s.epoch_step += 1
                s.epoch_examples += rows
                s.train_examples += rows
                n_seen += rows
                now = time.perf_counter()
                bar.update(task, advance=1, speed=n_seen / max(now - t0, 1e-9))
                if self.eval_every and s.epoch_step % self.eval_every == 0 and s.epoch_step < steps:
                    sync()  # every rank at the same step; weights after a non-finite step are never validated or saved
                    s.train_seconds += now - mark
                    s.epoch_seconds += now - mark
                    self.validate_in_epoch(epoch)
                    if self.early_stopped():
                        break
                    self.train_model.train()  # validation left the model in eval mode
                    last_sync = mark = time.perf_counter()  # validation and checkpoint writing are not training time
                    continue
                if w.distributed:  # the same steps on every rank
                    due = bool(t.checkpoint_every_steps) and s.step % t.checkpoint_every_steps == 0
                    if due or s.step >= clock["next"]:
                        due = sync() or due  # before a checkpoint: weights after a non-finite step are never saved
                else:
                    due = self.checkpoint_due()
                    if due or now - last_sync >= SYNC_SECONDS:
                        sync()  # before a checkpoint: weights after a non-finite step are never saved
                        last_sync = now
                if due:
                    now = time.perf_counter()
                    s.train_seconds += now - mark
                    s.epoch_seconds += now - mark
                    self.save_last()
                    mark = time.perf_counter()  # checkpoint writing is not training time
            sync()
        now = time.perf_counter()
        s.train_seconds += now - mark
        s.epoch_seconds += now - mark
        return s.epoch_loss_sum / max(s.epoch_examples, 1)

    def validate_in_epoch(self, epoch: int) -> None:
        """A validation inside epoch ``epoch`` at the current step: booked, recorded, ``checkpoints/last`` written
        (unless it stopped the run: ``fit`` then ends the epoch and writes it), then ``on_validation``."""
        s = self.state
        v0 = time.perf_counter()
        valid = self.evaluate("valid")
        seconds = s.epoch_seconds + time.perf_counter() - v0
        improved = self.judge(valid, epoch)
        rec = self.record(epoch, s.epoch_step, s.epoch_loss_sum / max(s.epoch_examples, 1), valid, seconds, False, improved)
        if not self.early_stopped():
            self.save_last()
        if self.on_validation is not None:
            self.on_validation(rec)

    def fit(self) -> dict[str, Any]:
        code = code_version()
        if self.state.step and not self.state.code_versions:  # a checkpoint from before code versions were recorded
            self.state.code_versions.append({"commit": None, "source_sha256": None, "label": "unknown (before provenance)"})
        if not any(c.get("source_sha256") == code["source_sha256"] for c in self.state.code_versions):
            if self.state.code_versions:
                self.log(f"note: this run was started by code {self.state.code_versions[0].get('label')} and continues "
                         f"with {code['label']}; its record lists both")
            self.state.code_versions.append(code)
        if not (self.run_dir / "config.yaml").is_file():
            self.start_record()
        wall0 = time.perf_counter()
        self.last_saved = time.monotonic()
        s = self.state
        self.tracker.scalars(s.step, {"flops/executed_per_example": self.executed_flops, "flops/useful_per_example": self.useful_flops})
        while not self.done():
            epoch = s.epoch
            train_loss = self.train_epoch(epoch)
            if s.epoch_step and self.early_stopped():  # stopped by a validation inside the epoch: it ends there
                self.close_epoch()
                self.save_last()
                continue
            v0 = time.perf_counter()
            valid = self.evaluate("valid")
            seconds = s.epoch_seconds + time.perf_counter() - v0
            epoch_step = s.epoch_step
            self.close_epoch()
            improved = self.judge(valid, epoch)
            rec = self.record(epoch, epoch_step, train_loss, valid, seconds, True, improved)
            self.save_last()
            if self.on_validation is not None:
                self.on_validation(rec)
        self.tracker.close()
        return self.finish(time.perf_counter() - wall0)

    def finish(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        barrier(self.world)  # rank 0 has written checkpoints/best
        load_weights(self.run_dir / "checkpoints" / "best", self.model, sharded_model=self.sharded)
        metrics, eval_seconds, eval_examples = {}, 0.0, 0
        for split in self.final_splits:
            if split in self.data.splits:
                e0 = time.perf_counter()
                metrics[split] = self.evaluate(split)
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
            "best_step": self.state.best_step,
            "validations": len(self.history),
            "eval_every_steps": self.eval_every,  # inside an epoch; 0: at epoch ends only
            "epochs_run": self.state.epoch,
            "steps": self.state.step,
            "train_ctr": self.data.train_ctr,
            # FLOPs (docs/models.md#flops): executed = counted from the ops one forward of the run's model dispatches, every
            # padded slot as the kernels compute it (``flops_per_example``, the key older records hold the analytic
            # figure under); useful = analytic, each example's real tokens (mean over the training split). Training
            # compute C = forward FLOPs/example × 3 (forward + backward) × training examples processed (in all, and
            # up to the best checkpoint); embedding lookups count 0 FLOPs.
            "flops_per_example": self.executed_flops,
            "executed_flops_per_example": self.executed_flops,
            "useful_flops_per_example": self.useful_flops,
            "analytic_flops_per_example": self.model.flops_per_example(),
            "flops_kinds": flops_kinds(self.executed_counted),
            "train_examples": self.state.train_examples,
            "train_compute": TRAIN_FLOPS_FACTOR * self.executed_flops * self.state.train_examples,
            "train_compute_at_best": TRAIN_FLOPS_FACTOR * self.executed_flops * self.state.best_examples,
            "useful_train_compute": TRAIN_FLOPS_FACTOR * self.useful_flops * self.state.train_examples,
            "useful_train_compute_at_best": TRAIN_FLOPS_FACTOR * self.useful_flops * self.state.best_examples,
            "flops_by_component": self.model.flops_by_component(),
            "parameters": self.parameter_counts,
            "wall_time_s": wall,
            "train_examples_per_s": self.state.train_examples / max(self.state.train_seconds, 1e-9),
            "eval_examples_per_s": eval_examples / max(eval_seconds, 1e-9),
        }
        if self.world.distributed:
            final["distributed"] = self.distributed_record()
        if self.world.main:
            with writing(self.run_dir / "final.json"):
                atomic_write_text(self.run_dir / "final.json", json.dumps(final, indent=1))
        barrier(self.world)
        return final


def running_loss_text(loss_sum: float, examples: int) -> str:
    """The progress bar's running loss: a dash until a step has been trained (not ``nan``)."""
    return f"{loss_sum / examples:.4f}" if examples else "–"


def _silent(message: str) -> None:
    """The logger of ranks other than 0."""


def _plain(x: Any) -> Any:
    """``x`` as JSON would give it back: plain Python values only (no numpy scalars), so a checkpoint loads with
    ``torch.load(weights_only=True)``; NaN and infinities survive."""
    return json.loads(json.dumps(x))


@contextlib.contextmanager
def writing(path: Path):
    """An OSError while writing the run record (full disk, no permission) is one line naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise KunlunError(f"{exc.filename or path}: could not write: {os_error_text(exc)}; "
                          f"no partial file was left and the run's checkpoints are unchanged") from None
