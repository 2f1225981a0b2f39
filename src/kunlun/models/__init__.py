"""Models built from the same blocks and registry; importing this package registers them."""

from kunlun.models import bst, dcnv2, din, dnn, interformer, kunlun, logistic, wukong  # noqa: F401
from kunlun.models.base import MODELS, RankingModel, build_model, model_config

__all__ = ["MODELS", "RankingModel", "build_model", "model_config"]
