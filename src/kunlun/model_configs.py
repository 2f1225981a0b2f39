"""The ``model`` section of a config: one frozen dataclass per model, the one home of each model's defaults.

A class's ``name`` is the value of ``model.name`` that selects it (``MODEL_CONFIGS``); its fields are the
other keys of the section. A model config checks itself when it is built (``__post_init__``), so an
impossible value fails when the config is loaded, before any data is read, with a ``KunlunError`` naming
the key; being frozen, it stays valid. ``kunlun.config.model_from_dict`` builds one from a YAML mapping
(unknown keys, wrong types), and each model module (``kunlun.models.*``) takes its class from here.

This module sits in the bottom layer, below the blocks, so the names that validation needs from the
blocks live here and the blocks read them from here: ``GATES`` (``kunlun.blocks.summary``) and
``ACTIVATION_NAMES`` (the keys of ``kunlun.blocks.common.ACTIVATIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kunlun.errors import KunlunError

# Gating of a summary (kunlun.blocks.summary.SelfGate): interformer σ(Z ⊙ MLP(Z)) | glu Z ⊙ σ(W·Z) | none
GATES = ("interformer", "glu", "none")
# element-wise activations by name (kunlun.blocks.common.ACTIVATIONS maps each one to its function)
ACTIVATION_NAMES = ("relu", "gelu", "silu", "relu2", "leaky_relu", "hardswish", "identity")


def check_positive(cfg: ModelConfig, *keys: str) -> None:
    """Each key is a positive integer, or a sequence of positive integers (layer sizes)."""
    for key in keys:
        value = getattr(cfg, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v < 1 for v in values):
            if isinstance(value, (list, tuple)):
                raise KunlunError(f"config key model.{key}: expected positive integers, got {list(value)}")
            raise KunlunError(f"config key model.{key}: expected a positive integer, got {value}")


def check_non_negative(cfg: ModelConfig, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 0:
            raise KunlunError(f"config key model.{key}: expected >= 0, got {getattr(cfg, key)}")


def check_heads(cfg: ModelConfig, dim_key: str = "d_model", heads_key: str = "num_heads") -> None:
    d, h = getattr(cfg, dim_key), getattr(cfg, heads_key)
    if d % h:
        raise KunlunError(f"config key model.{heads_key}: {h} heads do not divide model.{dim_key}={d}")


def check_dropout(cfg: ModelConfig) -> None:
    if not 0 <= cfg.dropout < 1:
        raise KunlunError(f"config key model.dropout: expected 0 <= dropout < 1, got {cfg.dropout}")


def check_embedding_std(cfg: ModelConfig) -> None:
    if not cfg.embedding_std > 0:
        raise KunlunError(f"config key model.embedding_std: expected > 0, got {cfg.embedding_std}")


def check_choice(cfg: ModelConfig, key: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in choices:
        raise KunlunError(f"config key model.{key}: expected one of {', '.join(choices)}, got {getattr(cfg, key)!r}")


def check_rotary_time(cfg: ModelConfig) -> None:
    """Rotary time encoding (Kunlun, InterFormer): an even head width, τ scale > 0, base > 1."""
    if cfg.rotary_time and (cfg.d_model // cfg.num_heads) % 2:
        raise KunlunError("config key model.rotary_time: needs an even head width (d_model / num_heads)")
    if not cfg.time_scale > 0:
        raise KunlunError(f"config key model.time_scale: expected > 0 (seconds), got {cfg.time_scale}")
    if not cfg.rotary_base > 1:
        raise KunlunError(f"config key model.rotary_base: expected > 1, got {cfg.rotary_base}")


@dataclass(frozen=True)
class ModelConfig:
    """What every model config has: its ``name`` (a class attribute, not a key) and a check on being built."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a KunlunError naming the first impossible key (nothing to check by default)."""


@dataclass(frozen=True)
class LogisticRegressionConfig(ModelConfig):
    """``kunlun.models.logistic``: no keys (one weight per categorical value and per numeric feature)."""

    name: ClassVar[str] = "logistic_regression"


@dataclass(frozen=True)
class DNNConfig(ModelConfig):
    """``kunlun.models.dnn``."""

    name: ClassVar[str] = "dnn"
    d_model: int = 16
    hidden: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.1
    batch_norm: bool = False  # BatchNorm1d after each hidden Linear (FuxiCTR's MLP_Block, the BARS DNN setting)
    embedding_std: float = 0.05  # initial std of the embedding rows (FuxiCTR's default, in the BARS runs: 1e-4)

    def validate(self) -> None:
        check_positive(self, "d_model", "hidden")
        check_dropout(self)
        check_embedding_std(self)


