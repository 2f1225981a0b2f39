"""``kunlun`` command line: train, eval, predict, data info|prepare|synth, runs, bench, sweep, fit, tune, export, serve.

Numbers go to stdout (a table, or one JSON object with ``--json``); progress and logs go to stderr.
User errors print one line and exit with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import fields
from pathlib import Path

import click

from kunlun.console import emit_json, log
from kunlun.errors import KunlunError, user_error  # noqa: F401 (user_error: imported from here too)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kunlun")
def cli() -> None:
    """Train, evaluate and measure Kunlun-style ranking models."""


# ---------------------------------------------------------------------------------------- options several commands share
def _options(*decorators):
    """Several click decorators as one, applied as if stacked in the order given (so --help lists them in that order)."""
    return lambda f: functools.reduce(lambda g, decorator: decorator(g), reversed(decorators), f)


_config_option = click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML config (default: packaged kunlun.yaml).")
_data_dir_option = click.option("--data-dir", help="Folder holding the dataset folders.")
_file_alone_option = click.option("--file-alone", is_flag=True, help="Histories from the file's own earlier rows only.")
_json_option = click.option("--json", "as_json", is_flag=True)
_quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")
_overrides_argument = click.argument("overrides", nargs=-1)


# ---------------------------------------------------------------------------------------- train
@cli.command()
@_config_option
@click.option("--model", help="Model name, e.g. kunlun, logistic_regression.")
@click.option("--dataset", help="ml-latest-small (default, embedded), ml-100k, ml-1m, ml-1m-first-half, frappe_x1, a schema .yaml, "
                                "or a folder from `kunlun data synth`.")
@click.option("--data-dir", help="Folder holding the dataset folders (default $KUNLUN_DATA or the user data dir).")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Directory for this run (default runs/<time>-<model>-<dataset>).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--epochs", type=int, help="Maximum epochs.")
@click.option("--resume", "resume", type=click.Path(path_type=Path),
              help="Continue an interrupted run directory from its last checkpoint (same config; a finished run is left as it is).")
@click.option("--precision", help="Emulated GEMM number format: fp32 (default), bf16, fp8_e4m3, fp8_e5m2, hif8, mxfp4, nvfp4, hif4.")
@click.option("--no-cache", is_flag=True, help="Re-read the raw files instead of the prepared-data cache.")
@click.option("--json", "as_json", is_flag=True, help="Print final metrics by split as one JSON object.")
@_quiet_option
@_overrides_argument
def train(config_path, model, dataset, data_dir, run_dir, seed, epochs, resume, precision, no_cache, as_json, quiet, overrides):
    """Train a model, early-stop on validation NE, report test metrics, keep a run record.

    OVERRIDES are config keys, e.g.  model.d_model=64  train.lr=3e-4  data.max_seq_len=100
    """
    from kunlun.config import load_config  # no torch: a mistyped key is named at once, not after torch loads

    if resume:
        from kunlun.training.runner import resume_config_path

        config_path = resume_config_path(resume, config_path, run_dir)
    cfg = load_config(config_path, list(overrides), model=model, dataset=dataset, data_dir=data_dir, seed=seed, epochs=epochs,
                      precision=precision)
    from kunlun.training.runner import print_final, train_run

    final = train_run(cfg, resume or run_dir, resume=bool(resume), use_cache=not no_cache, progress=not quiet)
    print_final(final, as_json)  # under torchrun: rank 0 prints the results


# ---------------------------------------------------------------------------------------- eval / predict
@cli.command(name="eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--file", "file", type=click.Path(path_type=Path), help="Score this file (training schema, with its label column).")
@click.option("--split", multiple=True, help="Dataset split(s) to score when no --file (default valid and test).")
@click.option("--data-dir", help="Where the training dataset lives, if not where it was at training time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the file's metrics, or metrics by split).")
@_file_alone_option
def eval_cmd(run, file, split, data_dir, as_json, file_alone):
    """Score a trained RUN (directory or checkpoint) on a file or on its dataset's splits.

    A row's history: the user's earlier events in the run's dataset and the file (--file-alone: the file's); user guide: Scoring files."""
    from kunlun.training.runner import evaluate_and_report

    evaluate_and_report(run, file, split, data_dir, as_json, file_alone)


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--file", "file", required=True, type=click.Path(path_type=Path), help="File to score (training schema).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="CSV to write: row, probability (, label).")
@click.option("--data-dir", help="Where the training dataset lives (side files, and the events histories come from).")
@_file_alone_option
def predict(run, file, out, data_dir, file_alone):
    """Write click probabilities for every row of FILE, in the file's row order (histories as `kunlun eval` builds them).

    The label column (MovieLens: rating) is optional: rows without it are candidates, scored on the events before them."""
    from kunlun.training.runner import predict_file

    log(f"wrote {predict_file(run, file, out, data_dir, file_alone=file_alone)} predictions to {out}")


# ---------------------------------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Inspect and prepare datasets."""


