"""Whole jobs on a run directory, for the CLI and the Python API alike: train a new or interrupted run,
load a trained one, score it on its dataset's splits or on a file, write predictions for a file.

Example::

    from kunlun.config import load_config
    from kunlun.training.runner import evaluate_run, train_run

    final = train_run(load_config(None, ["model.d_model=16"], epochs=1), Path("runs/try"))
    metrics = evaluate_run(Path("runs/try"))  # {"valid": {...}, "test": {...}}
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import Config, load_config
from kunlun.console import emit_json, log
from kunlun.data.batches import Batcher
from kunlun.data.prepare import Encoder
from kunlun.data.registry import is_schema_file, load_raw, prepare_dataset, prepare_file
from kunlun.errors import KunlunError, os_reason
from kunlun.files import atomic_write, atomic_write_text, check_output_file, recover_dir
from kunlun.metrics import metrics_table
from kunlun.models import RankingModel
from kunlun.processes import is_empty_run_dir, lock_run_dir
from kunlun.runs import (
    DEFAULT_RUNS_DIR,
    RECORD_ONLY_KEYS,
    SCHEMA_COPY,
    SIDE_COPY,
    TIME_FORMAT,
    code_version,
    flat_keys,
    new_run_dir,
    read_json,
    resolve_run,
)
from kunlun.training.checkpoint import MANIFEST, load_weights, read_manifest, verify_checkpoint
from kunlun.training.distributed import barrier, broadcast, check_world, init_from_env, leave
from kunlun.training.tracking import CURVES, draw_curves
from kunlun.training.trainer import Trainer, build_from_info, evaluate, predict, writing

# config keys a resumed run may change: where the data is and how the process runs, not what it computes (the world
# size is not a key: a run resumes on any number of processes)
RESUME_FREE_KEYS = (*RECORD_ONLY_KEYS, "train.threads", "train.distributed")


def _quiet(message: str) -> None:
    """The logger of ranks other than 0."""


def resume_config_path(run_dir: Path, config: Path | None = None, target: Path | None = None) -> Path:
    """The config an interrupted run continues with: its own ``config.yaml``. ``config`` and ``target`` (another config
    file, another run directory: ``kunlun train --config/--run-dir`` beside ``--resume``) are refused."""
    if config:
        raise KunlunError("--config: not used with --resume (a resumed run continues with its own config.yaml)")
    if target and target.resolve() != run_dir.resolve():
        raise KunlunError(f"--run-dir {target}: not used with --resume {run_dir} (the run continues in its own directory)")
    if not (run_dir / "config.yaml").is_file():
        if run_dir.is_dir() and is_empty_run_dir(run_dir):  # killed before it wrote anything
            raise KunlunError(f"{run_dir}: no run was recorded here yet (no config.yaml); start it anew with --run-dir {run_dir}")
        raise KunlunError(f"{run_dir}: not a run directory (no config.yaml) to resume")
    return run_dir / "config.yaml"


def check_unfinished(run_dir: Path) -> None:
    """KunlunError unless ``run_dir`` is a run that has not finished (no final.json): resuming a finished run would
    train past its end and overwrite its record."""
    resume_config_path(run_dir)
    if (run_dir / "final.json").exists():
        final = read_json(run_dir / "final.json") or {}
        what = (f"{final['epochs_run']} epoch(s), {final['steps']} steps, best epoch {final['best_epoch']}"
                if {"epochs_run", "steps", "best_epoch"} <= set(final) else "final.json is there")
        raise KunlunError(f"{run_dir}: the run is finished ({what}); nothing to resume and nothing was changed "
                          f"(train more in a new run directory)")


def resume_changes(run_dir: Path, cfg: Config) -> dict[str, list[Any]]:
    """{key: [recorded, new]} for every config key ``cfg`` sets differently from the run's config.yaml. A key
    outside ``RESUME_FREE_KEYS`` is a KunlunError naming it: the checkpoint's optimizer state and schedule would
    silently override it, and the record would claim it."""
    old, new = flat_keys(load_config(resume_config_path(run_dir)).to_dict()), flat_keys(cfg.to_dict())
    keys = sorted(set(old) | set(new), key=lambda k: (k != "model.name", k))  # another model: say that first
    changed = {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}
    for k, (was, now) in changed.items():
        if k not in RESUME_FREE_KEYS:
            raise KunlunError(f"resume {run_dir}: {k}={json.dumps(now)} would change the run, which was trained with "
                              f"{k}={json.dumps(was)}; a resumed run keeps its config (only {', '.join(RESUME_FREE_KEYS)} "
                              f"may change) — start a new run to change it")
    return changed


def train_run(cfg: Config, run_dir: Path | None = None, *, resume: bool = False, use_cache: bool = True, progress: bool = True,
              logger: Callable[[str], None] = log, final_splits: tuple[str, ...] = ("valid", "test")) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (default ``runs/<time>-<model>-<dataset>``), or continue the interrupted run
    there (``resume``: ``cfg`` must be the run's config.yaml up to ``RESUME_FREE_KEYS``); returns its final.json
    (plus ``run_dir``), whose metrics score ``final_splits`` with the best checkpoint.

    The run directory is locked for the whole job (a second process gets "run directory X is in use by process N").
    A new run refuses a non-empty directory; a new run that fails before its first checkpoint leaves nothing behind.
    Resuming a finished run is refused and changes nothing; resuming a run stopped before its first checkpoint
    starts it again from the beginning (the seed makes that the same run).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: they join one process group and train the run
    together (``kunlun.training.distributed``); rank 0 alone locks, writes and logs, and every rank returns final.json.
    """
    joined = not (dist.is_available() and dist.is_initialized())  # this call joins the process group (and leaves it)
    world = init_from_env()
    check_world(cfg.train, world)  # before any data is read
    if not world.main:
        logger, progress = _quiet, False
    if resume:
        if run_dir is None:
            raise KunlunError("resume: give the run directory to continue")
        target = run_dir
        check_unfinished(target)  # before anything is written, the lock file included
        changes = resume_changes(target, cfg)
    else:
        target = broadcast(run_dir or new_run_dir(DEFAULT_RUNS_DIR, cfg.model.name, cfg.data.dataset), world)  # rank 0's name
        if not is_empty_run_dir(target):
            raise KunlunError(f"{target}: run directory already exists and is not empty (use --resume to continue it)")
    if world.main:  # several processes: rank 0 prepares (and caches) the data, the others then read the cache
        data = prepare_dataset(cfg.data.dataset, cfg.data.data_dir, use_cache=use_cache, log=logger)
    barrier(world)
    if not world.main:
        data = prepare_dataset(cfg.data.dataset, cfg.data.data_dir, use_cache=use_cache, log=logger)
    trainer = Trainer(cfg, data, target, progress=progress, logger=logger, world=world,  # every config error before the first write
                      final_splits=final_splits)
    made = [p for p in (target, *target.parents) if not p.exists()]  # the directories this run creates
    barrier(world)  # every rank has looked at the run directory before rank 0 writes in it
    with lock_run_dir(target) if world.main else contextlib.nullcontext():
        try:
            if world.main:
                if resume:
                    check_unfinished(target)  # again under the lock: another process may have finished it meanwhile
                elif not is_empty_run_dir(target):
                    raise KunlunError(f"{target}: run directory already exists and is not empty (use --resume to continue it)")
            if resume:
                _resume(trainer, changes, logger)
            else:
                trainer.start_record()
            logger(f"run {target}: {cfg.model.name} on {data.name}, {trainer.useful_flops / 1e6:.2f} useful / "
                   f"{trainer.executed_flops / 1e6:.2f} executed MFLOPs/example, {trainer.parameter_counts['total']:,} parameters")
            final = trainer.fit()
        except BaseException:
            # nothing worth keeping yet (no checkpoint): remove the half-made run directory (and runs/ if it made that)
            if world.main and made and not (target / "checkpoints" / "last").exists():
                shutil.rmtree(target, ignore_errors=True)
                for parent in made[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise
        if world.main:
            write_curves(target, f"{cfg.model.name} on {data.name}", logger)
    logger(f"run record: {target}  ({final['wall_time_s']:.1f}s, {final['train_examples_per_s']:.0f} train ex/s)")
    if joined:
        leave(world)
    return {**final, "run_dir": str(target)}


def print_final(final: dict[str, Any], as_json: bool = False) -> None:
    """``train_run``'s final metrics by split on stdout, as ``kunlun train`` prints them: a table titled with the model,
    dataset and best epoch, or one JSON object (``as_json``). Under torchrun only rank 0 prints."""
    if os.environ.get("RANK", "0") != "0":
        return
    title = f"{final['model']} on {final['dataset']} (best epoch {final['best_epoch']})"
    emit_json(final["metrics"]) if as_json else metrics_table(final["metrics"], title)


def write_curves(run_dir: Path, title: str, logger: Callable[[str], None] = log) -> Path | None:
    """``<run>/curves.png`` (``kunlun.training.tracking.draw_curves``) once training has ended. The run is complete
    without it: a file that cannot be written is a line in the log, not a failed run."""
    try:
        return draw_curves(run_dir, title)
    except OSError as exc:
        logger(f"learning curves not drawn: {exc.filename or run_dir / CURVES}: {os_reason(exc)}")
        return None


def _resume(trainer: Trainer, changes: dict[str, list[Any]], logger: Callable[[str], None]) -> None:
    """Continue ``trainer``'s run directory from checkpoints/last (or from the beginning when it has none); called
    with the run directory locked. Appends what was resumed, by which code, with which changed keys, to resumes.jsonl."""
    run, world = trainer.run_dir, trainer.world
    ckpts = run / "checkpoints"
    if world.main:
        for name in ("last", "best"):
            recover_dir(ckpts / name)  # a process killed inside a checkpoint swap
    barrier(world)
    if (ckpts / "last").is_dir():
        recorded = ((read_json(run / "environment.json") or {}).get("data") or {}).get("sha256")
        now = trainer.data.fingerprint()["sha256"]
        if recorded and recorded != now:
            raise KunlunError(f"resume {run}: dataset {trainer.data.name!r} is not the data this run was trained on "
                              f"(fingerprint {now[:12]}, environment.json records {recorded[:12]}); start a new run")
        trainer.resume(ckpts / "last")
    else:
        best = ckpts / "best"
        epoch = (read_manifest(best) or {}).get("epoch") if (best / MANIFEST).is_file() else None
        if best.is_dir() and epoch != 1:  # more than a lost first epoch: not ours to throw away
            raise KunlunError(f"resume {run}: checkpoints/last is missing but checkpoints/best holds "
                              f"{f'epoch {epoch}' if epoch else 'weights of an unknown epoch'}; nothing was changed — "
                              f"evaluate that checkpoint, or start a new run")
        logger(f"{run}: stopped before its first checkpoint; starting it again from the beginning")
        barrier(world)  # every rank has looked at checkpoints/ before rank 0 removes it
        if world.main:
            shutil.rmtree(ckpts, ignore_errors=True)  # the best checkpoint of the lost first epoch, if any
        trainer.start_record()
    for k, (was, now) in changes.items():
        logger(f"resume: {k} {json.dumps(was)} → {json.dumps(now)} (does not change what the run computes)")
    s = trainer.state
    if not world.main:
        return
    line = json.dumps({"time": time.strftime(TIME_FORMAT), "epoch": s.epoch, "epoch_step": s.epoch_step, "step": s.step,
                       "code": code_version()["label"], "changed": changes, "argv": sys.argv, "world_size": world.size})
    path = run / "resumes.jsonl"
    with writing(path):
        atomic_write_text(path, (path.read_text() if path.is_file() else "") + line + "\n")


def load_trained(path: Path) -> tuple[Config, Encoder, RankingModel]:
    """A run or checkpoint → (config, encoder, model with weights)."""
    run, ckpt = resolve_run(path)
    verify_checkpoint(ckpt)  # every file against its checksum, config.yaml included
    cfg = load_config(ckpt / "config.yaml")
    if not (run / "encoder" / "encoder.json").is_file():
        raise KunlunError(f"{run}: run directory has no encoder/ (schema and vocabularies)")
    encoder = Encoder.load(run / "encoder")
    model = build_from_info(cfg, FeatureInfo.from_encoder(encoder, cfg.data.max_seq_len))
    try:
        load_weights(ckpt, model)
    except (SafetensorError, RuntimeError, OSError) as exc:  # truncated, or tensors of other shapes than the config's
        lines = str(exc).strip().splitlines()
        raise KunlunError(f"{ckpt / 'model.safetensors'}: unreadable ({lines[0] if lines else type(exc).__name__}); "
                          "the checkpoint was damaged or does not belong to this run's config") from None
    return cfg, encoder, model


def _threads_as_trained(cfg: Config) -> None:
    """Score with the run's ``train.threads``: the thread count splits the GEMMs' sums differently, so the metrics
    of ``final.json`` are reproduced bit for bit only with the count that computed them."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def evaluate_run(path: Path, splits: list[str] | tuple[str, ...] = (), data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Metrics by split of a trained run (directory or checkpoint) on its dataset, encoded with the run's own
    vocabularies and scored as training scored it (a bf16-trained run under bf16 autocast). Default splits: valid, test.
    The prepared cache (memory-mapped: a dataset larger than memory) serves when its encoder is the run's, which gives
    the same encoding; otherwise the raw files are re-encoded in memory."""
    cfg, encoder, model = load_trained(path)
    _threads_as_trained(cfg)
    data = prepare_dataset(cfg.data.dataset, data_dir or cfg.data.data_dir)
    if not data.encoder().same_as(encoder):
        # the files changed since training (other vocabularies): encode them with the run's own, in memory
        raw = load_raw(cfg.data.dataset, data_dir or cfg.data.data_dir)
        if raw.schema != encoder.schema:
            raise KunlunError(f"dataset {cfg.data.dataset!r} no longer matches the schema the model was trained on")
        data = encoder.prepare(raw, cfg.data.dataset)
    splits = list(splits) or [s for s in ("valid", "test") if s in data.splits]
    for s in splits:
        if s not in data.splits:
            raise KunlunError(f"--split {s}: dataset {data.name!r} has splits {sorted(data.splits)}")
    return {s: evaluate(model, data, s, cfg.data.max_seq_len, cfg.train.eval_batch_size, cfg.train.bf16) for s in splits}


def scoring_dataset(path: Path, cfg: Config) -> str:
    """The dataset a file to score is read as: for a dataset described by a schema file, the run's own copy of it
    (``encoder/schema.yaml``), so that the run scores after its dataset folder is moved or deleted; the recorded
    schema path for a run trained before runs kept a copy."""
    copy = resolve_run(path)[0] / "encoder" / SCHEMA_COPY
    return str(copy) if is_schema_file(cfg.data.dataset) and copy.is_file() else cfg.data.dataset


def side_copy(path: Path) -> Path:
    """The run's copy of the files besides the events that scoring a file of its registered data set reads
    (``encoder/side``, ``kunlun.data.registry.keep_side_files``), read when the data set's folder is not found; a run
    trained before runs kept one has none, and needs the folder."""
    return resolve_run(path)[0] / "encoder" / SIDE_COPY


def evaluate_file(path: Path, file: Path, data_dir: str | None = None, logger: Callable[[str], None] = log,
                  file_alone: bool = False) -> dict[str, float]:
    """Metrics of a trained run on one file with the training schema (labels required: a file without its label
    column is a one-line KunlunError naming the column).

    Each row is scored as its split's rows were: on a timeline data set (MovieLens, UserBehavior, KuaiRand) a row's
    history is its user's events strictly before it in the run's data set merged with the file's own earlier rows (a
    row equal to a data event is that one event), so the test split written as a file scores as the test split. When
    the data set cannot be found (``data_dir``, else where it was at training time), the file's rows alone, with the
    run's copy of the data set's other files (``side_copy``), and ``logger`` gets one line saying so. ``file_alone``:
    the file's rows alone, whatever is found."""
    cfg, encoder, model = load_trained(path)
    _threads_as_trained(cfg)
    data = prepare_file(scoring_dataset(path, cfg), data_dir or cfg.data.data_dir, file, encoder, log=logger,
                        kept=side_copy(path), file_alone=file_alone)
    return evaluate(model, data, "file", cfg.data.max_seq_len, cfg.train.eval_batch_size, cfg.train.bf16)


def evaluate_and_report(path: Path, file: Path | None = None, splits: list[str] | tuple[str, ...] = (), data_dir: str | None = None,
                        as_json: bool = False, file_alone: bool = False) -> dict[str, Any]:
    """What ``kunlun eval`` does: the metrics of a trained run on ``file`` (``evaluate_file``; a line on stderr says how
    many rows were scored) or, without one, on its dataset's ``splits`` (``evaluate_run``), printed on stdout as a
    table or one JSON object (``as_json``), and returned."""
    if file:
        m = evaluate_file(path, file, data_dir, file_alone=file_alone)
        log(f"scored {m['examples']} rows of {file}")
        emit_json(m) if as_json else metrics_table({Path(file).name: m})
        return m
    metrics = evaluate_run(path, splits, data_dir)
    emit_json(metrics) if as_json else metrics_table(metrics)
    return metrics


def predict_file(path: Path, file: Path, out: Path, data_dir: str | None = None, logger: Callable[[str], None] = log,
                 file_alone: bool = False) -> int:
    """Write ``out`` (CSV: row, probability, and label when the file has one) for every row of ``file``, in the
    file's row order; returns the number of rows. ``out`` is checked before any work, and written atomically:
    a failure leaves whatever was at ``out`` before, and no temporary file.

    Histories as in ``evaluate_file`` (``file_alone`` too). The label column (MovieLens: the rating) is optional: rows without it are
    candidates, scored from the histories before them; they are not events of any later row's history."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    check_output_file(out)
    if Path(file).is_file() and out.exists() and out.samefile(file):
        raise KunlunError(f"--out {out}: is the input file; write the predictions elsewhere")
    cfg, encoder, model = load_trained(path)
    _threads_as_trained(cfg)
    data = prepare_file(scoring_dataset(path, cfg), data_dir or cfg.data.data_dir, file, encoder, labels=False, log=logger,
                        kept=side_copy(path), file_alone=file_alone)
    probs, labels, _ = predict(model, Batcher(data, "file", cfg.data.max_seq_len, model.event_windows), cfg.train.eval_batch_size, cfg.train.bf16)
    order = np.argsort(data.splits["file"].row, kind="stable")
    columns = {"row": data.splits["file"].row[order], "probability": probs[order]}
    if data.has_labels:
        columns["label"] = labels[order]
    try:
        atomic_write(out, lambda tmp: pacsv.write_csv(pa.table(columns), tmp))
    except OSError as exc:  # e.g. a folder that refuses new files, a full disk
        raise KunlunError(f"--out {out}: cannot be written ({os_reason(exc)})") from None
    return len(probs)
