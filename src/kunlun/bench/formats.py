"""Low-precision benchmark: the same config trained in each number format × seed × dataset; relative NE vs
BF16 (paired by seed), with and without RHT / stochastic rounding; and each format's quantization error on
the real weight and activation tensors of a trained model.

Spec: ``configs/formats.yaml``. Points are ordinary run records under ``<out>/runs/<dataset>/<variant>/seed<k>``
and are reused when complete, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kunlun.bench.quality import fmt, provenance, provenance_fields, run_point, stale_mark, stat_cell, write_tables
from kunlun.config import DEFAULT_CONFIG_DIR, read_yaml, typed_mapping
from kunlun.data.batches import Batcher
from kunlun.data.registry import prepare_dataset
from kunlun.errors import KunlunError
from kunlun.formats.gemm import PRECISIONS
from kunlun.formats.quantize import quantize
from kunlun.metrics import report_split
from kunlun.runs import environment
from kunlun.training.checkpoint import load_weights
from kunlun.training.trainer import build, log

SPEC_FIELDS = {  # the formats spec file (configs/formats.yaml): key → type
    "datasets": list[str], "seeds": list[int], "model": str, "overrides": list[str] | None, "formats": list[str],
    "variant_formats": list[str] | None, "variants": dict[str, list[str]] | None,
}


def load_formats_spec(path: Path | None, seeds: list[int] | None = None, datasets: list[str] | None = None,
                      formats: list[str] | None = None, variants: bool = True) -> dict[str, Any]:
    """The formats benchmark spec (default: packaged ``configs/formats.yaml``), with ``seeds``, ``datasets`` or
    ``formats`` in place of the file's when given; ``variants=False`` drops the recipe variants."""
    path = Path(path or DEFAULT_CONFIG_DIR / "formats.yaml")
    spec = typed_mapping(read_yaml(path), SPEC_FIELDS, ("datasets", "seeds", "model", "formats"), str(path))
    check_formats(spec, str(path))
    if seeds:
        spec["seeds"] = list(seeds)
    if datasets:
        spec["datasets"] = list(datasets)
    if formats:
        spec["formats"] = list(formats)
        check_formats(spec, "--formats")
    if not variants:
        spec["variants"] = {}
    return spec


def check_formats(spec: dict, where: str) -> dict:
    """Every format known, and bf16 (the baseline of relative NE) among them."""
    bad = [f for f in spec["formats"] if f not in PRECISIONS]
    if bad:
        raise KunlunError(f"{where}: unknown format {bad[0]!r}; known: {', '.join(PRECISIONS)}")
    if "bf16" not in spec["formats"]:
        raise KunlunError(f"{where}: formats must include bf16 (the baseline of relative NE)")
    return spec


def variants(spec: dict) -> dict[str, tuple[str, list[str]]]:
    """name → (format, overrides): every format plain, then each recipe variant for the listed formats."""
    out = {f: (f, [f"precision.format={f}"]) for f in spec["formats"]}
    for vname, extra in (spec.get("variants") or {}).items():
        for f in spec.get("variant_formats") or []:
            out[f"{f}+{vname}"] = (f, [f"precision.format={f}", *extra])
    return out