_data_options = _options(_data_dir_option,
                        click.option("--dataset", default="ml-latest-small", show_default=True, help="Dataset name or schema .yaml."))


@data.command()
@click.argument("dataset_arg", metavar="[DATASET]", required=False)
@_data_options
@_json_option
def info(dataset_arg, dataset, data_dir, as_json):
    """Rows, CTR, vocabularies and history lengths (in all and per event type) per split; Bayes NE of synthetic data.

    DATASET (or --dataset): a registered name, a schema .yaml, or a folder written by `kunlun data synth`.
    """
    from kunlun.data.registry import dataset_info, info_tables

    summary = dataset_info(dataset_arg or dataset, data_dir, log=log)
    emit_json(summary) if as_json else info_tables(summary)


def _count(ctx, param, value):
    from kunlun.data.synthetic import parse_count

    return None if value is None else parse_count(value)


@data.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to create (must not exist, or be empty).")
@click.option("--examples", required=True, callback=_count, help="Impressions to write: 250000, 250k, 1M, 1e8 …")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same parameters → byte-identical files.")
@click.option("--items", type=int, default=20_000, show_default=True, help="Items in the world.")
@click.option("--categories", type=int, default=32, show_default=True, help="Item categories.")
@click.option("--dim", type=int, default=16, show_default=True, help="Latent dimension of users and items.")
@click.option("--events-per-user", type=float, default=50.0, show_default=True, help="Mean impressions per user (log-normal).")
@click.option("--chunk-users", type=int, help="Users simulated at once (memory grows with it; the data do not). Default: ~262k rows' worth.")
@click.option("--shard-rows", default="1M", show_default=True, callback=_count, help="Rows per Parquet file.")
@_quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the Bayes NE as one JSON object.")
@click.argument("world_overrides", metavar="[KEY=VALUE]...", nargs=-1)
def synth(out, examples, seed, items, categories, dim, events_per_user, chunk_users, shard_rows, quiet, as_json, world_overrides):
    """Write a synthetic world with a known click probability (Parquet shards, synth.json, bayes.json).

    Every other parameter of the world is a KEY=VALUE argument (drift_days=20 short_term_weight=1; the fields of
    kunlun.data.synthetic.World). Train on it with `kunlun train --dataset OUT`; `kunlun data info OUT` shows its
    Bayes NE per split. What it models and what it does not: the docstring of kunlun.data.synthetic.
    """
    from kunlun.data.synthetic import World, bayes_table, generate_with_progress, world_with

    world = world_with(world_overrides, World(items=items, categories=categories, dim=dim, events_per_user=events_per_user))
    manifest, bayes = generate_with_progress(out, examples, seed, world, chunk_users, shard_rows, progress=not quiet, log=log)
    emit_json({"manifest": manifest, "bayes": bayes}) if as_json else bayes_table(bayes)


@data.command()
@_data_options
@click.option("--chunk-rows", type=click.IntRange(min=1), help="Prepare this many rows at a time, in memory bounded by the chunk (automatic "
              "for synthetic sets above 2M examples and other files above 256 MiB); the cache is the same either way.")
