"""Hyper-parameter search (``kunlun tune MODEL --dataset NAME``): Optuna's TPE sampler over the model's search space
(``configs/search_spaces.yaml``), each trial a normal run scored on the validation split only, bad trials pruned.

Example::

    from kunlun.tuning import tune

    summary = tune("dnn", "ml-100k", Path("runs/tune/dnn-ml-100k"), trials=20)
    # kunlun train --config runs/tune/dnn-ml-100k/best.yaml

Protocol — the same for every model, so that tuned models compare fairly:

- a trial's config is the model's quality-spec config (``quality.yaml``: the dataset's recipe, then the model's own
  overrides), then the caller's overrides, then the values TPE drew, then the budget: ``train.max_steps`` = the
  budget's training examples / batch size, ``train.epochs`` enough epochs for them (the warm-up + schedule span them),
  ``train.eval_every_steps`` so that the trial is validated ``validations`` times, and ``train.patience=0`` (the
  pruner, not early stopping, ends trials early);
- its objective is its best validation NE (whatever ``train.monitor`` picks the checkpoint by); the test split is never
  scored (``Trainer(final_splits=("valid",))``);
- each validation's NE is reported to a ``MedianPruner`` at the validation's index (1, 2, …: the same fraction of the
  budget in every trial), which prunes a trial whose best NE so far is worse than the median of the other trials at
  that validation — from the 6th trial on (5 startup trials) and the 3rd validation on. The median rule needs no
  budget split: Hyperband's brackets pay off with many more trials than a study of tens, and they give trials unequal
  budgets by design;
- a study runs until it holds ``trials`` finished (completed or pruned) drawn trials, counted across every process
  working on it, and then one trial more: the model's packaged configuration (its quality-spec config with nothing
  drawn), at the same budget and never pruned, so that a study never ends with a best trial worse on validation than
  what the model does untuned. Every model's study gets its own packaged trial, so the budget stays the same for all. It runs after
  the drawn trials, which therefore draw what they would without it (TPE's first trials are random, and a packaged
  trial, drawing nothing, takes no draw index).

Studies live in SQLite through Optuna's RDB storage, ``<study dir>/study.db``: a second ``tune`` on the same folder
continues the study (more trials, or the ones a kill left), and several processes may work on one study at once. A
trial whose process was killed is found by its stale heartbeat (after ``HEARTBEAT_GRACE_S``) and run again with the
same values. TPE is seeded per trial (``seed`` + the number of trials that drew values before it: a rerun of a killed
trial draws nothing and does not count), so the values a trial draws depend on the study's history, not on which
process draws them, nor on whether the study was interrupted. Each trial is a run record under ``<study dir>/trials/<number>`` (its
``checkpoints/last`` removed when it ends); the best completed trial's exact config is ``<study dir>/best.yaml``,
which ``kunlun train --config`` takes (rewritten whenever a trial beats it).

Optuna is an extra: ``pip install "kunlun[tune]"``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from kunlun.config import DEFAULT_CONFIG_DIR, Config, load_config, read_yaml, typed_mapping
from kunlun.console import emit_json, log
from kunlun.errors import KunlunError
from kunlun.files import atomic_write_text
from kunlun.runs import DEFAULT_RUNS_DIR

INSTALL = 'pip install "kunlun[tune]"'
STUDY_NAME = "kunlun-tune"
PRUNER_STARTUP_TRIALS = 5  # trials that run to the end before the pruner compares any trial with them
PRUNER_WARMUP_VALIDATIONS = 3  # no trial is pruned before its 3rd validation
PACKAGED_ATTR = "packaged"  # user attribute of the trial that trains the packaged configuration (draws nothing)
NONFINITE_ATTR = "nonfinite_loss"  # user attribute of a trial ended by a non-finite loss (recorded as pruned)
RETRY_ATTR = "failed_trial"  # Optuna's mark on a killed trial's rerun (its retry callbacks' retried_trial_number)
HEARTBEAT_S, HEARTBEAT_GRACE_S = 60, 180  # a running trial whose heartbeat is older than the grace is a killed one
SQLITE_TIMEOUT_S = 60  # how long a process waits for another's write lock on study.db


def require_optuna():
    """The optuna module, or a one-line KunlunError naming the install command."""
    try:
        import optuna
    except ImportError:
        raise KunlunError(f"kunlun tune needs Optuna, an optional extra: {INSTALL}") from None
    return optuna


# ------------------------------------------------------------------------------------------ search spaces


@dataclass(frozen=True)
class Budget:
    """What every trial of every study gets: ``trials`` finished trials per study, at most ``examples`` training
    examples per trial, ``validations`` validations per trial."""

    trials: int
    examples: int
    validations: int

    def __post_init__(self) -> None:
        for key in ("trials", "examples", "validations"):
            if getattr(self, key) < 1:
                raise KunlunError(f"tuning budget {key}: expected a positive integer, got {getattr(self, key)}")


@dataclass(frozen=True)
class Param:
    """One searched config key: ``choices``, or a range [low, high] (integers when both ends are, log-uniform with
    ``log``)."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def values(self) -> list[Any]:
        """The values that bound it: both ends of a range, every choice (each must load as a config)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def suggest(self, trial) -> Any:
        """The value ``trial`` draws (lists among the choices travel through Optuna as their JSON text)."""
        if self.choices is not None:
            drawn = trial.suggest_categorical(self.key, [_scalar(c) for c in self.choices])
            return json.loads(drawn) if isinstance(drawn, str) and any(isinstance(c, list) for c in self.choices) else drawn
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def override(self, value: Any) -> str:
        return f"{self.key}={json.dumps(value)}"


def _scalar(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, list) else choice


SPACE_FIELDS = {"budget": dict[str, int], "common": dict[str, Any] | None, "models": dict[str, Any]}
BUDGET_KEYS = ("train.max_steps", "train.epochs", "train.eval_every_steps", "train.patience")  # set by the tuner


def load_search_space(model: str, path: Path | None = None) -> tuple[Budget, list[Param]]:
    """The budget and ``model``'s parameters from the search-space file (default: packaged
    ``configs/search_spaces.yaml``): ``common`` then the model's own keys. A malformed entry, or a value that does not
    load as a config of ``model``, is a KunlunError naming the file and the key."""
    path = Path(path) if path else DEFAULT_CONFIG_DIR / "search_spaces.yaml"
    raw = typed_mapping(read_yaml(path), SPACE_FIELDS, ("budget", "models"), str(path))
    unknown = sorted(set(raw["budget"]) - {"trials", "examples", "validations"})
    if unknown or len(raw["budget"]) != 3:
        raise KunlunError(f"{path}: budget: expected the keys trials, examples and validations"
                          + (f", not {unknown[0]!r}" if unknown else ""))
    try:
        budget = Budget(**raw["budget"])
    except KunlunError as exc:
        raise KunlunError(f"{path}: {exc}") from None
    if model not in raw["models"]:
        raise KunlunError(f"{path}: no search space for model {model!r}; it has {', '.join(raw['models'])}")
    entries = {**(raw.get("common") or {}), **(raw["models"][model] or {})}
    params = [parse_param(key, spec, f"{path}: {model}: {key}") for key, spec in entries.items()]
    for p in params:
        if p.key in BUDGET_KEYS:
            raise KunlunError(f"{path}: {model}: {p.key} is set by the tuning budget, not searched")
        for value in p.values():
            try:
                load_config(None, [p.override(value)], model=model)
            except KunlunError as exc:
                raise KunlunError(f"{path}: {model}: {p.key}={json.dumps(value)} does not load: {exc}") from None
    return budget, params


def parse_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(key, str) or len(key.split(".")) != 2 or not all(key.split(".")):
        raise KunlunError(f"{where}: expected a config key section.key")
    if not isinstance(spec, dict):
        raise KunlunError(f"{where}: expected a mapping {{low: A, high: B}} or {{choices: [...]}}")
    unknown = sorted(set(spec) - {"low", "high", "log", "choices"})
    if unknown:
        raise KunlunError(f"{where}: unknown field {unknown[0]!r}; expected low, high, log or choices")
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise KunlunError(f"{where}: choices: expected a non-empty list, and no low/high/log beside it")
        return Param(key, choices=tuple(spec["choices"]))
    if not {"low", "high"} <= set(spec):
        raise KunlunError(f"{where}: expected both low and high (or choices)")
    low, high = (_number(spec[k], f"{where}: {k}") for k in ("low", "high"))
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise KunlunError(f"{where}: log: expected true or false")
    if not low < high:
        raise KunlunError(f"{where}: expected low < high, got {low} and {high}")
    if log_scale and low <= 0:
        raise KunlunError(f"{where}: a log range needs low > 0, got {low}")
    return Param(key, low, high, log_scale)


def _number(value: Any, where: str) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise KunlunError(f"{where}: expected a number, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------ trials


def base_overrides(model: str, dataset: str, quality_spec: Path | None = None) -> list[str]:
    """The model's quality-spec overrides on ``dataset``: the dataset's recipe, then the model's own."""
    from kunlun.bench.spec import load_spec, point_overrides

    spec = load_spec(quality_spec)
    if model not in spec["models"]:
        raise KunlunError(f"model {model!r} is not in the quality spec; it has {', '.join(spec['models'])}")
    return point_overrides(spec, dataset, model)