@torch.no_grad()
def tensor_errors(run_dir: Path, data, cfg_overrides, formats: list[str], batch_size: int = 512) -> dict[str, dict[str, float]]:
    """Relative MSE ‖Q(x) − x‖² / ‖x‖² of each format on a trained model's Linear weights and inputs (one valid batch)."""
    from kunlun.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    model = build(cfg, data)
    load_weights(run_dir / "checkpoints" / "best", model)
    model.eval()
    weights, acts = [], []
    hooks = [m.register_forward_hook(lambda m, inp, out: acts.append(inp[0].reshape(-1, inp[0].shape[-1])))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model(next(Batcher(data, "valid", cfg.data.max_seq_len, model.event_windows).iterate(batch_size)))
    for h in hooks:
        h.remove()

    def rel(ts, fmt):
        num = sum(float(((quantize(t, fmt) - t) ** 2).sum()) for t in ts)
        return num / sum(float((t ** 2).sum()) for t in ts)

    return {f: {"weights": rel(weights, f), "activations": rel(acts, f)} for f in formats if f != "fp32"}


def run_formats(spec: dict, out: Path, data_dir=None, threads: int = 0, reuse_stale: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {"environment": environment(), "spec": spec, "results": {}}
    vs = variants(spec)
    for dataset in spec["datasets"]:
        data = prepare_dataset(dataset, data_dir, log=log)
        split = report_split(data.splits)
        finals = {}
        for name, (_, overrides) in vs.items():
            finals[name] = [run_point(dataset, data, spec["model"], list(spec.get("overrides") or []) + overrides, s,
                                      out / "runs" / dataset / name / f"seed{s}", data_dir, threads, reuse_stale)
                            for s in spec["seeds"]]
        base = np.array([f["metrics"][split]["ne"] for f in finals["bf16"]])
        rows = {}
        for name, fs in finals.items():
            ne = np.array([f["metrics"][split]["ne"] for f in fs])
            rel = 100 * (ne - base) / base  # paired by seed
            rows[name] = {"format": vs[name][0], "overrides": vs[name][1], "ne": stat_cell(ne),
                          "rel_ne_pct": stat_cell(rel),
                          "train_examples_per_s": float(np.median([f["train_examples_per_s"] for f in fs])),
                          **provenance_fields(fs)}
        errors = tensor_errors(out / "runs" / dataset / "bf16" / f"seed{spec['seeds'][0]}", data, spec.get("overrides"), spec["formats"])
        results["results"][dataset] = {"split": split, "rows": rows, "tensor_errors": errors, "hif4_vs": head_to_head(rows, "hif4")}
        write_formats(results, out)
    return results


def head_to_head(rows: dict[str, Any], ref: str) -> dict[str, Any]:
    """``ref`` against every other 4-bit format, paired by seed: Δ = rel. NE(ref) − rel. NE(other) in % of BF16's NE
    (negative: ``ref`` is better), with a two-sided paired t-test — with 3 seeds only a large, consistent gap counts."""
    from scipy.stats import ttest_rel

    if ref not in rows:
        return {}
    out = {}
    for name, row in rows.items():
        if name == ref or row["format"] not in ("mxfp4", "nvfp4", "hif4"):
            continue
        a, b = np.array(rows[ref]["rel_ne_pct"]["values"]), np.array(row["rel_ne_pct"]["values"])
        d = a - b
        p = float(ttest_rel(a, b).pvalue) if len(d) > 1 and d.std() > 0 else float("nan")
        out[name] = {"delta_pct": stat_cell(d), "p_value": p}
    return out


def formats_markdown(results: dict) -> str:
    lines = []
    for dataset, r in results["results"].items():
        lines += [f"### {dataset} ({r['split']} NE, seeds {results['spec']['seeds']})", "",
                  "| format / recipe | NE | relative NE vs BF16 % | train ex/s | weight rel. MSE | activation rel. MSE |",
                  "|---|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            err = r["tensor_errors"].get(name, {})
            lines.append(f"| {name}{stale_mark(row)} | {fmt(row['ne'])} | {row['rel_ne_pct']['mean']:+.2f} ± "
                         f"{row['rel_ne_pct']['std']:.2f} | {row['train_examples_per_s']:,.0f} | "
                         + (f"{err['weights']:.2e} | {err['activations']:.2e} |" if err else "| |"))
        if r.get("hif4_vs"):
            lines += ["", "HiF4 against the other 4-bit formats (paired by seed; Δ < 0: HiF4 better):", "",
                      "| vs | Δ relative NE, % of BF16 NE | paired t-test p |", "|---|---|---|"]
            lines += [f"| {name} | {c['delta_pct']['mean']:+.2f} ± {c['delta_pct']['std']:.2f} | {c['p_value']:.3f} |"
                      for name, c in r["hif4_vs"].items()]
        lines.append("")
    lines.append("Relative NE is paired by seed: (NE_fmt − NE_bf16) / NE_bf16. Tensor errors: ‖Q(x) − x‖² / ‖x‖² over all Linear "
                 "weights and over the Linear inputs of one validation batch of the BF16-trained model.")
    lines += ["", provenance([row for r in results["results"].values() for row in r["rows"].values()])]
    return "\n".join(lines) + "\n"


def write_formats(results: dict, out: Path) -> None:
    write_tables(out, "formats", results, formats_markdown(results))