def prepare(dataset, data_dir, chunk_rows):
    """Read the raw files, build vocabularies and write the columnar cache (done automatically by train)."""
    from kunlun.data.registry import rebuild_cache

    rebuild_cache(dataset, data_dir, chunk_rows, log)


# ---------------------------------------------------------------------------------------- runs
@cli.command()
@click.argument("names", metavar="[RUN]...", nargs=-1)
@click.option("--root", type=click.Path(path_type=Path), default=Path("runs"), show_default=True, help="Folder of run directories.")
@_json_option
def runs(names, root, as_json):
    """A table of past runs (newest first); given RUNs (run directories, or names under --root), those runs side by side:
    the config keys that differ, valid/test metrics, FLOPs, steps, wall time and code version."""
    from kunlun.runs import show_runs

    show_runs(names, root, as_json)


# ---------------------------------------------------------------------------------------- bench
@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Speed report as one JSON object (when no subcommand is given).")
@click.pass_context
def bench(ctx, as_json):
    """Benchmarks: speed/MFU (default: `kunlun bench` = `kunlun bench speed`), quality of every model, Kunlun ablations."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(speed, as_json=as_json)


@bench.command()
@_config_option
@click.option("--preset", type=click.Choice(["default", "d128", "production"]), default="default", show_default=True,
              help="Model/batch size to time (overrides given after it win).")
@click.option("--dataset", help="Dataset (default: the config's).")
@_data_dir_option
@click.option("--steps", type=int, default=30, show_default=True, help="Timed training steps per dtype.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timing repeats; medians are reported.")
@click.option("--no-trainer", is_flag=True, help="Skip the end-to-end timing through the trainer.")
@click.option("--dtypes", help="Comma-separated dtypes to time (fp32,bf16; default: fp32, and bf16 where it is fast).")
@click.option("--profile", "profile_path", type=click.Path(path_type=Path),
              help="Instead of timing: trace 10 training steps into this Chrome-trace JSON and print the top operators.")
@_json_option
@_overrides_argument
def speed(config_path, preset, dataset, data_dir, steps, repeats, no_trainer, dtypes, profile_path, as_json, overrides):
    """Training / inference examples/s and MFU (fp32 and bf16) against this machine's measured GEMM peak."""
    from kunlun.bench.speed import speed_bench_reported

    speed_bench_reported(config_path, preset, overrides, dataset, data_dir, steps, repeats, trainer=not no_trainer, dtypes=_list(dtypes, str),
                         profile_path=profile_path, as_json=as_json)


@bench.command()
@_config_option
@click.option("--model", help="Model name (default: the config's).")
@click.option("--dataset", help="Dataset (default: the config's).")
@_data_dir_option
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Training steps timed per repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Alternations; medians are reported.")
@_json_option
@_overrides_argument
def memmap(config_path, model, dataset, data_dir, steps, repeats, as_json, overrides):
    """Examples/s from the memory-mapped cache vs the same arrays in RAM: the loader alone and training (alternated)."""
    from kunlun.bench.speed import memmap_text, memmap_vs_ram
    from kunlun.config import load_config

    r = memmap_vs_ram(load_config(config_path, list(overrides), model, dataset=dataset, data_dir=data_dir), steps=steps, repeats=repeats)
    emit_json(r) if as_json else click.echo(memmap_text(r, repeats))


_bench_options = _options(
    _json_option,
    click.option("--reuse-stale", is_flag=True, help="Keep finished runs of the same config trained by other code (their rows are marked stale)."),
    click.option("--threads", type=int, default=0, help="torch threads per run (0: default)."),
    click.option("--seeds", help="Comma-separated seeds (overrides the spec)."),
    _data_dir_option,
    click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True,
                 help="Where run records and tables go; finished points there are reused."),
    click.option("--spec", type=click.Path(path_type=Path), help="Benchmark spec (default: packaged configs/quality.yaml)."),
)


def _list(text: str | None, convert=str) -> list | None:
    """A comma-separated option → list (None when not given)."""
    return [convert(x) for x in text.split(",")] if text else None


