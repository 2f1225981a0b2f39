"""Scaling report: text table, PNG plots and one self-contained HTML file (plots embedded as base64).

Plots: NE vs compute (log axis) with the chosen fit, its prediction band and held-out runs marked;
held-out error vs extrapolation distance in decades (rolling origin, every form); NE vs layers.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kunlun.files import atomic_write_text

COLORS = {"M0": "tab:blue", "M1": "tab:orange", "M2": "tab:green"}
X_LABELS = {"compute": "training compute C (FLOPs)", "layers": "layers"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def forms_table(result: dict[str, Any]) -> list[list[str]]:
    """Rows: form, in-sample error, held-out signed errors, inside interval, rolling-origin error, passes."""
    rows = [["form", "in-sample mean |err|", "held-out signed error", "inside 90 % PI", "rolling-origin mean |err|", "passes"]]
    for name, f in result["forms"].items():
        if "skipped" in f:
            rows.append([f"{name} {f['title']}", f["skipped"], "", "", "", ""])
            continue
        errs = ", ".join(f"{100 * r['error']:+.2f} %" for r in f["holdout"]) or "–"
        inside = ", ".join("yes" if r["inside"] else "no" for r in f["holdout"]) or "–"
        roll = f"{100 * f['rolling_mean_abs_error']:.2f} %" if f.get("rolling_mean_abs_error") is not None else "–"
        rows.append([f"{name} {f['title']}", f"{100 * f['in_sample_mean_abs_error']:.2f} %", errs, inside, roll,
                     "yes" if f["passes"] else "no"])
    return rows


def plot_ne_vs_compute(result: dict[str, Any], path: Path, others: list[dict[str, Any]] = ()) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate([result, *others]):
        color = f"C{i}"
        fit_runs = [x for x in r["runs"] if not x["held_out"]]
        held = [x for x in r["runs"] if x["held_out"]]
        label = r["family"] or "runs"
        off = [g for g in r.get("grid", []) if not g["on_frontier"]]
        if off:
            ax.scatter([g["compute"] for g in off], [g["ne"] for g in off], facecolor="none", edgecolor=color, s=22, alpha=0.6,
                       label=f"{label}: grid points off the frontier (seed mean)")
        ax.scatter([x["compute"] for x in fit_runs], [x["ne"] for x in fit_runs], color=color, s=22, label=f"{label}: fitted runs")
        if held:
            ax.scatter([x["compute"] for x in held], [x["ne"] for x in held], color=color, marker="*", s=110, edgecolor="k",
                       label=f"{label}: held out")
        chosen = r.get("chosen")
        if chosen:
            c = r["forms"][chosen]["curve"]
            ax.plot(c["compute"], c["predicted"], color=color, lw=1.5, label=f"{label}: {chosen} fit")
            ax.fill_between(c["compute"], c["lower"], c["upper"], color=color, alpha=0.15,
                            label=f"{label}: {100 * r['level']:.0f} % prediction interval")
    ax.axvline(result["fit_window"][1], color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(X_LABELS[result.get("x", "compute")])
    ax.set_ylabel(result["metric"] or "NE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_error_vs_distance(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, f in result["forms"].items():
        roll = f.get("rolling") or []
        if roll:
            ax.scatter([r["decades"] for r in roll], [100 * r["error"] for r in roll], s=14, alpha=0.6, color=COLORS.get(name),
                       label=f"{name} rolling origin")
        if f.get("holdout"):
            ax.scatter([r["decades"] for r in f["holdout"]], [100 * r["error"] for r in f["holdout"]], marker="*", s=120,
                       color=COLORS.get(name), edgecolor="k", label=f"{name} held out")
    ax.axhline(0, color="k", lw=0.8)
    for s in (-1, 1):
        ax.axhline(s * 100 * result["tolerance"], color="grey", ls=":", lw=1)
    ax.set_xlabel(f"extrapolation distance (decades of {result.get('x', 'compute')} beyond the fitted runs)")
    ax.set_ylabel("signed error (predicted − measured) / measured, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ne_vs_layers(result: dict[str, Any], path: Path) -> bool:
    runs = [r for r in result["runs"] if r.get("layers") is not None]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    from matplotlib.colors import LogNorm

    sc = ax.scatter([r["layers"] for r in runs], [r["ne"] for r in runs], c=[r["compute"] for r in runs], cmap="viridis", norm=LogNorm())
    fig.colorbar(sc, label="training compute C (FLOPs)")
    ax.set_xlabel("layers")
    ax.set_ylabel(result["metric"] or "NE")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def seed_noise_text(result: dict[str, Any]) -> str:
    groups = result.get("seed_sigma_by_compute") or []
    if not groups:
        return "not estimated (needs ≥ 2 seeds at some compute)"
    return "; ".join(f"{g['sigma']:.4f} NE at C = {g['compute']:.3g} ({g['dof']} dof)" for g in groups)


def fit_table(result: dict[str, Any]) -> None:
    """A fit (``kunlun fit``) on stdout: the forms' table, each held-out run against its prediction, seed noise, the
    code that trained the runs and the verdict."""
    from rich.table import Table

    from kunlun.console import out_console

    rows = forms_table(result)
    table = Table(title=f"{result['family'] or 'runs'} on {result['dataset'] or '?'}: {result['n_fit']} runs fitted, "
                        f"{result['n_holdout']} held out ({result['metric'] or 'NE'})")
    for c in rows[0]:
        table.add_column(c)
    for r in rows[1:]:
        table.add_row(*r)
    con = out_console()
    con.print(table)
    x = "C" if result.get("x", "compute") == "compute" else result["x"]
    for r in result["holdout"]:
        sigma = f"{r['seed_sigma']:.4f}" if r.get("seed_sigma") is not None else "not estimated"
        con.print(f"  held out {x}={r['compute']:.3g}: NE {r['ne']:.4f}, predicted {r['predicted']:.4f} "
                  f"[{r['lower']:.4f}, {r['upper']:.4f}], seed σ there {sigma}", highlight=False)
    con.print(f"seed noise σ: {seed_noise_text(result)}", highlight=False)
    for line in frontier_lines(result):
        con.print(line, highlight=False)
    con.print(f"code: {result.get('provenance', 'unknown')}", highlight=False)
    con.print(result["verdict"], highlight=False)


def frontier_rows(result: dict[str, Any]) -> list[list[str]]:
    """``kunlun fit --frontier``: every grid point (seeds averaged) in order of compute, and whether it is on the frontier."""
    rows = [["compute (FLOPs)", "NE (seed mean)", "seeds", "FLOPs/example", "examples", "on frontier", "point"]]
    for g in result.get("grid", []):
        rows.append([f"{g['compute']:.4g}", f"{g['ne']:.5f}", str(g["seeds"]),
                     f"{g['flops_per_example']:.4g}" if g["flops_per_example"] else "", f"{g['examples']:,.0f}" if g["examples"] else "",
                     "yes" if g["on_frontier"] else "", Path(g["point"]).name])
    return rows


def frontier_lines(result: dict[str, Any]) -> list[str]:
    """What ``--frontier`` kept, and how the frontier's model size grows with compute."""
    if "grid" not in result:
        return []
    on = sum(g["on_frontier"] for g in result["grid"])
    lines = [f"compute-optimal frontier: {on} of {len(result['grid'])} grid points (fitted above; the rest are off it)"]
    s = result.get("optimal_size")
    if s:
        p, (lo, hi) = s["params"], s["size_exponent_interval"]
        lines.append(f"{s['form']} over the grid: alpha {p['alpha']:.3f}, beta {p['beta']:.3f}, E {s['E']:.4f} "
                     f"[{s['E_interval'][0]:.4f}, {s['E_interval'][1]:.4f}], in-sample mean |error| "
                     f"{100 * s['in_sample_mean_abs_error']:.2f} %")
        lines.append(f"compute-optimal size: FLOPs/example ∝ C^{s['size_exponent']:.2f} [{lo:.2f}, {hi:.2f}], examples ∝ "
                     f"C^{1 - s['size_exponent']:.2f} ({100 * s['level']:.0f} % bootstrap, {s['bootstrap']} resamples)")
        for h in s["holdout"]:
            lines.append(f"  surface, held out F={h['flops_per_example']:.3g} D={h['examples']:,.0f}: NE {h['ne']:.4f}, predicted "
                         f"{h['predicted']:.4f} [{h['lower']:.4f}, {h['upper']:.4f}] ({100 * h['error']:+.2f} %)")
    return lines


