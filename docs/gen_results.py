"""Results tables of the documentation, generated from the files in ``benchmarks/results/`` at build time.

MkDocs runs this file as a hook (``hooks:`` in ``mkdocs.yml``):

* a page line ``<!-- results-table: NAME -->`` is replaced by the table ``TABLES[NAME]`` builds from the JSON / CSV
  files of ``benchmarks/results/`` (an unknown name or a missing file fails the build), so a table in the docs cannot
  drift from the files it reports;
* every file of ``benchmarks/results/`` other than Markdown (JSON, CSV, PNG plots, HTML reports, scripts) is published
  under ``results/data/`` of the site, so pages link to the raw files (``data/quality.json``) and show the plots.

The Markdown tables that the benchmark commands write themselves (``quality.md``, ``ablation.md``, …) are not
rebuilt here: pages include them whole with ``--8<-- "quality.md"`` (pymdownx.snippets, base path
``benchmarks/results``). Run ``python docs/gen_results.py [NAME ...]`` to print the generated tables.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SITE_PREFIX = "results/data"  # where benchmarks/results/ appears in the site (and, for links, under docs/)
MARKER = re.compile(r"^([ \t]*)<!-- results-table: ([\w-]+) -->[ \t]*$", re.MULTILINE)  # indented: inside a list item


class ResultsError(Exception):
    pass


def _json(rel: str) -> dict:
    path = RESULTS / rel
    if not path.is_file():
        raise ResultsError(f"benchmarks/results/{rel} not found")
    return json.loads(path.read_text(encoding="utf-8"))


def _csv(rel: str) -> list[dict[str, str]]:
    path = RESULTS / rel
    if not path.is_file():
        raise ResultsError(f"benchmarks/results/{rel} not found")
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _int(x: float) -> str:
    return f"{x:,.0f}"


def _mflops(x: float) -> str:
    return f"{x / 1e6:.3g}" if x < 1e8 else _int(x / 1e6)


# ----------------------------------------------------------------------------------------------- speed

SPEED_ROWS = [  # (row label, file, dtypes shown)
    ("default", "speed/speed-default.json", ["fp32", "bf16"]),
    ("default, `train.compile=true`", "speed/speed-default-compile.json", ["fp32"]),
    ("d128", "speed/speed-d128.json", ["fp32", "bf16"]),
    ("production, batch 64", "speed/speed-production.json", ["fp32", "bf16"]),
]


def speed() -> str:
    """``kunlun bench speed --json`` of each preset (``speed/speed-*.json``)."""
    rows = []
    for label, rel, dtypes in SPEED_ROWS:
        d = _json(rel)
        for i, dt in enumerate(dtypes):
            r = d[dt]
            flops = f"{_mflops(d['useful_flops_per_example'])} / {_mflops(d['flops_per_example'])}" if i == 0 else ""
            trainer = _int(r["trainer_examples_per_s"]) if "trainer_examples_per_s" in r else "–"
            infer = "(eager)" if d.get("compile") else _int(r["infer_examples_per_s"])
            rows.append([label if i == 0 else "", flops, dt, _int(r["gemm_flops_per_s"] / 1e9), _int(r["train_examples_per_s"]),
                         trainer, f"{100 * r['train_mfu']:.1f} % / {100 * r['train_hfu']:.1f} %", infer])
    return _table(["preset", "MFLOPs/ex useful / executed", "dtype", "GEMM GFLOP/s", "step ex/s", "trainer ex/s",
                   "train MFU / HFU", "infer ex/s"], rows)


def speed_loader() -> str:
    """The loader alone, per preset."""
    rows = []
    for label, rel, _ in SPEED_ROWS:
        d = _json(rel)
        rows.append([label, _int(d["loader_examples_per_s"]), _int(d["loader_examples_per_s"] / d["fp32"]["train_examples_per_s"]) + "×"])
    return _table(["preset", "loader ex/s", "loader / training step"], rows)


def _end_to_end(rel: str) -> str:
    rows = [[r["run"], f"`{r['code']}`", _int(float(r["train_examples_per_s"])), f"{float(r['test_ne']):.4f}", r["steps"]]
            for r in _csv(rel)]
    return _table(["run", "code", "train ex/s", "test NE", "steps"], rows)


def end_to_end() -> str:
    """300 steps through ``kunlun train``, old / new / new without the window (``speed/end_to_end-d18f94c.csv``)."""
    return _end_to_end("speed/end_to_end-d18f94c.csv")


def end_to_end_e26e8c2() -> str:
    """The same comparison with the speed table's code (``speed/end_to_end.csv``)."""
    return _end_to_end("speed/end_to_end.csv")