def budget_overrides(cfg: Config, budget: Budget, train_rows: int) -> list[str]:
    """The budget as config keys for a trial of ``cfg``: at most ``budget.examples`` training examples (steps of the
    trial's batch size; epochs enough to hold them: the schedule spans exactly those steps), validated
    ``budget.validations`` times (every that many steps, inside epochs and at their ends), no early stopping."""
    steps = max(1, math.ceil(budget.examples / cfg.train.batch_size))
    steps_per_epoch = math.ceil(train_rows / cfg.train.batch_size)
    epochs = math.ceil(steps / steps_per_epoch)
    return [f"train.max_steps={steps}", f"train.epochs={epochs}",
            f"train.eval_every_steps={max(1, math.ceil(min(steps, epochs * steps_per_epoch) / budget.validations))}",
            "train.patience=0"]


def trial_config(model: str, dataset: str, overrides: list[str], drawn: list[str], budget: Budget, train_rows: int,
                 settings: dict[str, Any]) -> Config:
    """A trial's config: base and caller overrides, the drawn values, then the budget."""
    cfg = load_config(None, [*overrides, *drawn], model=model, dataset=dataset, **settings)
    return load_config(None, [*overrides, *drawn, *budget_overrides(cfg, budget, train_rows)], model=model, dataset=dataset,
                       **settings)