def fit_and_report(inputs: list[Path], family: str | None = None, compare: tuple[str, str] | None = None, holdout: int = 2,
                   n_boot: int = 1000, level: float = 0.9, tolerance: float = 1e-3, seed: int = 0, report_dir: Path | None = None,
                   progress: Callable[[str], None] | None = None, x: str = "compute", use_frontier: bool = False) -> dict[str, Any]:
    """``kunlun fit``: ``fit_inputs`` of ``inputs`` (or of ``family`` among them), or with ``compare`` (two family names
    or paths) ``compare_inputs`` of the two; with ``report_dir``, report.html and its plots written there too. ``x`` and
    ``use_frontier``: ``kunlun.scaling.law.reduce_points``."""
    from kunlun.scaling.law import compare_inputs, fit_inputs

    if compare:
        both = compare_inputs(inputs, *compare, holdout, n_boot, level, tolerance, seed, progress=progress, x=x,
                              use_frontier=use_frontier)
        if report_dir:
            write_report(both["a"], report_dir, both["comparison"], both["b"])
        return both
    result = fit_inputs(inputs, family, holdout, n_boot, level, tolerance, seed, progress=progress, x=x, use_frontier=use_frontier)
    if report_dir:
        for f in write_report(result, report_dir):
            (progress or (lambda m: None))(f"wrote {f}")
    return result