# --------------------------------------------------------------------------------------------- threads

THREAD_ROWS = [  # (wait policy, file, condition, rounds note)
    ("passive (kunlun's default)", "threads/passive-6f1f271.json", "quiet"),
    ("passive (kunlun's default)", "threads/passive-6f1f271.json", "loaded"),
    ("unset (OpenMP's default)", "threads/unset-6f1f271.json", "loaded"),
    ("`OMP_WAIT_POLICY=ACTIVE`", "threads/active-6f1f271.json", "loaded"),
]


def threads() -> str:
    """Wall time of 30 training steps by wait policy and thread count (``threads/*.json``)."""
    rows = []
    for policy, rel, cond in THREAD_ROWS:
        d = _json(rel)
        m = d["medians"][cond]
        cells = []
        for key in ("default", "threads=1", "threads=2"):
            c = m[key]
            runs = len(c["runs"])
            text = f"{c['seconds']:.1f} s"
            text = f"**{text}** (best)" if c["vs_best"] == 1.0 else f"{text} ({c['vs_best']:.2f}×)"
            cells.append(text + (f", {runs} run{'s' if runs > 1 else ''}" if runs != 3 else ""))
        condition = "quiet" if cond == "quiet" else f"{d['busy']} busy processes"
        rows.append([policy, condition, *cells])
    return _table(["wait policy", "condition", "default threads", "`train.threads=1`", "`train.threads=2`"], rows)


# --------------------------------------------------------------------------------------------- scaling

def _sci(x: float) -> str:
    m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def _fit_row(d: dict) -> list[str]:
    computes = [r["compute"] for r in d["runs"]]
    sigma = "; ".join(f"{s['sigma']:.4f} at {_sci(s['compute'])}" for s in d["seed_sigma_by_compute"])
    held = "; ".join(f"{h['ne']:.4f} → {h['predicted']:.4f} [{h['lower']:.4f}, {h['upper']:.4f}]" for h in d["holdout"])
    form = d["forms"][d["chosen"]]
    errors = ", ".join(f"{100 * h['error']:+.1f} %" for h in form["holdout"]).replace("-", "−")
    verdict = ("law accepted" if d["accepted"] else "no law") + f" (errors {errors})"
    return [d["family"], f"{_sci(min(computes))} – {_sci(max(computes))}", sigma, d["chosen"], held, verdict,
            f"`{d['provenance']}`"]


def scaling() -> str:
    """The fit of each family (``scaling/kunlun.json``, ``scaling/interformer.json``)."""
    rows = [_fit_row(_json(f"scaling/{f}.json")) for f in ("kunlun", "interformer")]
    return _table(["family", "C range (useful FLOPs)", "seed σ (NE) where measured", "chosen",
                   "held-out NE (measured → predicted [90 % PI])", "verdict", "runs' code"], rows)


def scaling_rolling() -> str:
    """Rolling-origin mean |error| of each form."""
    rows = []
    for f in ("kunlun", "interformer"):
        d = _json(f"scaling/{f}.json")
        rows.append([f] + [f"{100 * d['forms'][m]['rolling_mean_abs_error']:.1f} %" for m in ("M0", "M1", "M2")])
    return _table(["family", "M0", "M1", "M2"], rows)