@bench.command()
@_bench_options
@click.option("--datasets", help="Comma-separated datasets (overrides the spec).")
@click.option("--models", help="Comma-separated models (overrides the spec).")
@click.option("--check", type=click.Path(path_type=Path), help="Pinned expected NE (JSON): exit 1 if a model is worse.")
@click.option("--pin", type=click.Path(path_type=Path), help="Write this run's mean NE (tolerance max(3σ, 0.005)) as pins.")
@click.option("--tuned", type=click.Path(path_type=Path),
              help="Train each model with the best trial of its study DIR/<model>-<dataset> (kunlun tune; the same budget "
                   "for every model of a data set) instead of its spec overrides.")
def quality(spec, out, data_dir, seeds, threads, reuse_stale, as_json, datasets, models, check, pin, tuned):
    """Train every model on every dataset with every seed; write quality.md / quality.json (mean ± std)."""
    from kunlun.bench.quality import report_quality, run_quality
    from kunlun.bench.spec import load_spec

    results = run_quality(load_spec(spec, _list(seeds, int), _list(datasets), _list(models)), out, data_dir, threads, reuse_stale,
                          tuned)
    if report_quality(results, as_json, check, pin):  # regressions against --check, each named on stderr
        sys.exit(1)


@bench.command()
@_bench_options
@click.option("--dataset", help="Data set to ablate on (overrides the spec's ablation.dataset).")
@click.option("--variants", help="Comma-separated variants to run (a subset of the spec's; the full model always runs).")
@click.option("--timing-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Training steps per variant per timing round.")
@click.option("--timing-rounds", type=click.IntRange(min=0), default=5, show_default=True,
              help="Rounds of step timing, the variants in turn (0: no timing).")
@_overrides_argument
def ablation(spec, out, data_dir, seeds, threads, reuse_stale, as_json, dataset, variants, timing_steps, timing_rounds, overrides):
    """Kunlun with each component off in turn: ΔNE, ΔFLOPs/example and Δ time per training step and per inference
    batch against the full model (the times measured after the runs, the variants interleaved).

    OVERRIDES are config keys for every run, the full model's too, e.g. train.recipe=one_pass"""
    from kunlun.bench.quality import ablation_markdown, run_ablation
    from kunlun.bench.spec import load_spec

    s = load_spec(spec, _list(seeds, int), ablation_dataset=dataset, variants=_list(variants))
    result = run_ablation(s, out, data_dir, threads, reuse_stale, list(overrides), timing_steps, timing_rounds)
    emit_json(result) if as_json else click.echo(ablation_markdown(result))


@bench.command(name="formats")
@_bench_options
@click.option("--datasets", help="Comma-separated datasets (overrides the spec).")
@click.option("--formats", "formats_", help="Comma-separated formats (overrides the spec; keep bf16, the baseline).")
@click.option("--no-variants", is_flag=True, help="Skip the RHT / stochastic-rounding recipe variants.")
def formats_cmd(spec, out, data_dir, seeds, threads, reuse_stale, as_json, datasets, formats_, no_variants):
    """Train in every number format × seed × dataset: relative NE vs BF16, recipes, tensor quantization errors."""
    from kunlun.bench.formats import formats_markdown, load_formats_spec, run_formats

    s = load_formats_spec(spec, _list(seeds, int), _list(datasets), _list(formats_), variants=not no_variants)
    results = run_formats(s, out, data_dir, threads, reuse_stale)
    emit_json(results["results"]) if as_json else click.echo(formats_markdown(results))


# ---------------------------------------------------------------------------------------- scaling
@cli.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default sweeps/<name>); finished points there are skipped.")
@click.option("--data-dir", help="Folder holding the dataset folders (overrides the sweep file).")
@click.option("--parallel", type=int, help="Training processes at once (overrides the sweep file).")
@click.option("--threads", type=int, help="torch threads per process (overrides the sweep file).")
@click.option("--dry-run", is_flag=True, help="Validate every point and list the runs without training.")
@click.option("--reuse-stale", is_flag=True, help="Keep finished points of the same config trained by other code.")
@click.option("--launcher", default="local", show_default=True, help="Where the training processes run: local, ray (the cluster at "
              "$RAY_ADDRESS, else a local one; kunlun[ray]) or submitit (SLURM where sbatch is found; kunlun[submitit]).")
