"""The quality / ablation benchmark spec (``configs/quality.yaml``): which data sets, seeds and models, each model's
overrides, each data set's training recipe, and the Kunlun ablation's variants. Read by ``kunlun bench quality`` /
``ablation`` and by ``kunlun tune`` (a trial starts from its model's spec config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kunlun.config import DEFAULT_CONFIG_DIR, load_config, read_yaml, typed_mapping
from kunlun.errors import KunlunError
from kunlun.models import MODELS


def load_spec(path: Path | None, seeds: list[int] | None = None, datasets: list[str] | None = None,
              models: list[str] | None = None, ablation_dataset: str | None = None,
              variants: list[str] | None = None) -> dict[str, Any]:
    """The quality / ablation spec (default: packaged ``configs/quality.yaml``), with ``seeds``, ``datasets``, a
    subset of its ``models``, the ablation's data set (``ablation_dataset``) or a subset of its ablation ``variants``
    in place of the file's when given."""
    spec = _read_spec(path)
    if seeds:
        spec["seeds"] = list(seeds)
    if datasets:
        spec["datasets"] = list(datasets)
    if models:
        spec["models"] = {m: spec["models"][m] for m in _known("--models", models, spec["models"])}
    if ablation_dataset or variants:
        ab = spec["ablation"] = dict(spec.get("ablation") or {})
        if ablation_dataset:
            ab["dataset"] = ablation_dataset
        if variants:
            ab["variants"] = {v: ab["variants"][v] for v in _known("--variants", variants, ab.get("variants") or {})}
    return spec


def _known(option: str, names: list[str], known: dict[str, Any]) -> list[str]:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KunlunError(f"{option}: {unknown[0]!r} is not in the spec; known: {', '.join(known)}")
    return names


SPEC_FIELDS = {  # the quality / ablation spec file (configs/quality.yaml): key → type
    "datasets": list[str], "seeds": list[int], "models": dict[str, list[str]],
    "dataset_overrides": dict[str, list[str]] | None, "ablation": dict[str, Any] | None,
}
ABLATION_FIELDS = {"dataset": str, "model": str, "variants": dict[str, list[str]]}


def _read_spec(path: Path | None) -> dict[str, Any]:
    path = path or DEFAULT_CONFIG_DIR / "quality.yaml"
    spec = typed_mapping(read_yaml(Path(path)), SPEC_FIELDS, ("datasets", "seeds", "models"), str(path))
    spec["models"] = {m: overrides or [] for m, overrides in spec["models"].items()}
    if spec.get("ablation") is not None:
        spec["ablation"] = typed_mapping(spec["ablation"], ABLATION_FIELDS, (), f"{path}: key ablation")
    unknown = [m for m in spec["models"] if m not in MODELS]
    if unknown:
        raise KunlunError(f"{path}: unknown model {unknown[0]!r}; known: {', '.join(sorted(MODELS))}")
    extra = [d for d in spec.get("dataset_overrides") or {} if d not in spec["datasets"]]
    if extra:
        raise KunlunError(f"{path}: dataset_overrides names {extra[0]!r}, which is not among datasets {spec['datasets']}")
    ab = spec.get("ablation") or {}
    points = [(d, m, point_overrides(spec, d, m)) for d in spec["datasets"] for m in spec["models"]]
    points += [(ab.get("dataset", "ml-100k"), f"kunlun ({v})", point_overrides(spec, ab.get("dataset", "ml-100k"), "kunlun") + o)
               for v, o in (ab.get("variants") or {}).items()]
    for dataset, model, overrides in points:  # every point's config loads before anything trains
        try:
            load_config(None, overrides, model=model.split(" ")[0], dataset=dataset)
        except KunlunError as exc:
            raise KunlunError(f"{path}: {model} on {dataset}: {exc}") from None
    return spec


def point_overrides(spec: dict[str, Any], dataset: str, model: str) -> list[str]:
    """The dataset's training recipe (``dataset_overrides``), then the model's own overrides (which win)."""
    return list((spec.get("dataset_overrides") or {}).get(dataset) or []) + list(spec["models"].get(model) or [])