def _compare(rel: str) -> str:
    c = _json(rel)["comparison"]

    def iv(k: str, fmt: str) -> str:
        v = c[k]
        if v["value"] is None:  # the second family's slope is ≤ 0: no ratio, no multiplier
            return "undefined"
        return f"{v['value']:{fmt}} [{v['lower']:{fmt}}, {v['upper']:{fmt}}]"

    dropped = c["compute_multiplier"].get("dropped_fraction", c["slope_ratio"]["dropped_fraction"])
    rows = [[f"{c['a']} vs {c['b']}", c["form"], iv("eta_a", ".4f"), iv("eta_b", ".4f"), iv("slope_ratio", ".2f"),
             f"{iv('compute_multiplier', '.3g')} at {_sci(c['at_compute'])} FLOPs", f"{100 * dropped:.1f} %"]]
    return _table(["families", "form", "η (first)", "η (second)", "slope ratio", "effective-compute multiplier",
                   "resamples undefined"], rows)


def scaling_compare() -> str:
    """``kunlun fit --compare kunlun interformer`` on the ml-latest-small sweeps (``scaling/compare.json``)."""
    return _compare("scaling/compare.json")


# ----------------------------------------------------------------------------------------------- width

def width() -> str:
    """The d_model sweep on ml-100k (``width/runs.csv``): per width, each family's FLOPs and NE (mean ± std over seeds)."""
    by: dict[tuple[str, int], list[dict[str, str]]] = {}
    for r in _csv("width/runs.csv"):
        d_model = int(re.search(r"d_model(\d+)", r["point"]).group(1))
        by.setdefault((r["family"], d_model), []).append(r)
    widths = sorted({w for _, w in by})
    codes = sorted({r["code"] for rs in by.values() for r in rs})

    def cells(family: str, w: int) -> list[str]:
        rs = by.get((family, w))
        if not rs:
            return ["", ""]
        ne = [float(r["ne"]) for r in rs]
        flops = f"{float(rs[0]['flops_per_example']) / 1e6:.2f} / {float(rs[0]['executed_flops_per_example']) / 1e6:.2f}"
        ne_text = f"{statistics.mean(ne):.4f}" + (f" ± {statistics.stdev(ne):.4f} ({len(ne)} seeds)" if len(ne) > 1 else "")
        return [flops, ne_text]

    rows = [[str(w), *cells("kunlun", w), *cells("interformer", w)] for w in widths]
    table = _table(["d_model", "Kunlun MFLOPs/ex useful / executed", "Kunlun test NE", "InterFormer MFLOPs/ex useful / executed",
                    "InterFormer test NE"], rows)
    return table + "\n\nRuns of code " + ", ".join(f"`{c}`" for c in codes) + "."


def width_compare() -> str:
    """``kunlun fit --compare`` of the width sweep (``width/compare.json``)."""
    return _compare("width/compare.json")


# --------------------------------------------------------------------------------------- one pass (issue 26)

ONEPASS = "onepass"  # the 600k study
ONEPASS_3M = "onepass3m"  # the 3M study: the same tables from its own folder


def _point_value(point: str, key: str) -> int:
    return int(re.search(rf"{key}(\d+)", point).group(1))


def onepass_grid(folder: str = ONEPASS) -> str:
    """The one-pass grid (``FOLDER/runs.csv``): test NE per model, width and examples processed (seed mean ± std),
    ★ on the compute-optimal frontier (``FOLDER/{kunlun,interformer}.json``'s grid)."""
    runs = _csv(f"{folder}/runs.csv")
    frontier = {(f, Path(g["point"]).name) for f in ("kunlun", "interformer") for g in _json(f"{folder}/{f}.json")["grid"]
                if g["on_frontier"]}
    by: dict[tuple[str, int, int], list[dict[str, str]]] = {}
    for r in runs:
        point = Path(r["point"]).name
        by.setdefault((r["family"], _point_value(point, "d_model"), _point_value(point, "max_steps")), []).append(r)
    steps = sorted({k[2] for k in by})
    batch = 256
    rows = []
    for fam in ("kunlun", "interformer"):
        for w in sorted({k[1] for k in by if k[0] == fam}):
            cells = []
            for st in steps:
                rs = by.get((fam, w, st), [])
                ne = [float(r["ne"]) for r in rs]
                star = " ★" if (fam, Path(rs[0]["point"]).name) in frontier else "" if rs else ""
                cells.append("" if not ne else f"{statistics.mean(ne):.4f}" + (f" ± {statistics.stdev(ne):.4f}" if len(ne) > 1 else "") + star)
            f = next(float(r["flops_per_example"]) for k, rs in by.items() if k[:2] == (fam, w) for r in rs)
            rows.append([fam, str(w), f"{f / 1e6:.2f}", *cells])
    return _table(["model", "d_model", "useful MFLOPs/example", *(f"{_int(st * batch)} examples" for st in steps)], rows)


