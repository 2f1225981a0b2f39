"""Quality benchmark: every model × dataset × seed through the same pipeline, summarised as mean ± std;
and Kunlun ablations (each component off in turn).

Each point is a normal run record under ``<out>/runs/<dataset>/<model or variant>/seed<k>``. A finished
point is reused only when its config and the code that trained it (source hash, ``kunlun.runs.code_version``)
match the current ones, so an interrupted benchmark continues where it stopped and a table never silently
mixes code versions; with ``reuse_stale`` a finished point of the same config trained by other code is kept
and its row is marked stale. Every table names the code version(s) it was built from.
Tables are written atomically as ``quality.md`` / ``quality.json`` (and ``ablation.*``).
The metric split is ``test`` when the dataset has one, else ``valid`` (Frappe_x1: its test split is held out).
A synthetic world's table has one row more, its Bayes NE on that split: the NE of the true click probability
(``bayes.json``, ``kunlun data synth``), the floor no model reaches in expectation.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kunlun.bench.spec import point_overrides
from kunlun.bench.speed import interleaved_step_ms
from kunlun.config import load_config
from kunlun.console import emit_json
from kunlun.data.registry import prepare_dataset, synthetic_folder
from kunlun.data.synthetic import read_bayes
from kunlun.errors import KunlunError
from kunlun.files import atomic_write_text
from kunlun.metrics import report_split
from kunlun.models import MODELS
from kunlun.processes import clear_run_dir, is_empty_run_dir, lock_run_dir
from kunlun.runs import environment, provenance_line, reuse_state, run_code
from kunlun.training.trainer import Trainer, log

METRICS = ("auc", "gauc", "logloss", "ne")


def run_point(dataset: str, data, model: str, overrides: list[str], seed: int, run_dir: Path, data_dir, threads: int,
              reuse_stale: bool = False, config: dict[str, Any] | None = None) -> dict:
    """Train one (dataset, model, seed) point unless a finished run of the same config and code is there;
    return its final.json, with ``"stale": True`` when it is a kept run of other code (``reuse_stale``).
    ``config``: a complete config to start from (a tuned trial's) instead of the model's defaults."""
    cfg = load_config(config, overrides, model=model, dataset=dataset, seed=seed, data_dir=str(data_dir) if data_dir else None,
                      threads=threads or None)
    with lock_run_dir(run_dir):  # another benchmark on the same folder gets "in use by process N", never a mixed record
        state, final = reuse_state(run_dir, cfg.to_dict())
        if state == "fresh" or (state == "stale" and reuse_stale):
            return {**final, "stale": state == "stale", "code_versions": run_code(run_dir, final)}
        if not is_empty_run_dir(run_dir):
            # interrupted, trained with another config, or by other code: start again (the seed makes it reproducible)
            log(f"[{dataset} / {run_dir.parent.name} / seed {seed}] {state if state != 'missing' else 'incomplete'}: retraining")
            clear_run_dir(run_dir)
        log(f"[{dataset} / {run_dir.parent.name} / seed {seed}] training …")
        final = Trainer(cfg, data, run_dir, progress=False, logger=lambda m: None).fit()
    return {**final, "stale": False}  # a fresh final.json lists its code_versions itself


def summarise(finals: list[dict]) -> dict[str, Any]:
    split = report_split(finals[0]["metrics"])
    row: dict[str, Any] = {"split": split, "seeds": len(finals)}
    for m in METRICS:
        vals = np.array([f["metrics"][split][m] for f in finals], dtype=float)
        row[m] = stat_cell(vals)
    row["flops_per_example"] = finals[0]["flops_per_example"]  # executed (every padded slot)
    row["useful_flops_per_example"] = finals[0].get("useful_flops_per_example")  # each example's real tokens
    row["parameters"] = finals[0]["parameters"]["total"]
    row["train_examples_per_s"] = float(np.median([f["train_examples_per_s"] for f in finals]))
    row.update(provenance_fields(finals))
    return row


def provenance_fields(finals: list[dict]) -> dict[str, Any]:
    """A table row's ``code`` (every code version behind its runs) and ``stale_seeds`` (runs kept from other code)."""
    return {"code": [c for f in finals for c in f["code_versions"]], "stale_seeds": [f["seed"] for f in finals if f["stale"]]}


def provenance(rows: list[dict[str, Any]]) -> str:
    """The code versions a table's rows were built from (see ``kunlun.runs.provenance_line``)."""
    return provenance_line([c for r in rows for c in r.get("code", [])], sum(len(r.get("stale_seeds", [])) for r in rows))


def stale_mark(row: dict[str, Any]) -> str:
    return f" †(seeds {row['stale_seeds']})" if row.get("stale_seeds") else ""


def needs_missing_sequence(model: str, data) -> bool:
    return MODELS[model].cls.requires_sequence and not data.schema.sequences


def run_quality(spec: dict, out: Path, data_dir=None, threads: int = 0, reuse_stale: bool = False,
                tuned: Path | None = None) -> dict[str, Any]:
    """Every model × dataset × seed of ``spec``; with ``tuned``, each model trained with the best trial of its study
    ``<tuned>/<model>-<dataset>`` (``kunlun tune``; see ``tuned_studies``) instead of its spec overrides."""
    results: dict[str, Any] = {"environment": environment(), "spec": spec, "results": {}}
    prepared = {dataset: prepare_dataset(dataset, data_dir, log=log) for dataset in spec["datasets"]}
    studies = tuned_studies(spec, prepared, Path(tuned)) if tuned else {}  # every study checked before anything trains
    if tuned:
        results["tuned"] = str(tuned)
    for dataset, data in prepared.items():
        synth = synthetic_folder(dataset, data_dir)
        if synth is not None and (bayes := read_bayes(synth)) is not None:
            results.setdefault("bayes", {})[data.name] = bayes["splits"]
        # runs and table under the data set's name: a schema file's path is no folder name (nor a heading)
        table = results["results"].setdefault(data.name, {})
        for model in spec["models"]:
            if needs_missing_sequence(model, data):
                table[model] = {"skipped": "needs a behaviour sequence; the dataset has none"}
                continue
            study = studies.get((dataset, model))
            overrides = [] if study else point_overrides(spec, dataset, model)  # a tuned config holds the spec's own
            finals = [run_point(dataset, data, model, overrides, s, out / "runs" / data.name / model / f"seed{s}", data_dir,
                                threads, reuse_stale, config=study["config"] if study else None) for s in spec["seeds"]]
            table[model] = summarise(finals)
            if study:
                table[model]["tuned"] = {k: v for k, v in study.items() if k != "config"}
            write_quality(results, out)  # tables stay current while the benchmark runs
    return results


def tuned_studies(spec: dict, prepared: dict[str, Any], tuned: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(dataset, model) → the best trial of the study ``<tuned>/<model>-<dataset>`` (``kunlun.tuning.best_of_study``),
    for every point of ``spec``. A KunlunError, before anything trains, when a study is missing or has no completed
    trial, was made for another model or data set or with other spec overrides than the spec's now, or when the
    studies of one data set differ in budget (training examples and validations per trial, finished drawn trials,
    whether the packaged configuration's trial has run): tuned models are compared only at the same budget."""
    from kunlun.tuning import best_of_study, study_name

    studies: dict[tuple[str, str], dict[str, Any]] = {}
    for dataset, data in prepared.items():
        budgets: dict[str, tuple[int, int, int, int]] = {}
        for model in spec["models"]:
            if needs_missing_sequence(model, data):
                continue
            study = best_of_study(tuned / study_name(model, dataset), model, dataset)
            if (study["model"], study["dataset"]) != (model, dataset):
                raise KunlunError(f"{study['study']}: a study of {study['model']} on {study['dataset']}, not of {model} on {dataset}")
            base = point_overrides(spec, dataset, model)
            if study["overrides"][:len(base)] != base:
                raise KunlunError(f"{study['study']}: tuned with the overrides {study['overrides']}, but the spec now gives "
                                  f"{model} on {dataset} {base}; tune it again into another folder")
            budgets[model] = (study["examples"], study["validations"], study["finished"], study["packaged"])
            studies[(dataset, model)] = study
        if len(set(budgets.values())) > 1:
            listed = "; ".join(f"{m} {e:,} examples × {v} validations, {n} finished drawn trials"
                               f"{' and the packaged configuration' if p else ''}" for m, (e, v, n, p) in budgets.items())
            raise KunlunError(f"--tuned {tuned}: the studies on {dataset} differ in budget ({listed}); give every model "
                              "the same (kunlun tune --trials N --examples E)")
    return studies


def sample_std(v: np.ndarray) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def stat_cell(v: np.ndarray) -> dict[str, Any]:
    """One table cell over seeds: mean, sample std and the per-seed values."""
    return {"mean": float(v.mean()), "std": sample_std(v), "values": v.tolist()}


def mflops(r: dict) -> str:
    """``useful / executed`` MFLOPs per example (one number when they are equal: no sequence padding)."""
    useful, executed = r.get("useful_flops_per_example"), r["flops_per_example"]
    if useful is None:
        return f"? / {executed / 1e6:.3f}"
    return f"{executed / 1e6:.3f}" if abs(useful - executed) < 0.5 else f"{useful / 1e6:.3f} / {executed / 1e6:.3f}"


def fmt(cell: dict, digits: int = 4) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def quality_markdown(results: dict) -> str:
    lines = []
    for dataset, table in results["results"].items():
        lines += [f"### {dataset}", "",
                  "| model | split | AUC | gAUC | logloss | NE | MFLOPs/ex useful / executed | params | train ex/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model, r in table.items():
            if "skipped" in r:
                lines.append(f"| {model} | – | n/a ({r['skipped']}) | | | | | | |")
                continue
            lines.append(f"| {model}{stale_mark(r)} | {r['split']} | {fmt(r['auc'])} | {fmt(r['gauc'])} | {fmt(r['logloss'])} | {fmt(r['ne'])} | "
                         f"{mflops(r)} | {r['parameters']:,} | {r['train_examples_per_s']:,.0f} |")
        lines += bayes_row(results.get("bayes", {}).get(dataset), table)
        lines.append("")
        lines += tuned_markdown(table)
    env = results["environment"]
    lines.append(f"Mean ± sample std over seeds {results['spec']['seeds']}; {env['cpu']}, torch {env['torch']}. "
                 "Each run's threads and environment are in its run directory (environment.json).")
    rows = [r for table in results["results"].values() for r in table.values() if "skipped" not in r]
    lines += ["", provenance(rows)]
    return "\n".join(lines) + "\n"


def bayes_row(bayes: dict[str, Any] | None, table: dict[str, Any]) -> list[str]:
    """A synthetic world's Bayes NE on the split its models were scored on, as a row of their table (± its standard
    error over rows, not a seed σ)."""
    split = next((r["split"] for r in table.values() if "skipped" not in r), None)
    if not bayes or split not in bayes:
        return []
    b = bayes[split]
    return [f"| Bayes: the true click probability | {split} | | | {b['logloss']:.4f} | {b['ne']:.4f} (s.e. {b['ne_std']:.4f}) | | | |"]


def tuned_markdown(table: dict[str, Any]) -> list[str]:
    """Under a data set's table of tuned models: each model's budget, its best trial and the values it drew."""
    tuned = {m: r["tuned"] for m, r in table.items() if "tuned" in r}
    if not tuned:
        return []
    first = next(iter(tuned.values()))
    packaged = " and a trial of the model's packaged configuration" if first.get("packaged") else ""
    lines = [f"Tuned with `kunlun tune` on the validation split, the same budget for every model: {first['finished']} "
             f"finished drawn trials{packaged}, each of at most {first['examples']:,} training examples, validated "
             f"{first['validations']} times. Every seed above trains the best trial's config.", "",
             "| model | best trial | its valid NE | values drawn |", "|---|---|---|---|"]
    for model, t in tuned.items():
        drawn = ", ".join(f"`{k}={_short(v)}`" for k, v in t["drawn"].items()) or "none: the packaged configuration"
        lines.append(f"| {model} | {t['trial']} | {t['valid_ne']:.4f} | {drawn} |")
    return lines + [""]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value).replace(" ", "")


def write_tables(out: Path, stem: str, results: dict, markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=1))
    atomic_write_text(out / f"{stem}.md", markdown)


def write_quality(results: dict, out: Path) -> None:
    write_tables(out, "quality", results, quality_markdown(results))


# ------------------------------------------------------------------------------------------ ablation

def run_ablation(spec: dict, out: Path, data_dir=None, threads: int = 0, reuse_stale: bool = False,
                 overrides: list[str] | None = None, timing_steps: int = 10, timing_rounds: int = 5) -> dict[str, Any]:
    """The full model and each ablation variant of ``spec`` × seed; ``overrides``: config keys for every one of them
    (after the spec's, before each variant's own), e.g. ``train.recipe=one_pass``.

    Then, unless ``timing_rounds`` is 0, each variant's time per training step and per inference batch, measured
    apart from the training runs (which share the machine with whatever else runs) by ``interleaved_step_ms``:
    ``timing_rounds`` rounds of ``timing_steps`` steps, the variants in turn; the medians, and each variant's Δ against
    the full model as the median of its per-round ratios."""
    ab = spec.get("ablation") or {}
    dataset = ab.get("dataset", "ml-100k")
    model = ab.get("model", "kunlun")
    if model not in MODELS:
        raise KunlunError(f"ablation.model: unknown model {model!r}; known: {', '.join(sorted(MODELS))}")
    variants = {"full": [], **(ab.get("variants") or {})}
    base = point_overrides(spec, dataset, model) + list(overrides or [])
    for name, variant in variants.items():  # every variant's config loads before anything trains
        try:
            load_config(None, base + list(variant), model=model, dataset=dataset)
        except KunlunError as exc:
            raise KunlunError(f"ablation {name} on {dataset}: {exc}") from None
    data = prepare_dataset(dataset, data_dir, log=log)
    finals = {}
    for name, variant in variants.items():
        finals[name] = [run_point(dataset, data, model, base + list(variant), s, out / "runs" / data.name / f"{model}-{name}" / f"seed{s}",
                                  data_dir, threads, reuse_stale) for s in spec["seeds"]]
    split = report_split(finals["full"][0]["metrics"])
    full_ne = np.array([f["metrics"][split]["ne"] for f in finals["full"]])
    full = summarise(finals["full"])
    rows = {}
    for name, fs in finals.items():
        ne = np.array([f["metrics"][split]["ne"] for f in fs])
        delta = 100 * (ne - full_ne) / full_ne  # paired by seed
        r = summarise(fs)
        rows[name] = {
            "overrides": variants[name], "ne": r["ne"],
            "delta_ne_pct": {"mean": float(delta.mean()), "std": sample_std(delta)},
            "flops_per_example": r["flops_per_example"], "useful_flops_per_example": r["useful_flops_per_example"],
            "delta_flops_pct": 100 * (r["flops_per_example"] / full["flops_per_example"] - 1),
            "train_examples_per_s": r["train_examples_per_s"],  # the runs' own, under whatever load they shared the machine with
            "code": r["code"], "stale_seeds": r["stale_seeds"],
        }
    timing = None
    if timing_rounds > 0:
        log(f"ablation on {dataset}: timing every variant's step, {timing_rounds} rounds of {timing_steps} steps …")
        cfgs = {name: load_config(None, base + list(v), model=model, dataset=dataset, seed=spec["seeds"][0],
                                  data_dir=str(data_dir) if data_dir else None, threads=threads or None)
                for name, v in variants.items()}
        ms = interleaved_step_ms(cfgs, timing_steps, timing_rounds)
        for name, row in rows.items():
            row["step_ms"] = {k: float(np.median(v)) for k, v in ms[name].items()}
            row["delta_step_ms_pct"] = {k: float(100 * (np.median(np.array(v) / np.array(ms["full"][k])) - 1))
                                        for k, v in ms[name].items()}
            row["step_ms_rounds"] = ms[name]
        first = cfgs["full"]
        timing = {"steps": timing_steps, "rounds": timing_rounds, "batch_size": first.train.batch_size,
                  "threads": torch.get_num_threads()}
    result = {"environment": environment(), "model": model, "dataset": data.name, "split": split, "seeds": spec["seeds"],
              "overrides": list(overrides or []), "timing": timing, "rows": rows}
    write_tables(out, "ablation", result, ablation_markdown(result))
    return result


def ablation_markdown(r: dict) -> str:
    model = {"kunlun": "Kunlun"}.get(r.get("model", "kunlun"), r.get("model"))
    every = f", every run with `{' '.join(r['overrides'])}`" if r.get("overrides") else ""
    lines = [f"{model} ablations on {r['dataset']} ({r['split']}), seeds {r['seeds']}{every}; ΔNE is paired by seed (negative = better).",
             "",
             "| variant | NE | ΔNE % | MFLOPs/ex useful / executed | Δ executed FLOPs % | ms / train step (Δ %) | ms / inference batch (Δ %) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name}{stale_mark(row)} | {fmt(row['ne'])} | {row['delta_ne_pct']['mean']:+.2f} ± {row['delta_ne_pct']['std']:.2f} | "
                     f"{mflops(row)} | {row['delta_flops_pct']:+.1f} | {_step_cell(row, 'train')} | {_step_cell(row, 'infer')} |")
    t = r.get("timing")
    lines += ["", f"Step times: batches of {t['batch_size']} training rows, {t['threads']} thread(s), the variants timed in turn "
                  f"({t['rounds']} rounds of {t['steps']} steps, apart from the training runs); medians, Δ the median of each "
                  "round's ratio to the full model." if t else "Step times not measured (--timing-rounds 0).",
              "", provenance(list(r["rows"].values()))]
    return "\n".join(lines) + "\n"


def _step_cell(row: dict, kind: str) -> str:
    if "step_ms" not in row:
        return "–"
    return f"{row['step_ms'][kind]:.1f} ({row['delta_step_ms_pct'][kind]:+.1f})"


# ------------------------------------------------------------------------------------------ regression check

def check_expected(results: dict, expected_path: Path) -> list[str]:
    """Compare mean NE with pinned values: a model fails when mean NE > pinned + tolerance."""
    expected = json.loads(Path(expected_path).read_text())
    failures = []
    for dataset, models in expected["ne"].items():
        for model, pin in models.items():
            r = results["results"].get(dataset, {}).get(model)
            if r is None or "skipped" in r:
                continue
            got = r["ne"]["mean"]
            if not math.isfinite(got) or got > pin["mean"] + pin["tolerance"]:
                failures.append(f"{dataset}/{model}: NE {got:.4f} > pinned {pin['mean']:.4f} + {pin['tolerance']:.4f}")
    return failures


def pin_expected(results: dict, path: Path, min_tolerance: float = 0.005) -> dict:
    """Write pinned NE per (dataset, model) from a measured benchmark: tolerance = max(3 σ, min_tolerance)."""
    pins: dict[str, Any] = {"source": "kunlun bench quality", "seeds": results["spec"]["seeds"], "ne": {}}
    for dataset, table in results["results"].items():
        for model, r in table.items():
            if "skipped" in r:
                continue
            pins["ne"].setdefault(dataset, {})[model] = {
                "mean": round(r["ne"]["mean"], 5), "tolerance": round(max(3 * r["ne"]["std"], min_tolerance), 5)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps(pins, indent=1) + "\n")
    return pins


def report_quality(results: dict, as_json: bool = False, check: Path | None = None, pin: Path | None = None) -> list[str]:
    """What ``kunlun bench quality`` does with ``run_quality``'s results: the pins written to ``pin`` (``pin_expected``),
    the results printed on stdout (Markdown, or one JSON object), and each regression against the pins in ``check``
    (``check_expected``) as a line on stderr. Returns the regressions: the command exits 1 when there are any."""
    if pin:
        pin_expected(results, pin)
    emit_json(results["results"]) if as_json else print(quality_markdown(results), flush=True)
    failures = check_expected(results, check) if check else []
    if failures:
        print("\n".join(f"kunlun: regression: {f}" for f in failures), file=sys.stderr, flush=True)
    return failures