def _seeded_tpe(optuna, seed: int):
    """TPE seeded anew for each trial with ``seed`` + its draw index (its number less the reruns of killed trials
    before it, which take numbers but draw nothing): a trial's draw depends on the study's history and its index, not on
    which of several processes draws it (one seeded sampler per process would give two processes the same draws), nor
    on a kill (counting the rerun would skip a draw that an uninterrupted study makes)."""

    class PerTrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self):
            self.inner = optuna.samplers.TPESampler(seed=seed)

        def before_trial(self, study, trial):
            reruns = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and not drew(t))
            self.inner = optuna.samplers.TPESampler(seed=seed + trial.number - reruns)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

    return PerTrialSeededTPE()


def open_study(optuna, study_dir: Path, identity: dict[str, Any], seed: int):
    """The study in ``<study_dir>/study.db``, created with ``identity`` (model, dataset, budget, space, overrides,
    seed) or loaded: a study made with another identity is a KunlunError naming the first difference."""
    study_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats and retries are "experimental"
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9; before: RetryFailed…
        stale = ({"heartbeat_stale_trial_callback": retry()} if retry
                 else {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback()})
        storage = optuna.storages.RDBStorage(f"sqlite:///{(study_dir / 'study.db').resolve()}", heartbeat_interval=HEARTBEAT_S,
                                             grace_period=HEARTBEAT_GRACE_S,
                                             engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}}, **stale)
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="minimize", load_if_exists=True,
                                    sampler=_seeded_tpe(optuna, seed),
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                                                       n_warmup_steps=PRUNER_WARMUP_VALIDATIONS))
    recorded = study.user_attrs
    if not recorded:
        for k, v in identity.items():
            study.set_user_attr(k, v)
    else:
        for k, v in identity.items():
            if recorded.get(k) != v:
                raise KunlunError(f"{study_dir}: this study was made with {k}={json.dumps(recorded.get(k))}, not "
                                  f"{json.dumps(v)}; continue it as it was made, or tune into another --study-dir")
    return study


