"""Run configuration: typed frozen dataclasses, YAML files and ``section.key=value`` overrides.

Every default has one home: the dataclass field — here for ``data``, ``train`` and ``precision``, in
``kunlun.model_configs`` for the ``model`` section (one class per model, picked by ``model.name``). The
packaged ``configs/kunlun.yaml`` names the model and repeats no default.

A config has four sections, each a frozen dataclass that checks itself when it is built, so a loaded
``Config`` is valid throughout: an unknown key, a wrong type or an impossible value fails in
``load_config`` / ``Config.from_dict``, before any data is read, as a one-line ``KunlunError`` naming the key
(``config key model.num_heads: ...``). ``Config.to_dict`` writes every key, defaults included, as plain
YAML values (what a run records as its config); ``Config.from_dict`` reads it back to an equal config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kunlun.errors import KunlunError
from kunlun.model_configs import DEFAULT_MODEL, MODEL_CONFIGS, ModelConfig


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "ml-latest-small"  # a registered name, or a path to a schema YAML (generic adapter)
    data_dir: str | None = None  # None: $KUNLUN_DATA, else the user data directory
    max_seq_len: int = 50  # histories are truncated to the most recent events / left-padded

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_seq_len < 1:
            raise KunlunError(f"config key data.max_seq_len: expected a positive integer, got {self.max_seq_len}")


# implementations of the hot operators (``kunlun.ops``): train.ops picks one; auto reads $KUNLUN_OPS
OPS = ("auto", "fast", "reference")
DISTRIBUTED = ("ddp", "fsdp")  # train.distributed: dense parameters over several processes (kunlun.training.distributed)
EMBEDDING_SHARDING = ("none", "row", "torchrec")  # train.embedding_sharding


EMBEDDING_OPTIMIZERS = ("adam", "adagrad", "sgd", "sparse_adam", "sparse_adagrad")
SCHEDULES = ("cosine", "linear", "constant", "plateau")
MONITORS = ("ne", "auc")  # ne: lower is better; auc: higher is better
# train.recipe — epochs: train.epochs passes over the training split, validated at each epoch's end (and every
# train.eval_every_steps steps inside it). one_pass: each training example once, the way recommender models are trained
# on a stream: train.epochs is 1 whatever it is set to, the warm-up + train.schedule span that one pass (as they span
# every run's total steps), and the pass is validated ONE_PASS_VALIDATIONS times, evenly (unless train.eval_every_steps
# sets the cadence), so that the best checkpoint is picked at step granularity
RECIPES = ("epochs", "one_pass")
ONE_PASS_VALIDATIONS = 10


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 2048
    epochs: int = 10
    max_steps: int = 0  # 0: no limit; otherwise stop after this many optimizer steps
    # dense parameters (AdamW). 2e-3, not 1e-3: measured on six data sets, Kunlun and DNN, it is level within seed noise
    # everywhere and better where training is slow to get going (Frappe_x1's slow seed, the synthetic world): see
    # docs/results/quality.md, "The dense learning rate"
    lr: float = 2e-3
    weight_decay: float = 1e-5
    # for embedding tables: adam | adagrad | sgd (dense: every row updated every step, O(vocabulary)), or
    # sparse_adam | sparse_adagrad (sparse gradients: only the rows a batch touches, O(rows touched); lazy Adam
    # moments, no weight decay or L2)
    embedding_optimizer: str = "adam"
    embedding_lr: float = 1e-3
    embedding_weight_decay: float = 0.0  # decoupled weight decay on embedding tables (adam → AdamW); 0 = none
    embedding_l2: float = 0.0  # L2 penalty λ/2·‖E‖² on whole embedding tables (gradient λ·E on every row, every step)
    warmup_steps: int = 200
    # after warm-up, over the run's total steps (train.epochs × steps per epoch, or train.max_steps if fewer): cosine |
    # linear (to 0 at the last step) | constant | plateau (constant, ×0.1 after every validation at which
    # train.monitor did not improve, down to 1e-6: FuxiCTR's reduce-on-plateau, the BARS protocol)
    schedule: str = "cosine"
    monitor: str = "ne"  # validation metric that picks the best checkpoint and drives early stopping: ne | auc
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    patience: int = 2  # validations without improvement of train.monitor before stopping (epochs, unless eval_every_steps)
    # validation inside an epoch too: every N optimizer steps of the epoch, and at its end (0: at its end only). Each
    # validation is a line of the run's epochs.jsonl (with its step and the training examples seen), checkpoints/best is
    # written whenever train.monitor improves at one, and train.patience counts validations
    eval_every_steps: int = 0
    recipe: str = "epochs"  # epochs | one_pass (see RECIPES)
    bf16: bool = False  # autocast matmuls to bfloat16
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    ops: str = "auto"  # kunlun.ops implementation: fast | reference | auto ($KUNLUN_OPS, else fast)
    # torch.compile the training forward + loss (Inductor): faster steps after a compile of minutes on a CPU; off
    # by default because short runs do not earn the compile back (docs/results/speed.md#against-the-speed-targets has the measurement)
    compile: bool = False
    # checkpoints/last is written at every epoch end and also inside an epoch, every N optimizer steps and/or every
    # M minutes (0: off), so a killed run loses at most that much work; resume continues at the exact step
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 10.0
    # 0: each epoch visits the training rows in one random permutation. N: in blocks of N consecutive rows, the blocks in
    # a random order and the rows of each window of shuffle_window_blocks blocks in a random order — for a training split
    # larger than memory, whose rows a full permutation would read from disk one page each (kunlun.data.batches)
    shuffle_block_rows: int = 0
    shuffle_window_blocks: int = 16
    # several processes (``torchrun``; one process ignores both): how the dense parameters are replicated — ddp (a
    # copy per rank, gradients averaged) or fsdp (FSDP2 ``fully_shard``: parameters, gradients and optimizer state
    # sharded) — and the embedding tables: none (replicated with the dense part), row (rows split over the ranks) or
    # torchrec (TorchRec's planner and DistributedModelParallel; the kunlun[torchrec] extra)
    distributed: str = "ddp"
    embedding_sharding: str = "none"
    # TensorBoard event files in <run>/tensorboard (training loss, learning rate, examples/s, FLOPs, validation
    # metrics; kunlun.training.tracking): needs the kunlun[tensorboard] extra. Does not change what the run computes
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.validate()
        if self.recipe == "one_pass" and self.epochs != 1:  # the recipe is one epoch: recorded as such (frozen: set once)
            object.__setattr__(self, "epochs", 1)

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise KunlunError(f"config key train.recipe: expected one of {', '.join(RECIPES)}, got {self.recipe!r}")
        positive = ["batch_size", "eval_batch_size", "epochs", "shuffle_window_blocks"]
        for key in positive:
            if getattr(self, key) < 1:
                raise KunlunError(f"config key train.{key}: expected a positive integer, got {getattr(self, key)}")
        for key in ["max_steps", "warmup_steps", "patience", "threads", "checkpoint_every_steps", "checkpoint_every_minutes",
                    "shuffle_block_rows", "eval_every_steps"]:
            if getattr(self, key) < 0:
                raise KunlunError(f"config key train.{key}: expected >= 0, got {getattr(self, key)}")
        for key in ["lr", "embedding_lr"]:
            if not getattr(self, key) > 0:
                raise KunlunError(f"config key train.{key}: expected a positive learning rate, got {getattr(self, key)}")
        for key in ["weight_decay", "embedding_weight_decay", "embedding_l2", "grad_clip"]:
            if getattr(self, key) < 0:
                raise KunlunError(f"config key train.{key}: expected >= 0, got {getattr(self, key)}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise KunlunError(f"config key train.embedding_optimizer: expected one of {', '.join(EMBEDDING_OPTIMIZERS)}, "
                              f"got {self.embedding_optimizer!r}")
        if self.embedding_optimizer.startswith("sparse_") and (self.embedding_weight_decay or self.embedding_l2):
            raise KunlunError(f"config keys train.embedding_weight_decay / train.embedding_l2: not available with "
                              f"train.embedding_optimizer={self.embedding_optimizer} (it updates only the rows a batch touches)")
        if self.ops not in OPS:
            raise KunlunError(f"config key train.ops: expected one of {', '.join(OPS)}, got {self.ops!r}")
        if self.embedding_optimizer == "adam" and self.embedding_weight_decay and self.embedding_l2:
            raise KunlunError("config keys train.embedding_weight_decay and train.embedding_l2: set one, not both, "
                              "with train.embedding_optimizer=adam")
        if self.distributed not in DISTRIBUTED:
            raise KunlunError(f"config key train.distributed: expected one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if self.embedding_sharding not in EMBEDDING_SHARDING:
            raise KunlunError(f"config key train.embedding_sharding: expected one of {', '.join(EMBEDDING_SHARDING)}, "
                              f"got {self.embedding_sharding!r}")
        if self.schedule not in SCHEDULES:
            raise KunlunError(f"config key train.schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.monitor not in MONITORS:
            raise KunlunError(f"config key train.monitor: expected one of {', '.join(MONITORS)}, got {self.monitor!r}")


# Low-precision number formats emulated by ``kunlun.formats`` (quantize → dequantize), and the values
# of precision.format (fp32: no emulation). The names live here, with the config that selects them.
FORMATS = ("mxfp4", "nvfp4", "hif4", "hif8", "fp8_e4m3", "fp8_e5m2", "bf16")
PRECISIONS = ("fp32", *FORMATS)


@dataclass(frozen=True)
class PrecisionConfig:
    """Emulated low-precision GEMMs (see ``kunlun.formats.gemm``)."""

    format: str = "fp32"  # fp32 (no emulation) | bf16 | fp8_e4m3 | fp8_e5m2 | hif8 | mxfp4 | nvfp4 | hif4
    weights: bool = True  # quantize weight operands
    activations: bool = True  # quantize activation operands
    gradients: bool = True  # quantize output-gradient operands in the backward GEMMs
    rht: bool = False  # blockwise random Hadamard transform of both operands of every Linear GEMM
    stochastic_rounding: bool = False  # gradients rounded ⌊v + U⌋ (4-bit formats and hif8)
    scale_rule: str = "floor"  # mxfp4: floor | ceil | even
    tensor_scale: bool = True  # nvfp4: FP32 per-tensor scale
    keep_high_precision: tuple[str, ...] = ("first", "last")  # 'first', 'last' or module-name prefixes

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.format not in PRECISIONS:
            raise KunlunError(f"config key precision.format: expected one of {', '.join(PRECISIONS)}, got {self.format!r}")
        if self.scale_rule not in ("floor", "ceil", "even"):
            raise KunlunError(f"config key precision.scale_rule: expected floor, ceil or even, got {self.scale_rule!r}")
        if self.stochastic_rounding and self.format not in ("mxfp4", "nvfp4", "hif4", "hif8"):
            raise KunlunError(f"config key precision.stochastic_rounding: implemented for mxfp4, nvfp4, hif4 and hif8, not {self.format}")

    def options(self) -> dict:
        return {"mxfp4": {"scale_rule": self.scale_rule}, "nvfp4": {"tensor_scale": self.tensor_scale}}.get(self.format, {})


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=lambda: MODEL_CONFIGS[DEFAULT_MODEL]())
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def __post_init__(self) -> None:
        for key, cls in (("data", DataConfig), ("train", TrainConfig), ("model", ModelConfig), ("precision", PrecisionConfig)):
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"Config.{key}: expected a {cls.__name__}, got {type(getattr(self, key)).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Every section with every key (defaults included) as plain YAML values; ``from_dict`` reads it back."""
        return {"data": section_dict(self.data), "train": section_dict(self.train), "model": model_to_dict(self.model),
                "precision": section_dict(self.precision)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        if not isinstance(raw, dict):
            raise KunlunError(f"{source}: expected a mapping with sections data/train/model")
        unknown = set(raw) - {"data", "train", "model", "precision"}
        if unknown:
            raise KunlunError(f"{source}: unknown section(s) {sorted(unknown)}; expected data, train, model, precision")
        return cls(
            data=dataclass_from_dict(DataConfig, raw.get("data") or {}, "data"),
            train=dataclass_from_dict(TrainConfig, raw.get("train") or {}, "train"),
            model=model_from_dict(raw.get("model") or {}),
            precision=dataclass_from_dict(PrecisionConfig, raw.get("precision") or {}, "precision"),
        )


def model_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """The ``model`` section: ``name`` (default ``DEFAULT_MODEL``) picks the model's config class, the other keys
    fill it; an unknown name or key, a wrong type or an impossible value is a KunlunError naming the key."""
    if not isinstance(raw, dict):
        raise KunlunError("config key model: expected a mapping")
    name = raw.get("name", DEFAULT_MODEL)
    if not isinstance(name, str) or name not in MODEL_CONFIGS:
        raise KunlunError(f"config key model.name: unknown model {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    return dataclass_from_dict(MODEL_CONFIGS[name], {k: v for k, v in raw.items() if k != "name"}, "model")


def model_to_dict(model: ModelConfig) -> dict[str, Any]:
    """A model config as its ``model`` section: ``name`` first, then every key in field order."""
    return {"name": model.name, **section_dict(model)}


def section_dict(section: Any) -> dict[str, Any]:
    """A section's keys as plain YAML values (tuples as lists), in field order."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}


DEFAULT_CONFIG_DIR = Path(__file__).parent / "configs"


# keyword settings of load_config → the config key each one sets
SETTINGS = {"dataset": "data.dataset", "data_dir": "data.data_dir", "seed": "train.seed", "epochs": "train.epochs",
            "threads": "train.threads", "precision": "precision.format"}


def load_config(path: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None, model: str | None = None,
                **settings: Any) -> Config:
    """Load a YAML config (default: the packaged ``kunlun.yaml``; or a config already read, as a mapping: a tuning
    trial's) and apply ``a.b=value`` overrides: the one way every entry point (``kunlun train``, ``bench speed``, the
    quality / formats benchmarks, sweeps) builds a config.

    ``model`` switches the model: if it differs from the file's, the file's model keys (which belong to
    the other model) are dropped and the new model starts from its own defaults. ``settings`` (``dataset``,
    ``data_dir``, ``seed``, ``epochs``, ``threads``, ``precision``; None = not set) are applied after
    ``overrides``, so they win, as command-line flags win over positional overrides.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"load_config: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    if isinstance(path, dict):
        raw, path = json.loads(json.dumps(path)), "<config mapping>"  # a deep copy: overrides must not reach the caller's
    else:
        path = Path(path) if path else DEFAULT_CONFIG_DIR / "kunlun.yaml"
        raw = read_yaml(path)
    section = raw.get("model") or {}
    if model is not None and not (isinstance(section, dict) and section.get("name", DEFAULT_MODEL) == model):
        raw["model"] = {"name": model}
    extra = [f"{SETTINGS[k]}={json.dumps(v)}" for k, v in settings.items() if v is not None]
    for item in [*(overrides or []), *extra]:
        set_dotted(raw, item)
    return Config.from_dict(raw, source=str(path))


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one phrase with its line and column."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KunlunError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise KunlunError(f"{path}: not valid UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise KunlunError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KunlunError(f"{path}: expected a mapping at the top level")
    return data


def set_dotted(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML (``64``, ``true``, ``[1, 2]``)."""
    if "=" not in item:
        raise KunlunError(f"override {item!r}: expected KEY=VALUE, e.g. model.d_model=64")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise KunlunError(f"override {item!r}: expected a dotted key such as train.lr or model.num_layers")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (``train:`` alone in a YAML file)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise KunlunError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def dataclass_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, rejecting unknown keys and coercing types, naming the key."""
    if not isinstance(raw, dict):
        raise KunlunError(f"config key {prefix}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise KunlunError(f"config key {prefix}.{unknown[0]} is not known; known keys: {', '.join(sorted(names))}")
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def typed_mapping(raw: Any, fields: dict[str, Any], required: tuple[str, ...], where: str) -> dict[str, Any]:
    """A spec file's top-level mapping checked against ``fields`` (key → type hint): unknown, missing or mistyped
    keys are one KunlunError naming ``where`` and the key; values are coerced as config values are."""
    if not isinstance(raw, dict):
        raise KunlunError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise KunlunError(f"{where}: key {unknown[0]!r} is not known; known keys: {', '.join(fields)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise KunlunError(f"{where}: missing key {missing[0]!r}")
    try:
        return {k: coerce(v, fields[k], k) for k, v in raw.items()}
    except KunlunError as exc:
        raise KunlunError(f"{where}: {exc}") from None


def coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        return dataclass_from_dict(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise KunlunError(f"config key {key}: expected a mapping, got {value!r}")
        return {coerce(k, args[0], key): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value is a one-element list (model.gdpa_activation=relu)
        items = [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise KunlunError(f"config key {key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KunlunError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 and 1e6 as text: any float syntax is a number here
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KunlunError(f"config key {key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise KunlunError(f"config key {key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise KunlunError(f"config key {key}: expected a string, got {value!r}")
        return value
    return value