def fit_tables(result: dict[str, Any]) -> None:
    """``fit_and_report``'s result on stdout: the fit, or both fits and their comparison."""
    if "comparison" in result:
        fit_table(result["a"])
        fit_table(result["b"])
        comparison_table(result["comparison"], result["a"].get("x", "compute"))
    else:
        fit_table(result)


def comparison_table(c: dict[str, Any], x: str = "compute") -> None:
    """Two families compared (``kunlun fit --compare``) on stdout: slope ratio, compute multiplier and each η."""
    from kunlun.console import out_console

    con = out_console()
    con.print(f"{c['a']} vs {c['b']} (M0 fits, {100 * c['level']:.0f} % bootstrap intervals):", highlight=False)
    for key, what in (("slope_ratio", "scaling efficiency η_A/η_B"),
                      ("compute_multiplier", f"effective-{x} multiplier at {'C' if x == 'compute' else x}={c['at_compute']:.3g}"),
                      ("eta_a", f"η {c['a']}"), ("eta_b", f"η {c['b']}")):
        v = c[key]
        dropped = f" ({100 * v['dropped_fraction']:.1f} % of resamples undefined: {c['b']}'s slope ≤ 0)" if v.get("dropped_fraction") else ""
        con.print(f"  {what}: {v['value']:.4g} [{v['lower']:.4g}, {v['upper']:.4g}]{dropped}", highlight=False)