def _law_row(d: dict, bayes: float | None = None) -> list[str]:
    row = _fit_row(d)
    m2 = d["forms"].get("M2", {})
    floor = ""
    if "params" in m2:
        lo, hi = m2["param_intervals"]["lnE"]
        floor = f"{math.exp(m2['params']['lnE']):.4f} [{math.exp(lo):.4f}, {math.exp(hi):.4f}]"
        if bayes is not None:
            floor += f" (Bayes {bayes:.4f})"
    size = d.get("optimal_size")
    exponent = (f"{size['size_exponent']:.2f} [{size['size_exponent_interval'][0]:.2f}, {size['size_exponent_interval'][1]:.2f}]"
                if size else "")
    surface = f"{size['E']:.4f} [{size['E_interval'][0]:.4f}, {size['E_interval'][1]:.4f}]" if size else ""
    return [*row[:2], f"{sum(g['on_frontier'] for g in d['grid'])} of {len(d['grid'])}" if "grid" in d else "", *row[2:-1],
            floor, surface, exponent, row[-1]]


def _laws(folder: str, names: list[str], bayes: float | None) -> str:
    rows = [_law_row(_json(f"{folder}/{n}.json"), bayes) for n in names]
    return _table(["family", "x range", "frontier points", "seed σ (NE) where measured", "chosen",
                   "held-out NE (measured → predicted [90 % PI])", "verdict", "M2 floor E [90 % CI]",
                   "surface floor E [90 % CI]", "optimal size: F ∝ C^a, a [90 % CI]", "runs' code"], rows)


def onepass_laws(folder: str = ONEPASS) -> str:
    """``kunlun fit --frontier`` of each model's one-pass grid; the M2 floor beside the world's Bayes test NE."""
    return _laws(folder, ["kunlun", "interformer"], _json(f"{folder}/bayes.json")["splits"]["test"]["ne"])


def onepass_compare(folder: str = ONEPASS) -> str:
    """``kunlun fit --frontier --compare kunlun interformer`` (``FOLDER/compare.json``)."""
    return _compare(f"{folder}/compare.json")


def onepass_layers(folder: str = ONEPASS) -> str:
    """``kunlun fit --x layers`` of each model's layer sweep, and their comparison (slope ratio in ln layers)."""
    runs = _csv(f"{folder}/layers-runs.csv")
    by: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        by.setdefault((r["family"], int(r["layers"])), []).append(float(r["ne"]))
    layers = sorted({k[1] for k in by})
    rows = [[fam, *(f"{statistics.mean(by[(fam, n)]):.4f}" + (f" ± {statistics.stdev(by[(fam, n)]):.4f}" if len(by[(fam, n)]) > 1 else "")
                    if (fam, n) in by else "" for n in layers)] for fam in ("kunlun", "interformer")]
    grid = _table(["model", *(f"{n} layer{'s' if n > 1 else ''}" for n in layers)], rows)
    c = _json(f"{folder}/layers-compare.json")["comparison"]
    laws = []
    for fam, key in (("kunlun", "eta_a"), ("interformer", "eta_b")):
        row = _fit_row(_json(f"{folder}/layers-{fam}.json"))
        sigma = "; ".join(f"{g['sigma']:.4f} at {g['compute']:.0f} layers" for g in _json(f"{folder}/layers-{fam}.json")["seed_sigma_by_compute"])
        eta = c[key]
        laws.append([fam, f"{eta['value']:.4f} [{eta['lower']:.4f}, {eta['upper']:.4f}]", sigma, *row[3:]])
    return grid + "\n\n" + _table(["family", "M0 slope η per ln(layers) [90 % CI] (> 0: deeper is better)", "seed σ (NE)",
                                    "chosen", "held-out NE at 8 layers (measured → predicted [90 % PI])", "verdict", "runs' code"], laws)