def drew(trial) -> bool:
    """Whether ``trial`` drew its values: not a rerun of a killed trial (it repeats that trial's values) and not the
    packaged configuration's trial (nothing drawn)."""
    return RETRY_ATTR not in trial.system_attrs and not trial.user_attrs.get(PACKAGED_ATTR)


def finished(optuna, study) -> int:
    """Finished (completed or pruned) drawn trials, the reruns of killed ones included (the packaged trial not)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(PACKAGED_ATTR))


def packaged_done(optuna, study) -> bool:
    """Whether the packaged configuration's trial has run to its end (or stopped on a non-finite loss). A packaged
    trial the pruner cut short (studies of before it was exempt) does not count: the next ``tune`` runs it again."""
    state = optuna.trial.TrialState
    return any(t.user_attrs.get(PACKAGED_ATTR) and (t.state == state.COMPLETE or (t.state == state.PRUNED and t.user_attrs.get(NONFINITE_ATTR)))
               for t in study.get_trials(deepcopy=False))


def run_packaged_trial(optuna, study, objective, wait_s: float) -> None:
    """Train the packaged configuration as one trial of ``study`` unless one has finished: enqueued (once) and run by
    this process, or waited for while another process runs it (a killed one is failed by its stale heartbeat and its
    rerun enqueued by Optuna, which this loop then runs)."""
    enqueued = 0
    while not packaged_done(optuna, study):
        mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(PACKAGED_ATTR)]
        state = optuna.trial.TrialState
        if any(t.state == state.WAITING for t in mine):
            study.optimize(objective, n_trials=1)  # pops the lowest waiting trial: it, or a killed trial's rerun first
        elif any(t.state == state.RUNNING for t in mine):
            time.sleep(wait_s)
            optuna.storages.fail_stale_trials(study)
        elif enqueued:  # this process's packaged trial ended without counting: do not loop on it
            raise KunlunError(f"the packaged configuration's trial {mine[-1].number} ended {mine[-1].state.name.lower()}; "
                              "its run record is in the study's trials folder")
        else:
            study.enqueue_trial({}, user_attrs={PACKAGED_ATTR: True})
            enqueued += 1


def write_best(optuna, study, study_dir: Path) -> Path | None:
    """``<study_dir>/best.yaml``: the exact config of the best completed trial, with a header saying what it is."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return None
    best = best_trial(done)
    a = study.user_attrs
    path = study_dir / "best.yaml"
    drawn = ", ".join(f"{k}={json.dumps(v)}" for k, v in best.user_attrs["drawn"].items()) or "nothing (the packaged configuration)"
    header = (f"# kunlun tune: the best of {len(done)} completed trial(s) of the study in {study_dir} ({a['model']} on "
              f"{a['dataset']}):\n# trial {best.number}, best validation NE {best.value:.6f}, run record "
              f"{study_dir / 'trials' / trial_dir_name(best.number)}\n# drawn: {drawn}\n"
              f"# The trial's exact config, its budget included (train.max_steps, train.epochs, train.eval_every_steps, "
              f"train.patience).\n# Train it: kunlun train --config {path}\n")
    atomic_write_text(path, header + yaml.safe_dump(best.user_attrs["config"], sort_keys=False))
    return path


def best_trial(done: list) -> Any:
    """The completed trial with the lowest validation NE (the earliest among equals)."""
    return min(done, key=lambda tr: (tr.value, tr.number))


def study_name(model: str, dataset: str) -> str:
    """A study's folder name, ``<model>-<data set>``: under ``runs/tune`` by default, and where ``kunlun bench quality
    --tuned DIR`` looks for each model's study (a schema file's data set by its file's stem)."""
    name = Path(dataset).stem if dataset.endswith((".yaml", ".yml")) else Path(dataset).name
    return f"{model}-{name}"


