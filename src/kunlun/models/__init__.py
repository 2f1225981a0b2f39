"""Models built from the same blocks; ``kunlun.models.registry`` builds one from a config."""

from kunlun.models.base import RankingModel
from kunlun.models.registry import MODELS, build_model

__all__ = ["MODELS", "RankingModel", "build_model"]