@dataclass(frozen=True)
class DCNv2Config(ModelConfig):
    """``kunlun.models.dcnv2``."""

    name: ClassVar[str] = "dcnv2"
    d_model: int = 16
    cross_layers: int = 3
    hidden: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.1
    batch_norm: bool = False  # BatchNorm1d after each hidden Linear of the deep tower (the BARS DCNv2 setting)
    embedding_std: float = 0.05  # initial std of the embedding rows (FuxiCTR's default, in the BARS runs: 1e-4)

    def validate(self) -> None:
        check_positive(self, "d_model", "cross_layers", "hidden")
        check_dropout(self)
        check_embedding_std(self)


@dataclass(frozen=True)
class WukongConfig(ModelConfig):
    """``kunlun.models.wukong``."""

    name: ClassVar[str] = "wukong"
    d_model: int = 16
    num_layers: int = 3
    fmb_tokens: int = 8  # n_F: tokens out of the FM block per layer
    lcb_tokens: int = 8  # n_L: tokens out of the linear compression block per layer
    fm_rank: int = 8
    fm_hidden: int = 256
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.1

    def validate(self) -> None:
        check_positive(self, "d_model", "num_layers", "fmb_tokens", "lcb_tokens", "fm_rank", "fm_hidden", "hidden")
        check_dropout(self)


@dataclass(frozen=True)
class DINConfig(ModelConfig):
    """``kunlun.models.din``."""

    name: ClassVar[str] = "din"
    d_model: int = 16
    attention_hidden: tuple[int, ...] = (64, 32)
    hidden: tuple[int, ...] = (200, 80)
    dropout: float = 0.1
    time_buckets: int = 16  # time-gap bucket embedding on history tokens; 0 = off
    position_embedding: bool = True
    # the candidate also among the history tokens target attention pools: Kunlun's input, not the paper's (off, so a
    # run recorded before the key existed still means what it meant); the quality benchmark turns it on for input
    # parity (docs/models.md#what-each-sequence-model-sees: the table and the measurement)
    target_in_sequence: bool = False

    def validate(self) -> None:
        check_positive(self, "d_model", "attention_hidden", "hidden")
        check_dropout(self)
        check_non_negative(self, "time_buckets")


@dataclass(frozen=True)
class BSTConfig(ModelConfig):
    """``kunlun.models.bst``."""

    name: ClassVar[str] = "bst"
    d_model: int = 16
    num_heads: int = 2
    num_layers: int = 1
    ffn_mult: int = 4
    time_buckets: int = 16
    hidden: tuple[int, ...] = (1024, 512, 256)
    dropout: float = 0.1
    target_in_sequence: bool = True  # the candidate as the last Transformer token (the paper's design)
    # Kunlun's other history inputs, off by default (the paper's positions are the time-gap buckets alone): a learned
    # position embedding, and the rotary encoding of τ = log(1 + Δt / time_scale) in self-attention
    position_embedding: bool = False
    rotary_time: bool = False
    time_scale: float = 3600.0  # seconds
    rotary_base: float = 10.0

    def validate(self) -> None:
        check_positive(self, "d_model", "num_heads", "num_layers", "ffn_mult", "hidden")
        check_non_negative(self, "time_buckets")
        check_heads(self)
        check_dropout(self)
        check_rotary_time(self)


@dataclass(frozen=True)
class InterFormerConfig(ModelConfig):
    """``kunlun.models.interformer``."""

    name: ClassVar[str] = "interformer"
    d_model: int = 32
    num_layers: int = 2
    num_heads: int = 2
    summary_tokens: int = 4  # X_sum tokens (LCE output)
    cls_tokens: int = 2
    pma_tokens: int = 2
    recent_tokens: int = 2
    cross_layers: int = 1  # DCN inside the interaction arch
    output_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    position_embedding: bool = True
    time_buckets: int = 16  # time-gap bucket embedding on history tokens; 0 = off
    rotary_time: bool = True  # rotary encoding of τ = log(1 + Δt / time_scale) in self-attention, as in Kunlun
    time_scale: float = 3600.0  # seconds
    rotary_base: float = 10.0
    summary_gate: str = "interformer"  # Gating of X_sum and S_sum: interformer σ(Z ⊙ MLP(Z)) | glu | none
    # the candidate also as the newest sequence token: Kunlun's input, not the paper's (off, so a run recorded before
    # the key existed still loads and means what it meant); the quality benchmark turns it on for input parity
    # (docs/models.md#what-each-sequence-model-sees: the table and the measurement)
    target_in_sequence: bool = False

    def validate(self) -> None:
        check_positive(self, "d_model", "num_layers", "num_heads", "summary_tokens", "cls_tokens", "pma_tokens",
                       "recent_tokens", "cross_layers", "output_hidden")
        check_heads(self)
        check_dropout(self)
        check_non_negative(self, "time_buckets")
        check_rotary_time(self)
        check_choice(self, "summary_gate", GATES)

    @property
    def seq_summary_tokens(self) -> int:
        return self.cls_tokens + self.pma_tokens + self.recent_tokens