def best_of_study(study_dir: Path, model: str = "MODEL", dataset: str = "NAME") -> dict[str, Any]:
    """What a study gives a tuned quality table: its model, data set and budget (``examples``, ``validations``,
    ``finished`` trials, ``overrides`` fixed for every trial) and its best completed trial (``trial``, ``valid_ne``,
    ``drawn`` values, exact ``config``); ``finished`` counts the drawn trials, ``packaged`` is 1 once the packaged
    configuration's trial has run. A KunlunError when there is no study (naming the ``kunlun tune`` command that
    makes it, for ``model`` on ``dataset`` when given) or no completed trial."""
    optuna = require_optuna()
    db = Path(study_dir) / "study.db"
    if not db.is_file():
        of = f" of {model} on {dataset}" if model != "MODEL" else ""
        raise KunlunError(f"{study_dir}: no tuning study{of} there (make it with kunlun tune {model} --dataset {dataset} "
                          f"--study-root {Path(study_dir).parent})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db.resolve()}")
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise KunlunError(f"{study_dir}: the study has no completed trial yet; run kunlun tune on it")
    best = best_trial(done)
    a = study.user_attrs
    return {"study": str(study_dir), "model": a["model"], "dataset": a["dataset"], "examples": a["examples"],
            "validations": a["validations"], "finished": finished(optuna, study),
            "packaged": int(packaged_done(optuna, study)), "overrides": a["overrides"],
            "trial": best.number, "valid_ne": best.value, "drawn": best.user_attrs["drawn"], "config": best.user_attrs["config"]}


def trial_dir_name(number: int) -> str:
    return f"{number:04d}"


def _quiet(message: str) -> None:
    """A trial's own training log: its run record has it all."""