def onepass3m_embedding_rate() -> str:
    """The embedding-rate scan on the 3M world (``onepass3m/elr-runs.csv``): valid / test NE per model and rate, the
    best valid NE of each model in bold (the rate is chosen on validation)."""
    by: dict[tuple[str, float], dict[str, str]] = {}
    for r in _csv(f"{ONEPASS_3M}/elr-runs.csv"):
        by[(r["family"], float(re.search(r"embedding_lr([\d.e-]+)", r["point"]).group(1)))] = r
    rates = sorted({k[1] for k in by})
    rows = []
    for fam in ("kunlun", "interformer"):
        runs = {lr: by[(fam, lr)] for lr in rates if (fam, lr) in by}
        best = min(runs, key=lambda lr: float(runs[lr]["valid_ne"]))
        cells = []
        for lr in rates:
            text = f"{float(runs[lr]['valid_ne']):.4f} / {float(runs[lr]['ne']):.4f}" if lr in runs else ""
            cells.append(f"**{text}**" if lr == best else text)
        rows.append([fam, *cells])
    codes = sorted({r["code"] for r in by.values()})
    return (_table(["model", *(f"embedding rate {lr:g}: valid / test NE" for lr in rates)], rows)
            + "\n\nRuns of code " + ", ".join(f"`{c}`" for c in codes) + ".")


def onepass3m_d32_rate() -> str:
    """d_model 32 × 819.2k examples on the 3M world at dense rates 0.001 and 0.004 (``onepass3m/d32lr-runs.csv``,
    seed 0) beside the grid's point at 0.002 (``onepass3m/runs.csv``, seeds 0-2): valid / test NE."""
    point = "d_model32-max_steps3200-warmup_steps320"
    cells: dict[tuple[str, float], list[dict[str, str]]] = {}
    for r in _csv(f"{ONEPASS_3M}/d32lr-runs.csv"):
        cells.setdefault((r["family"], float(re.search(r"(?:^|-)lr([\d.]+(?:e-?\d+)?)(?:-|$)", r["point"].split("/")[-1]).group(1))), []).append(r)
    for r in _csv(f"{ONEPASS_3M}/runs.csv"):
        if r["point"].endswith(point):
            cells.setdefault((r["family"], 0.002), []).append(r)
    rates = sorted({k[1] for k in cells})

    def cell(rs: list[dict[str, str]]) -> str:
        v, t = [float(r["valid_ne"]) for r in rs], [float(r["ne"]) for r in rs]
        if len(rs) == 1:
            return f"{v[0]:.4f} / {t[0]:.4f}"
        return f"{statistics.mean(v):.4f} / {statistics.mean(t):.4f} ± {statistics.stdev(t):.4f} ({len(rs)} seeds)"
    rows = [[fam, *(cell(cells[(fam, lr)]) if (fam, lr) in cells else "" for lr in rates)] for fam in ("kunlun", "interformer")]
    codes = sorted({r["code"] for rs in cells.values() for r in rs})
    return (_table(["model", *(f"dense rate {lr:g}: valid / test NE" for lr in rates)], rows)
            + "\n\nRuns of code " + ", ".join(f"`{c}`" for c in codes) + ".")


def onepass_ml1m() -> str:
    """One pass over ML-1M users 1–2999 (``onepass/ml1m-runs.csv``): where the best checkpoint comes before the pass ends."""
    rows = []
    for r in sorted(_csv(f"{ONEPASS}/ml1m-runs.csv"), key=lambda r: (r["family"], _point_value(r["point"], "d_model"))):
        best, steps = int(r["best_step"]), int(r["steps"])
        rows.append([r["family"], str(_point_value(r["point"], "d_model")), f"{float(r['flops_per_example']) / 1e6:.2f}",
                     f"{float(r['ne']):.4f}", f"{best:,} of {steps:,}", _sci(float(r["compute"])), _sci(float(r["train_compute_total"])),
                     "yes" if best < steps else "no"])
    return _table(["model", "d_model", "useful MFLOPs/example", "test NE at best", "best step of the pass", "C at best",
                   "C of the pass", "data-limited"], rows)