@dataclass(frozen=True)
class KunlunConfig(ModelConfig):
    """``kunlun.models.kunlun`` (its module docstring describes each component these keys switch)."""

    name: ClassVar[str] = "kunlun"
    d_model: int = 32  # token width everywhere (embeddings too)
    num_layers: int = 2
    num_heads: int = 2
    summary_tokens: int = 4  # non-sequence summary tokens = K/V rows of the GDPA-PFFN
    gdpa_activation: tuple[str, ...] = ("silu", "gelu")  # per head, or one for all
    personalized: bool = True  # K/V from the example's own summary; False: static learned K/V tokens
    summary_gate: str = "interformer"  # X_sum gating: interformer σ(Z ⊙ MLP(Z)) | glu Z ⊙ σ(W·Z) | none
    seq_pooling: str = "hsp"  # hsp (seed pooling + SumKronLinear) | pma (seed pooling only)
    num_seeds: int = 8  # HSP stage 1 seeds
    seq_summary_tokens: int = 4  # summary tokens per sequence (HSP stage 2 output, or PMA seeds)
    kron_rank: int = 2
    window: int = 16  # sliding-window self-attention half-width; 0 = full attention
    rotary_time: bool = True  # rotary encoding of τ = log(1 + Δt / time_scale) in self-attention
    time_scale: float = 3600.0  # seconds
    rotary_base: float = 10.0
    compskip: bool = True
    compskip_min_layers: int = 2  # streams shallower than this run the whole block in each layer (no skipping)
    wukong_experts: int = 2
    interaction_input: str = "tokens"  # Wukong experts mix tokens: [X, seq summaries] | summary: [X_sum, seq summaries]
    fm_rank: int = 8  # Wukong FMB low-rank projection
    fm_hidden: int = 128
    output_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    position_embedding: bool = True
    time_buckets: int = 16  # log2-hour time-gap buckets added to event tokens; 0 = off
    # event-level personalisation: one stream per event type. Off by default: where the event types are the outcome
    # being predicted (MovieLens: liked / not liked), separate streams hide from softmax pooling the share of each type
    # in a history, the strongest signal there (ml-100k, 3 seeds: split 0.8011 ± 0.0021 test NE, merged 0.7951 ± 0.0054;
    # docs/results/quality.md). Turn it on for event types that are kinds of engagement: it saves FLOPs there.
    event_split: bool = False
    # what an event-type stream holds: merged = that type's events among the sequence's max_seq_len most recent
    # events; own = that type's own max_seq_len most recent events (the data layer's per-type windows)
    stream_window: str = "merged"
    primary_events: tuple[str, ...] = ("liked",)  # full-size streams
    light_scale: float = 0.5  # size of the other event streams relative to the full configuration
    target_in_sequence: bool = True  # append the candidate item as the newest token of every stream

    def validate(self) -> None:
        check_positive(self, "d_model", "num_layers", "num_heads", "summary_tokens", "num_seeds", "seq_summary_tokens",
                       "kron_rank", "fm_rank", "fm_hidden", "wukong_experts", "compskip_min_layers", "output_hidden")
        check_heads(self)
        check_rotary_time(self)
        check_non_negative(self, "window", "time_buckets")
        check_dropout(self)
        if len(self.gdpa_activation) not in (1, self.num_heads):
            raise KunlunError(f"config key model.gdpa_activation: give 1 activation or one per head ({self.num_heads}), "
                              f"got {len(self.gdpa_activation)}")
        for a in self.gdpa_activation:
            if a not in ACTIVATION_NAMES:
                raise KunlunError(f"config key model.gdpa_activation: unknown {a!r}; known: {', '.join(ACTIVATION_NAMES)}")
        if not 0 < self.light_scale <= 1:
            raise KunlunError(f"config key model.light_scale: expected 0 < light_scale <= 1, got {self.light_scale}")
        check_choice(self, "seq_pooling", ("hsp", "pma"))
        check_choice(self, "summary_gate", GATES)
        check_choice(self, "interaction_input", ("tokens", "summary"))
        check_choice(self, "stream_window", ("merged", "own"))
        if self.stream_window == "own" and not self.event_split:
            raise KunlunError("config key model.stream_window: 'own' windows are per event-type stream; "
                              "set model.event_split=true as well")


# model.name → its config class; every model of kunlun.models registers the class of the same name
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    c.name: c for c in (LogisticRegressionConfig, DNNConfig, DCNv2Config, WukongConfig, DINConfig, BSTConfig,
                        InterFormerConfig, KunlunConfig)
}
DEFAULT_MODEL = "kunlun"  # model.name when a config names none
