"""Whole jobs on a run directory, for the CLI and the Python API alike: train a new or interrupted run,
load a trained one, score it on its dataset's splits or on a file, write predictions for a file.

Example::

    from kunlun.config import load_config
    from kunlun.training.runner import evaluate_run, train_run

    final = train_run(load_config(None, ["model.d_model=16"], epochs=1), Path("runs/try"))
    metrics = evaluate_run(Path("runs/try"))  # {"valid": {...}, "test": {...}}
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import Config, load_config
from kunlun.console import log
from kunlun.data.batches import Batcher
from kunlun.data.prepare import Encoder
from kunlun.data.registry import load_raw, prepare_dataset, prepare_file
from kunlun.errors import KunlunError
from kunlun.files import atomic_write, check_output_file, os_reason
from kunlun.models import RankingModel
from kunlun.runs import DEFAULT_RUNS_DIR, new_run_dir, resolve_run
from kunlun.training.checkpoint import load_weights
from kunlun.training.trainer import Trainer, build_from_info, evaluate, predict


def resume_config_path(run_dir: Path) -> Path:
    """The config an interrupted run continues with: its own ``config.yaml``."""
    if not (run_dir / "config.yaml").is_file():
        raise KunlunError(f"{run_dir}: not a run directory (no config.yaml) to resume")
    return run_dir / "config.yaml"


def train_run(cfg: Config, run_dir: Path | None = None, *, resume: bool = False, use_cache: bool = True, progress: bool = True,
              logger: Callable[[str], None] = log) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (default ``runs/<time>-<model>-<dataset>``), or continue the interrupted run
    there (``resume``, with the config from ``resume_config_path``); returns its final.json (plus ``run_dir``).

    A new run refuses a non-empty directory; a run that fails before its first checkpoint leaves nothing behind.
    """
    data = prepare_dataset(cfg.data.dataset, cfg.data.data_dir, use_cache=use_cache, log=logger)
    if resume:
        if run_dir is None:
            raise KunlunError("resume: give the run directory to continue")
        target = run_dir
    else:
        target = run_dir or new_run_dir(DEFAULT_RUNS_DIR, cfg.model.name, cfg.data.dataset)
        if target.exists() and any(target.iterdir()):
            raise KunlunError(f"{target}: run directory already exists and is not empty (use --resume to continue it)")
    trainer = Trainer(cfg, data, target, progress=progress, logger=logger)
    created = not resume and not target.exists()
    if resume:
        trainer.resume(target / "checkpoints" / "last")
    else:
        trainer.start_record()
    logger(f"run {target}: {cfg.model.name} on {data.name}, {trainer.model.flops_per_example() / 1e6:.2f} MFLOPs/example, "
           f"{trainer.model.num_parameters()['total']:,} parameters")
    try:
        final = trainer.fit()
    except BaseException:
        # nothing worth keeping yet (no checkpoint): remove the half-made run directory
        if created and not (target / "checkpoints" / "last").exists():
            shutil.rmtree(target, ignore_errors=True)
        raise
    logger(f"run record: {target}  ({final['wall_time_s']:.1f}s, {final['train_examples_per_s']:.0f} train ex/s)")
    return {**final, "run_dir": str(target)}


def load_trained(path: Path) -> tuple[Config, Encoder, RankingModel]:
    """A run or checkpoint → (config, encoder, model with weights)."""
    run, ckpt = resolve_run(path)
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


def evaluate_run(path: Path, splits: list[str] | tuple[str, ...] = (), data_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Metrics by split of a trained run (directory or checkpoint) on its dataset, re-encoded with the run's own
    vocabularies and scored as training scored it (a bf16-trained run under bf16 autocast). Default splits: valid, test."""
    cfg, encoder, model = load_trained(path)
    raw = load_raw(cfg.data.dataset, data_dir or cfg.data.data_dir)
    if raw.schema != encoder.schema:
        raise KunlunError(f"dataset {cfg.data.dataset!r} no longer matches the schema the model was trained on")
    data = encoder.prepare(raw, cfg.data.dataset)
    splits = list(splits) or [s for s in ("valid", "test") if s in data.splits]
    for s in splits:
        if s not in data.splits:
            raise KunlunError(f"--split {s}: dataset {data.name!r} has splits {sorted(data.splits)}")
    return {s: evaluate(model, data, s, cfg.data.max_seq_len, cfg.train.eval_batch_size, cfg.train.bf16) for s in splits}


def evaluate_file(path: Path, file: Path, data_dir: str | None = None) -> dict[str, float]:
    """Metrics of a trained run on one file with the training schema (labels required)."""
    cfg, encoder, model = load_trained(path)
    data = prepare_file(cfg.data.dataset, data_dir or cfg.data.data_dir, file, encoder)
    return evaluate(model, data, "file", cfg.data.max_seq_len, cfg.train.eval_batch_size, cfg.train.bf16)


def predict_file(path: Path, file: Path, out: Path, data_dir: str | None = None) -> int:
    """Write ``out`` (CSV: row, probability, and label when the file has one) for every row of ``file``, in the
    file's row order; returns the number of rows. ``out`` is checked before any work, and written atomically:
    a failure leaves whatever was at ``out`` before, and no temporary file."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    check_output_file(out)
    if Path(file).is_file() and out.exists() and out.samefile(file):
        raise KunlunError(f"--out {out}: is the input file; write the predictions elsewhere")
    cfg, encoder, model = load_trained(path)
    data = prepare_file(cfg.data.dataset, data_dir or cfg.data.data_dir, file, encoder, labels=False)
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