# ----------------------------------------------------------------------------------- embedding optimizer

EMBEDDING = "embedding"


def embedding_quality() -> str:
    """Dense Adam against the sparse embedding optimizers (``embedding/quality.json``, benchmarks/embedding_optimizer.py)."""
    rows = []
    for r in _json(f"{EMBEDDING}/quality.json")["rows"]:
        runs = r["runs"]
        ne = f"{r['test_ne_mean']:.4f}" + (f" ± {r['test_ne_std']:.4f}" if r["test_ne_std"] is not None else "")
        rows.append([r["dataset"], f"{r['embedding_optimizer']} ({r['embedding_lr']:g})", str(r["seeds"]), ne,
                     " / ".join(f"{x['test_ne']:.4f}" for x in runs), " / ".join(f"{x['valid_ne']:.4f}" for x in runs),
                     " / ".join(str(x["best_epoch"]) for x in runs), _int(sum(x["train_examples_per_s"] for x in runs) / len(runs))])
    return _table(["data set", "embedding optimizer (lr)", "seeds", "test NE", "per seed", "valid NE per seed",
                   "best epoch", "train ex/s (mean)"], rows)


def embedding_speed() -> str:
    """Seconds per training step against the item table's rows (``embedding/speed.json``)."""
    d = _json(f"{EMBEDDING}/speed.json")
    opts = list(d["rows"][0]["seconds_per_step"])
    rows = [[_int(r["item_rows"]), *(f"{r['seconds_per_step'][o]:.4f}" for o in opts),
             *(f"{r['seconds_per_step']['adam'] / r['seconds_per_step'][o]:.2f}×" for o in opts[1:])] for r in d["rows"]]
    return _table(["item rows", *(f"{o} (s/step)" for o in opts), *(f"adam / {o}" for o in opts[1:])], rows)


DEFAULTS_TABLES = ("movielens", "ml-1m-first-half", "ml1m-log", "synthetic", "frappe")  # defaults/quality-<name>.json


def dense_lr() -> str:
    """The packaged models at the old dense learning rate (``defaults/lr-0.001/``) against the current default
    (``defaults/``): the quality benchmark's tables, per data set and model, ΔNE of the means."""
    rows = []
    for name in DEFAULTS_TABLES:
        old, new = _json(f"defaults/lr-0.001/quality-{name}.json"), _json(f"defaults/quality-{name}.json")
        for dataset, table in new["results"].items():
            for model in ("kunlun", "dnn"):
                a, b = old["results"][dataset][model], table[model]
                if a["seeds"] != b["seeds"]:
                    raise ResultsError(f"defaults/quality-{name}: {model} on {dataset} has {b['seeds']} seeds, the lr 0.001 table {a['seeds']}")
                rows.append([f"{dataset} ({b['split']})", model, str(b["seeds"]), _ne_cell(a["ne"]), _ne_cell(b["ne"]),
                             f"{b['ne']['mean'] - a['ne']['mean']:+.4f}"])
    return _table(["data set (split)", "model", "seeds", "NE at lr 0.001", "NE at lr 0.002", "Δ mean"], rows)


# ----------------------------------------------------------------------------------------------- tuned