def _table_html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(result: dict[str, Any], out: Path, comparison: dict[str, Any] | None = None, other: dict[str, Any] | None = None) -> list[Path]:
    """Write PNGs and report.html into ``out``; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "ne_vs_compute.png", out / "holdout_error_vs_distance.png"]
    plot_ne_vs_compute(result, files[0], [other] if other else [])
    plot_error_vs_distance(result, files[1])
    if plot_ne_vs_layers(result, out / "ne_vs_layers.png"):
        files.append(out / "ne_vs_layers.png")
    imgs = "".join(f'<p><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></p>' for p in files)
    raw = [["compute (FLOPs)", "NE", "seed", "layers", "FLOPs/example", "held out", "code", "source"]] + [
        [f"{r['compute']:.4g}", f"{r['ne']:.5f}", str(r["seed"]), str(r["layers"]),
         f"{r['flops_per_example']:.4g}" if r.get("flops_per_example") else "", "yes" if r["held_out"] else "", r.get("code") or "",
         r["source"]]
        for r in result["runs"]]
    params = [["form", "parameter", "value", f"{100 * result['level']:.0f} % bootstrap interval"]] + [
        [name, k, f"{v:.5g}", "[{:.4g}, {:.4g}]".format(*f["param_intervals"][k])]
        for name, f in result["forms"].items() if "params" in f for k, v in f["params"].items()]
    seed = seed_noise_text(result)
    cmp_html = ""
    if comparison:
        c = comparison
        cmp_rows = [["quantity", "value", f"{100 * c['level']:.0f} % bootstrap interval"]] + [
            [k, f"{c[k]['value']:.4g}", f"[{c[k]['lower']:.4g}, {c[k]['upper']:.4g}]"
             + (f" ({100 * c[k]['dropped_fraction']:.1f} % of resamples undefined: B's slope ≤ 0)" if c[k].get("dropped_fraction") else "")]
            for k in ("eta_a", "eta_b", "slope_ratio", "compute_multiplier")]
        cmp_html = (f"<h2>{html.escape(c['a'])} vs {html.escape(c['b'])}</h2><p>Both fitted with M0 (L = a − η ln c) on all their runs; "
                    f"slope ratio = η<sub>A</sub>/η<sub>B</sub>; compute multiplier k with L<sub>A</sub>(C) = L<sub>B</sub>(kC) at "
                    + (f"C = {c['at_compute']:.3g} FLOPs" if result.get("x", "compute") == "compute" else f"{result['x']} = {c['at_compute']:.3g}")
                    + ".</p>" + _table_html(cmp_rows))
    frontier_html = ""
    for r in [result, *([other] if other else [])]:
        if "grid" in r:
            frontier_html += (f"<h2>Compute-optimal frontier: {html.escape(r['family'] or 'runs')}</h2><p>"
                              + "<br>".join(html.escape(line) for line in frontier_lines(r)) + "</p>" + _table_html(frontier_rows(r)))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>kunlun scaling report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px}}img{{max-width:100%}}</style></head><body>
<h1>Scaling report: {html.escape(result['family'] or 'runs')} on {html.escape(result['dataset'] or '?')}</h1>
<p><b>Verdict:</b> {html.escape(result['verdict'])}</p>
{_table_html(forms_table(result))}
<h2>Conventions</h2><ul><li>{html.escape(result['convention'])}; metric: {html.escape(result['metric'] or 'NE')}</li>
<li>Objective: {html.escape(result['objective'])}; L-BFGS-B from variable-projection and Chinchilla-grid starts.</li>
<li>Held out: the {result['n_holdout']} run(s) at the largest computes; fitted on the other {result['n_fit']}.
Intervals: {result['bootstrap']} bootstrap resamples over runs; prediction interval adds N(0, σ²) in ln NE,
σ = max(residual, seed noise at that compute).</li><li>Seed noise σ, measured where seeds were repeated (each held-out run
is judged against the σ at the nearest such compute): {html.escape(seed)}. Tolerance: {100 * result['tolerance']:.2f} % relative NE.</li>
<li>Code: {html.escape(result.get('provenance', 'unknown'))}</li></ul>
{cmp_html}{frontier_html}<h2>Plots</h2>{imgs}<h2>Parameters</h2>{_table_html(params)}
<p>Parameters of NE curves are poorly identified; interpret the predictions and their validation, not E or α.</p>
<h2>Runs</h2>{_table_html(raw)}</body></html>"""
    atomic_write_text(out / "report.html", doc)
    return [*files, out / "report.html"]
