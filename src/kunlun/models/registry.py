"""Build a model from the ``model`` section of a config (a ``kunlun.model_configs.ModelConfig``, checked when the
config was built): its ``name`` picks the registered model.

Importing this module imports every model module, so ``MODELS`` is complete before it is read (the
models import ``kunlun.models.base`` to register themselves; nothing imports back up to here).
"""

from __future__ import annotations

from kunlun.blocks.embeddings import FeatureInfo
from kunlun.errors import KunlunError
from kunlun.model_configs import ModelConfig
from kunlun.models import bst, dcnv2, din, dnn, interformer, kunlun, logistic, wukong  # noqa: F401  (register the models)
from kunlun.models.base import MODELS, RankingModel


def build_model(model: ModelConfig, info: FeatureInfo) -> RankingModel:
    entry = MODELS[model.name]
    if entry.cls.requires_sequence and not info.sequences:
        raise KunlunError(
            f"config key model.name: {model.name} models a behaviour sequence and this dataset has none; "
            "choose a non-sequence model (kunlun, dnn, dcnv2, wukong, logistic_regression)"
        )
    return entry.cls(model, info)