def tuned_target() -> str:
    """Issue 24's target on the tuned tables (``tuned/quality-*.json``, ``kunlun bench quality --tuned``): Kunlun's
    mean NE against each baseline's, the gap in units of the larger of the two seed σ (the target: more than 2), and
    the useful FLOPs per example of each."""
    files = sorted(RESULTS.glob("tuned/quality-*.json"))
    if not files:
        raise ResultsError("benchmarks/results/tuned/quality-*.json not found")
    rows = []
    for path in files:
        for dataset, table in json.loads(path.read_text(encoding="utf-8"))["results"].items():
            k = table["kunlun"]
            rows.append([f"{dataset} ({k['split']})", "**kunlun**", f"{k['ne']['mean']:.4f} ± {k['ne']['std']:.4f}", "", "", "",
                         _mflops(k["useful_flops_per_example"])])
            for model, r in table.items():
                if model == "kunlun" or "skipped" in r:
                    continue
                gap, sigma = r["ne"]["mean"] - k["ne"]["mean"], max(r["ne"]["std"], k["ne"]["std"])
                rows.append(["", model, f"{r['ne']['mean']:.4f} ± {r['ne']['std']:.4f}", f"{gap:+.4f}",
                             f"{gap / sigma:+.1f}" if sigma > 0 else "", "yes" if gap > 2 * sigma else "no",
                             _mflops(r["useful_flops_per_example"])])
    return _table(["data set (split)", "model", "NE (mean ± σ over seeds)", "its NE − Kunlun's", "in σ (larger of the two)",
                   "Kunlun ahead by > 2σ", "useful MFLOPs/ex"], rows)


def history() -> str:
    """Kunlun and DNN on ml-100k with the last event as the history (``inputs/history-ml-100k-fd460bb.json``) against
    the packaged 50 (the defaults table, ``defaults/quality-movielens.json``): what the history is worth to each."""
    short, full = _json("inputs/history-ml-100k-fd460bb.json")["results"]["ml-100k"], _json("defaults/quality-movielens.json")["results"]["ml-100k"]
    rows = []
    for model in ("kunlun", "dnn"):
        a, b = short[model]["ne"], full[model]["ne"]
        if len(a["values"]) != len(b["values"]):
            raise ResultsError(f"history: {model} has {len(a['values'])} seeds with the last event only, {len(b['values'])} with 50")
        rows.append([model, _ne_cell(a), _ne_cell(b), f"{b['mean'] - a['mean']:+.4f}"])
    return _table(["model", "test NE, last event only", "test NE, last 50 events (default)", "Δ (negative: the history helps)"], rows)


def _ne_cell(cell: dict) -> str:
    per_seed = " / ".join(f"{v:.4f}" for v in cell["values"])
    return f"{cell['mean']:.4f} ± {cell['std']:.4f} ({per_seed})" if len(cell["values"]) > 1 else f"{cell['mean']:.4f}"


# ------------------------------------------------------------------------------------------------- gpu

GPU = "gpu/h100-2026-12-06"


def _log_json(rel: str) -> dict:
    """The JSON object a ``--json`` command printed as the last line of its log."""
    path = RESULTS / rel
    if not path.is_file():
        raise ResultsError(f"benchmarks/results/{rel} not found")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("{")]
    if not lines:
        raise ResultsError(f"benchmarks/results/{rel}: no JSON line")
    return json.loads(lines[-1])


def gpu_speed() -> str:
    """``kunlun bench speed --json`` on the H100 (the JSON line of ``speed_default.log``)."""
    d = _log_json(f"{GPU}/speed_default.log")
    dts = [dt for dt in ("fp32", "bf16") if dt in d]
    rows = [
        ["training step, examples/s", *(_int(d[dt]["train_examples_per_s"]) for dt in dts)],
        ["through the trainer, examples/s", *(_int(d[dt]["trainer_examples_per_s"]) for dt in dts)],
        ["inference, examples/s", *(_int(d[dt]["infer_examples_per_s"]) for dt in dts)],
        ["measured GEMM peak, TFLOP/s", *(f"{d[dt]['gemm_flops_per_s'] / 1e12:.1f}" for dt in dts)],
        ["training MFU / HFU (of the measured peak)", *(f"{100 * d[dt]['train_mfu']:.2g} % / {100 * d[dt]['train_hfu']:.2g} %" for dt in dts)],
    ]
    head = f"{d['device']}, {d['model']} on {d['dataset']}, batch {d['batch_size']}, histories of {d['max_seq_len']}, " \
           f"{_mflops(d['useful_flops_per_example'])} useful / {_mflops(d['executed_flops_per_example'])} executed MFLOPs " \
           f"per example; code `{d['code']}`."
    return head + "\n\n" + _table(["", *dts], rows)