def tune(model: str, dataset: str, study_dir: Path | None = None, *, trials: int | None = None, examples: int | None = None,
         overrides: list[str] | None = None, space: Path | None = None, quality_spec: Path | None = None, seed: int = 0,
         threads: int = 0, data_dir: str | None = None, logger: Callable[[str], None] = log) -> dict[str, Any]:
    """Tune ``model`` on ``dataset`` in ``study_dir`` (default ``runs/tune/<model>-<dataset>``) until the study holds
    ``trials`` finished trials (default: the search-space file's budget); → a summary (study dir, best trial, its NE
    and values, best.yaml, trial counts by state). ``examples``: training examples per trial (default: the budget's).
    ``overrides``: config keys fixed for every trial (not searched, not budget keys)."""
    optuna = require_optuna()
    from kunlun.data.registry import prepare_dataset
    from kunlun.training.step import NonFiniteLoss
    from kunlun.training.trainer import Trainer

    budget, params = load_search_space(model, space)
    budget = Budget(trials or budget.trials, examples or budget.examples, budget.validations)
    overrides = list(overrides or [])
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in BUDGET_KEYS or key in {p.key for p in params}:
            raise KunlunError(f"override {item!r}: {key} is {'set by the budget' if key in BUDGET_KEYS else 'searched'} in a "
                              f"tuning study; leave it out")
    fixed = [*base_overrides(model, dataset, quality_spec), *overrides]
    settings = {"seed": seed, "threads": threads or None, "data_dir": data_dir}
    load_config(None, fixed, model=model, dataset=dataset, **settings)  # a bad override fails before anything is made
    study_dir = Path(study_dir or DEFAULT_RUNS_DIR / "tune" / study_name(model, dataset))
    identity = {"model": model, "dataset": dataset, "examples": budget.examples, "validations": budget.validations,
                "space": [asdict(p) | {"choices": list(p.choices) if p.choices is not None else None} for p in params],
                "overrides": fixed, "seed": seed}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    study = open_study(optuna, study_dir, identity, seed)
    data = prepare_dataset(dataset, data_dir, log=logger)
    train_rows = len(data.splits["train"])

    def objective(trial) -> float:
        packaged = bool(trial.user_attrs.get(PACKAGED_ATTR))
        drawn = {} if packaged else {p.key: p.suggest(trial) for p in params}
        cfg = trial_config(model, dataset, fixed, [p.override(drawn[p.key]) for p in params if p.key in drawn], budget, train_rows, settings)
        trial.set_user_attr("drawn", drawn)
        trial.set_user_attr("config", cfg.to_dict())
        run_dir = study_dir / "trials" / trial_dir_name(trial.number)
        if run_dir.exists():  # left by a process killed before its study.db knew the trial ended
            shutil.rmtree(run_dir)
        validations: list[float] = []

        def report(rec: dict[str, Any]) -> None:
            validations.append(rec["valid"]["ne"])
            trial.report(rec["valid"]["ne"], len(validations))
            if not packaged and trial.should_prune():  # the packaged trial is the study's floor: never cut short
                raise optuna.TrialPruned(f"validation {len(validations)}: NE {rec['valid']['ne']:.4f}")

        trainer = Trainer(cfg, data, run_dir, progress=False, logger=_quiet, on_validation=report, final_splits=("valid",))
        trainer.start_record()
        values = ", ".join(f"{k}={json.dumps(v)}" for k, v in drawn.items()) or "the packaged configuration"
        try:
            trainer.fit()
        except optuna.TrialPruned as exc:
            logger(f"trial {trial.number}: pruned at {exc} (best {min(validations):.4f})  {values}")
            raise
        except NonFiniteLoss as exc:  # a rate too high for the model: a bad trial, not a broken study
            trial.set_user_attr(NONFINITE_ATTR, True)
            logger(f"trial {trial.number}: pruned, {str(exc).split(';')[0]}  {values}")
            raise optuna.TrialPruned(str(exc).split(";")[0]) from None
        finally:
            shutil.rmtree(run_dir / "checkpoints" / "last", ignore_errors=True)  # resume state of a trial that ended
        best = min(validations)
        logger(f"trial {trial.number}: best valid NE {best:.4f} at validation {validations.index(best) + 1} of "
               f"{len(validations)}  {values}")
        return best

    def after(study, trial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            write_best(optuna, study, study_dir)

    remaining = budget.trials - finished(optuna, study)
    logger(f"study {study_dir}: {model} on {dataset}, {finished(optuna, study)} of {budget.trials} drawn trials finished, "
           f"then the packaged configuration; {budget.examples:,} training examples and {budget.validations} validations per trial")

    def stop(study, trial) -> None:  # the drawn trials finished by every process (the packaged one not counted)
        if finished(optuna, study) >= budget.trials:
            study.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, callbacks=[after, stop])
        run_packaged_trial(optuna, study, objective, HEARTBEAT_S)
        write_best(optuna, study, study_dir)
    best_path = write_best(optuna, study, study_dir)
    counts: dict[str, int] = {}
    for tr in study.get_trials(deepcopy=False):
        counts[tr.state.name.lower()] = counts.get(tr.state.name.lower(), 0) + 1
    summary: dict[str, Any] = {"study_dir": str(study_dir), "trials": counts, "best_config": str(best_path) if best_path else None}
    if best_path:
        best = study.best_trial
        summary.update(best_trial=best.number, best_valid_ne=best.value, best_drawn=best.user_attrs["drawn"])
        logger(f"best: trial {best.number}, valid NE {best.value:.4f}; its config: {best_path}")
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """``tune``'s summary as the lines ``kunlun tune`` prints."""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(summary["trials"].items())) or "no trials"
    lines = [f"study {summary['study_dir']}: {counts}"]
    if summary.get("best_config"):
        lines.append(f"best: trial {summary['best_trial']}, valid NE {summary['best_valid_ne']:.6f}")
        lines += [f"  {k} = {json.dumps(v)}" for k, v in summary["best_drawn"].items()]
        lines.append(f"train it: kunlun train --config {summary['best_config']}")
    return lines


def tune_reported(model: str, dataset: str, study_dir: Path | None = None, *, as_json: bool = False, **settings: Any) -> dict[str, Any]:
    """What ``kunlun tune`` does: ``tune`` (``settings``: its keyword arguments), then the study's summary printed on
    stdout (``summary_lines``, or one JSON object) and returned."""
    summary = tune(model, dataset, study_dir, **settings)
    emit_json(summary) if as_json else print("\n".join(summary_lines(summary)), flush=True)
    return summary
