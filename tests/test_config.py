"""The config as a typed, frozen object: every section (the ``model`` one included) is checked when the config is
loaded, with one line naming the key; it cannot change afterwards; it is written and read back unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kunlun.config import Config, load_config, model_from_dict, model_to_dict
from kunlun.errors import KunlunError
from kunlun.model_configs import ACTIVATION_NAMES, DEFAULT_MODEL, GATES, MODEL_CONFIGS, DNNConfig, KunlunConfig

HERE = Path(__file__).parent


def load_error(*overrides: str, **kw) -> str:
    """The message of the KunlunError that loading the packaged config with ``overrides`` raises (one line)."""
    with pytest.raises(KunlunError) as e:
        load_config(None, list(overrides), **kw)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "model,override,needle",
    [
        ("logistic_regression", "model.d_model=16", "config key model.d_model is not known"),
        ("dnn", "model.hidden=[64, 0]", "config key model.hidden: expected positive integers, got [64, 0]"),
        ("dcnv2", "model.cross_layers=0", "config key model.cross_layers: expected a positive integer, got 0"),
        ("wukong", "model.dropout=1", "config key model.dropout: expected 0 <= dropout < 1"),
        ("din", "model.time_buckets=-1", "config key model.time_buckets: expected >= 0, got -1"),
        ("bst", "model.num_heads=3", "config key model.num_heads: 3 heads do not divide model.d_model=16"),
        ("interformer", "model.summary_gate=sigmoid", "config key model.summary_gate: expected one of interformer, glu, none"),
        ("interformer", "model.rotary_base=1", "config key model.rotary_base: expected > 1, got 1.0"),
        ("kunlun", "model.gdpa_activation=[silu, tanh]", "config key model.gdpa_activation: unknown 'tanh'"),
        ("kunlun", "model.gdpa_activation=[silu, gelu, relu]", "config key model.gdpa_activation: give 1 activation or one per head"),
        ("kunlun", "model.window=-1", "config key model.window: expected >= 0, got -1"),
        ("kunlun", "model.time_scale=0", "config key model.time_scale: expected > 0"),
        ("kunlun", "model.light_scale=0", "config key model.light_scale: expected 0 < light_scale <= 1"),
        ("kunlun", "model.seq_pooling=mean", "config key model.seq_pooling: expected one of hsp, pma, got 'mean'"),
        ("kunlun", "model.d_model=wide", "config key model.d_model: expected an integer, got 'wide'"),
        ("kunlun", "model.personalized=1", "config key model.personalized: expected true or false, got 1"),
        ("kunlun", "model.primary_events=[liked, 3]", "config key model.primary_events[1]: expected a string, got 3"),
        ("kunlun", "model.stream_window=own", "config key model.stream_window: 'own' windows are per event-type stream; "
                                              "set model.event_split=true as well"),
        ("kunlun", "model.hidden=[64]", "config key model.hidden is not known; known keys: compskip,"),
    ],
)
def test_an_impossible_model_key_fails_at_load_naming_it(model, override, needle):
    assert needle in load_error(override, model=model)


@pytest.mark.parametrize(
    "override,needle",
    [
        (["train.grad_clip=-1"], "config key train.grad_clip: expected >= 0, got -1.0"),
        (["train.embedding_l2=0.1", "train.embedding_weight_decay=0.1"],
         "config keys train.embedding_weight_decay and train.embedding_l2: set one, not both"),
        (["data.max_seq_len=0"], "config key data.max_seq_len: expected a positive integer"),
        (["precision.stochastic_rounding=true"], "config key precision.stochastic_rounding: implemented for"),
    ],
)
def test_an_impossible_key_of_another_section_fails_at_load_naming_it(override, needle):
    assert needle in load_error(*override)


def test_an_unknown_model_fails_at_load():
    assert "config key model.name: unknown model 'gpt'; known: bst, dcnv2, din" in load_error("model.name=gpt")
    assert "config key model.name: unknown model 3" in load_error("model.name=3")
    with pytest.raises(KunlunError, match="config key model: expected a mapping"):
        Config.from_dict({"model": "kunlun"})


def test_a_bad_model_key_fails_before_any_data_is_read():
    # the dataset and its directory do not exist: reading data would fail with another message
    message = load_error("model.nope=1", dataset="ml-100k", data_dir="/no/such/dir")
    assert message.startswith("config key model.nope is not known")


def test_switching_model_drops_the_other_models_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: kunlun, window: 4, d_model: 64}\n")
    assert load_config(path).model == KunlunConfig(window=4, d_model=64)
    assert load_config(path, model="dnn").model == DNNConfig()  # d_model=64 was Kunlun's, not DNN's
    assert load_config(path, ["model.d_model=8"], model="dnn").model == DNNConfig(d_model=8)  # overrides come after
    assert "config key model.window is not known" in load_error("model.window=4", model="dnn")


def test_every_model_has_one_config_class_and_the_registry_builds_from_it():
    from kunlun.models import MODELS

    assert set(MODELS) == set(MODEL_CONFIGS) and DEFAULT_MODEL in MODEL_CONFIGS
    for name, entry in MODELS.items():
        assert entry.config_cls is MODEL_CONFIGS[name] and entry.config_cls.name == name
        assert type(load_config(None, model=name).model) is entry.config_cls


def test_the_names_validation_accepts_are_the_ones_the_blocks_implement():
    from kunlun.blocks import common, summary

    assert tuple(common.ACTIVATIONS) == ACTIVATION_NAMES
    assert summary.GATES is GATES
    for gate in GATES:
        summary.SelfGate(4, gate)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_config_round_trips_through_to_dict_and_yaml(name):
    cfg = load_config(None, ["train.epochs=3", "precision.format=mxfp4", "precision.keep_high_precision=[first]"], model=name)
    d = cfg.to_dict()
    assert list(d["model"]) == ["name", *(f.name for f in dataclasses.fields(MODEL_CONFIGS[name]))]  # every key, name first
    assert d["model"]["name"] == name
    text = yaml.safe_dump(d, sort_keys=False)  # plain values only (a tuple would not dump)
    assert yaml.safe_load(text) == d
    assert Config.from_dict(yaml.safe_load(text)) == cfg
    assert model_from_dict(model_to_dict(cfg.model)) == cfg.model


def test_a_config_recorded_before_typed_model_sections_loads_and_is_written_back_byte_for_byte():
    """``run-config-89ff9b8.yaml``: a run's config.yaml as the code of 89ff9b8 wrote it (its model section was then a
    dict filled in when the model was built); run directories recorded then still load and resume. Keys added
    since (``ADDED_SINCE``, at their defaults) are the only difference."""
    text = (HERE / "data" / "run-config-89ff9b8.yaml").read_text()
    cfg = load_config(HERE / "data" / "run-config-89ff9b8.yaml")
    assert cfg.model.gdpa_activation == ("relu",) and cfg.model.primary_events == ("liked", "rated")
    written = cfg.to_dict()
    for section, key, default in ADDED_SINCE:
        assert written[section].pop(key) == default
    assert yaml.safe_dump(written, sort_keys=False) == text


ADDED_SINCE = [("train", "ops", "auto"), ("train", "compile", False), ("train", "checkpoint_every_steps", 0),
               ("train", "checkpoint_every_minutes", 10.0), ("train", "distributed", "ddp"), ("train", "embedding_sharding", "none"),
               ("train", "monitor", "ne"),
               ("model", "stream_window", "merged"), ("train", "shuffle_block_rows", 0), ("train", "shuffle_window_blocks", 16),
               ("train", "tensorboard", False), ("train", "eval_every_steps", 0), ("train", "recipe", "epochs")]


def test_config_is_frozen_and_valid_for_good():
    cfg = load_config(None, ["model.d_model=16"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = DNNConfig()  # type: ignore[misc]
    assert isinstance(cfg.model.output_hidden, tuple) and isinstance(cfg.model.gdpa_activation, tuple)
    assert hash(cfg) == hash(load_config(None, ["model.d_model=16"]))  # no mutable value anywhere inside
    # a changed copy is checked as a loaded one is
    assert dataclasses.replace(cfg.model, d_model=32).d_model == 32
    with pytest.raises(KunlunError, match="config key model.num_heads: 2 heads do not divide model.d_model=5"):
        dataclasses.replace(cfg.model, d_model=5)
    with pytest.raises(KunlunError, match="config key train.batch_size"):
        dataclasses.replace(cfg.train, batch_size=0)
    with pytest.raises(TypeError, match="Config.model: expected a ModelConfig, got dict"):
        Config(model={"name": "kunlun"})  # type: ignore[arg-type]