def gpu_train() -> str:
    """``kunlun train --json`` runs on the H100 (``train_*.log``): the models that finished."""
    rows = []
    for model in ("interformer", "kunlun"):
        rel = f"{GPU}/train_{model}.log"
        text = (RESULTS / rel).read_text(encoding="utf-8") if (RESULTS / rel).is_file() else ""
        speed = re.search(r"\(([\d.]+)s, (\d+) train ex/s\)", text)
        flops = re.search(r"([\d.]+) useful / ([\d.]+) executed MFLOPs/example, ([\d,]+) parameters", text)
        if not text.strip():
            raise ResultsError(f"benchmarks/results/{rel} not found or empty")
        if "{" not in text:
            rows.append([model, flops.group(1) + " / " + flops.group(2) if flops else "", "did not finish its epoch", "", "", ""])
            continue
        m = _log_json(rel)
        rows.append([model, f"{flops.group(1)} / {flops.group(2)}" if flops else "", f"{speed.group(1)} s" if speed else "",
                     _int(int(speed.group(2))) if speed else "", f"{m['valid']['ne']:.4f}", f"{m['test']['ne']:.4f}"])
    return _table(["model", "MFLOPs/ex useful / executed", "wall (run)", "train ex/s", "valid NE", "test NE"], rows)


TABLES: dict[str, Callable[[], str]] = {
    "speed": speed, "speed-loader": speed_loader, "end-to-end": end_to_end, "end-to-end-e26e8c2": end_to_end_e26e8c2,
    "threads": threads, "scaling": scaling, "scaling-rolling": scaling_rolling, "scaling-compare": scaling_compare,
    "width": width, "width-compare": width_compare, "gpu-speed": gpu_speed, "gpu-train": gpu_train,
    "onepass-grid": onepass_grid, "onepass-laws": onepass_laws, "onepass-compare": onepass_compare,
    "onepass-layers": onepass_layers, "onepass-ml1m": onepass_ml1m,
    "onepass3m-grid": lambda: onepass_grid(ONEPASS_3M), "onepass3m-laws": lambda: onepass_laws(ONEPASS_3M),
    "onepass3m-compare": lambda: onepass_compare(ONEPASS_3M), "onepass3m-layers": lambda: onepass_layers(ONEPASS_3M),
    "onepass3m-embedding-rate": onepass3m_embedding_rate, "onepass3m-d32-rate": onepass3m_d32_rate,
    "embedding-quality": embedding_quality, "embedding-speed": embedding_speed, "dense-lr": dense_lr,
    "tuned-target": tuned_target, "history": history,
}


def render(markdown: str, where: str = "page") -> str:
    """``markdown`` with every results-table marker replaced by its table."""
    def table(m: re.Match) -> str:
        indent, name = m.group(1), m.group(2)
        if name not in TABLES:
            raise ResultsError(f"{where}: unknown results table {name!r}; known: {', '.join(TABLES)}")
        return "\n".join(indent + line if line else line for line in TABLES[name]().splitlines())

    out = MARKER.sub(table, markdown)
    if re.search(r"^[ \t]*<!-- results-table", out, re.MULTILINE):
        raise ResultsError(f"{where}: a results-table marker that is not of the form <!-- results-table: NAME -->")
    return out


# ----------------------------------------------------------------------------------------------- hooks

def on_page_markdown(markdown, page, config, files, **kwargs):  # noqa: ARG001 (MkDocs hook signature)
    from mkdocs.exceptions import PluginError

    try:
        return render(markdown, page.file.src_uri)
    except (ResultsError, KeyError, ValueError) as exc:
        raise PluginError(f"results tables: {exc}") from exc


def on_files(files, config, **kwargs):  # noqa: ARG001
    """Publish benchmarks/results/ (all but its Markdown, which pages include) under results/data/."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix != ".md":
            files.append(File.generated(config, f"{SITE_PREFIX}/{path.relative_to(RESULTS).as_posix()}", abs_src_path=str(path)))
    return files


if __name__ == "__main__":
    for name in sys.argv[1:] or TABLES:
        print(f"## {name}\n\n{TABLES[name]()}\n")