def sweep(sweep_file, out, data_dir, parallel, threads, dry_run, reuse_stale, launcher):
    """Run a grid of training runs (SWEEP_FILE, YAML) as separate processes; resumable."""
    from kunlun.scaling.sweep import run_sweep_file

    run_sweep_file(sweep_file, out, data_dir, parallel, threads, dry_run, reuse_stale, launcher)


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--holdout", type=int, default=2, show_default=True, help="Hold out the runs at the K largest computes.")
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True, help="Bootstrap resamples for intervals.")
@click.option("--level", type=float, default=0.9, show_default=True, help="Interval coverage.")
@click.option("--tolerance", type=float, default=1e-3, show_default=True, help="Largest held-out relative NE error that a law may make.")
@click.option("--family", help="Fit only this family (model name or the CSV's family column).")
@click.option("--compare", nargs=2, metavar="A B", help="Compare two families (names among INPUTS, or two paths): slope ratio, compute multiplier.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), help="Write report.html and PNG plots into this folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap random seed.")
@click.option("--frontier", "use_frontier", is_flag=True, help="Fit the compute-optimal frontier of a sizes × data grid, and its size law.")
@click.option("--x", "x", type=click.Choice(["compute", "layers"]), default="compute", show_default=True, help="NE as a law of this.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def fit(inputs, holdout, n_boot, level, tolerance, family, compare, report_dir, seed, use_frontier, x, as_json):
    """Fit and validate scaling laws on run directories, sweep folders or a CSV table (compute, ne[, family, seed, layers])."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: threads only slow down thousands of tiny fits
    from kunlun.scaling.report import fit_and_report, fit_tables

    result = fit_and_report(list(inputs), family, compare, holdout, n_boot, level, tolerance, seed, report_dir, log, x, use_frontier)
    emit_json(result) if as_json else fit_tables(result)


# ---------------------------------------------------------------------------------------- tune
@cli.command()
@click.argument("model")
@click.option("--dataset", required=True, help="Dataset to tune on (its validation split only; the test split is never scored).")
@click.option("--study-dir", type=click.Path(path_type=Path),
              help="Study folder: study.db, trials/, best.yaml (default runs/tune/<model>-<dataset>).")
@click.option("--study-root", type=click.Path(path_type=Path), metavar="ROOT",
              help="Instead of --study-dir: the study is ROOT/<model>-<dataset>, where bench quality --tuned ROOT looks for it.")
@click.option("--trials", type=click.IntRange(min=1), help="Finished trials the study is to hold (default: the search-space file's budget).")
@click.option("--examples", type=click.IntRange(min=1), help="Training examples per trial, at most (default: the budget's).")
@click.option("--space", type=click.Path(path_type=Path), help="Search-space file (default: packaged configs/search_spaces.yaml).")
@_data_dir_option
@click.option("--seed", type=int, default=0, show_default=True, help="Every trial's training seed; TPE draws trial k with seed + k.")
@click.option("--threads", type=int, default=0, help="torch threads per trial (0: torch's default).")
@click.option("--json", "as_json", is_flag=True, help="Print the study's summary as one JSON object.")
@_overrides_argument
def tune(model, dataset, study_dir, study_root, trials, examples, space, data_dir, seed, threads, as_json, overrides):
    """Search MODEL's hyper-parameters (Optuna TPE, median pruning on validation NE); the best trial's config is written
    to <study dir>/best.yaml for `kunlun train --config`. Run it again to continue a study; run several at once to share it.

    OVERRIDES are config keys fixed for every trial (not searched ones), e.g.  train.batch_size=512
    """
    from kunlun.tuning import study_name, tune_reported

    if study_dir and study_root:
        raise click.UsageError("give --study-dir or --study-root, not both")
    if study_root:
        study_dir = study_root / study_name(model, dataset)
    tune_reported(model, dataset, study_dir, trials=trials, examples=examples, overrides=list(overrides), space=space, seed=seed,
                  threads=threads, data_dir=data_dir, as_json=as_json)


# ---------------------------------------------------------------------------------------- export / serve
@cli.command(name="export")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Package file to write, e.g. model.pt2.")
@click.option("--compile", "compile_", type=click.Choice(["auto", "aoti", "none"]), default="auto", show_default=True,
              help="AOTInductor: auto = compile, keep the exported program alone if compiling fails; aoti = fail instead; none = skip.")
@click.option("--triton", "triton_dir", type=click.Path(path_type=Path),
              help="Also write a Triton Inference Server model repository (Python backend) into this folder.")
@click.option("--static-seq-len", is_flag=True, help="Fix the sequence length at data.max_seq_len (what the server sends; specialised kernels).")
@click.option("--json", "as_json", is_flag=True, help="Print the package's meta.json.")
def export_cmd(run, out, compile_, triton_dir, static_seq_len, as_json):
    """Package a trained RUN (directory or checkpoint) with its encoder as one self-contained PT2 file."""
    from kunlun.serving.export import export_package
    from kunlun.serving.triton import write_model_repository

    meta = export_package(run, out, compile_, dynamic_len=not static_seq_len)
    if triton_dir:
        log(f"wrote Triton model repository {write_model_repository(out, triton_dir)}")
    if as_json:
        emit_json(meta)


def _serve_options(f):
    from kunlun.serving.options import ServeOptions

    for o in reversed(fields(ServeOptions)):  # --max-batch, … as ServeOptions defines them
        f = click.option(f"--{o.name.replace('_', '-')}", type=type(o.default), default=o.default, show_default=True, help=o.metadata["help"])(f)
    return click.option("--runtime", type=click.Choice(["auto", "aoti", "exported_program"]), default="auto", show_default=True,
                        help="A package's program: auto = AOTInductor where it loads, else exported.")(f)


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free port; the URL is printed).")
@_serve_options
def serve(target, host, port, runtime, **kw):
    """Serve TARGET (a package from `kunlun export`, or a run directory) over HTTP: POST /score, GET /health, GET /schema."""
    from kunlun.serving.options import ServeOptions
    from kunlun.serving.server import serve_target

    serve_target(target, host, port, runtime, ServeOptions(**kw))


@bench.command(name="serve")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--data-dir", help="Where the run's dataset lives (the requests are its test rows).")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Closed-loop client counts (comma-separated).")
@click.option("--batch", "batch", default="1,256", show_default=True, help="Examples per request for the closed-loop phases.")
@click.option("--rate", default="200", show_default=True, help="Open-loop rates of single-example requests/s (comma-separated; 0: none).")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds per phase at most.")
@click.option("--max-requests", type=int, default=20000, show_default=True, help="Requests per phase at most.")
@_json_option
@_serve_options
def bench_serve(target, data_dir, concurrency, batch, rate, duration, max_requests, as_json, **kw):
    """Load a server on loopback: QPS, examples/s, p50/p95/p99 latency, errors and peak memory per load level."""
    from kunlun.bench.serve import load_phases, run_serve_bench, serve_table, server_args

    phases = load_phases(_list(batch, int), _list(concurrency, int), _list(rate, float))
    result = run_serve_bench(target, phases, duration_s=duration, max_requests=max_requests, data_dir=data_dir, server_args=server_args(kw))
    emit_json(result) if as_json else click.echo(serve_table(result))


def main() -> None:
    from kunlun.processes import die_with_parent, exit_on_sigterm

    exit_on_sigterm()  # a terminated run cleans up like an interrupted one
    die_with_parent()  # a sweep's training process ends with its sweep
    try:
        cli.main(standalone_mode=False)
    except BrokenPipeError:  # stdout closed early (kunlun runs --json | head): not worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("kunlun: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        message = user_error(exc)  # None: a bug, whose traceback is shown
        if message is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # one line, exit 2; under torchrun every rank meets the error, rank 0 says it
            click.echo("kunlun: error: " + " ".join(message.splitlines()).strip(), err=True)
        sys.exit(2)
