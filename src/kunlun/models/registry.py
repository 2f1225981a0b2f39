"""Build a model from the ``model`` section of a config: the name picks a registered model, the other keys
fill its config dataclass.

Importing this module imports every model module, so ``MODELS`` is complete before it is read (the
models import ``kunlun.models.base`` to register themselves; nothing imports back up to here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.config import Config, dataclass_from_dict
from kunlun.errors import KunlunError
from kunlun.models import bst, dcnv2, din, dnn, interformer, kunlun, logistic, wukong  # noqa: F401  (register the models)
from kunlun.models.base import MODELS, RankingModel


def model_config(model: dict[str, Any]) -> Any:
    """Validate a ``model`` config section against the named model's config dataclass."""
    name = model.get("name")
    if name not in MODELS:
        raise KunlunError(f"config key model.name: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    cfg = dataclass_from_dict(MODELS[name].config_cls, {k: v for k, v in model.items() if k != "name"}, "model")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def build_model(model: dict[str, Any], info: FeatureInfo) -> RankingModel:
    cfg = model_config(model)
    entry = MODELS[model["name"]]
    if entry.cls.requires_sequence and not info.sequences:
        raise KunlunError(
            f"config key model.name: {model['name']} models a behaviour sequence and this dataset has none; "
            "choose a non-sequence model (kunlun, dnn, dcnv2, wukong, logistic_regression)"
        )
    return entry.cls(cfg, info)


def resolved_model(model: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` section with every default of the model's config spelled out (validated)."""
    return {"name": model["name"], **dataclasses.asdict(model_config(model))}


def recorded_config(cfg: Config) -> dict[str, Any]:
    """What a run records as its config: every section in full, the model's defaults included."""
    return {**cfg.to_dict(), "model": resolved_model(cfg.model)}
