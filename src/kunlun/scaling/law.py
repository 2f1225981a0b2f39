"""Fit, bootstrap and *validate* scaling laws (spec: ``../shared/design/scaling.md``).

``analyse`` holds out the runs at the K largest computes, fits every form on the rest, bootstraps
prediction intervals, runs rolling-origin validation, chooses the form by held-out error, and accepts a
law only when every held-out run is predicted within the tolerance, within 2σ of seed noise and inside
the prediction interval. ``compare`` puts two families on one axis: slope ratio and effective-compute
multiplier, each with a bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kunlun.errors import KunlunError
from kunlun.scaling.forms import DELTA, FORMS, Fit, fit_form
from kunlun.scaling.points import Point, check_points, families, load_points, provenance
from kunlun.scaling.surface import fit_surface

CONVENTION = ("C = 3 × useful (unpadded) forward FLOPs/example × training examples processed up to the best-on-validation "
              "checkpoint (2 FLOPs per multiply-add; embedding lookups 0 FLOPs); L = NE at that checkpoint")


def seed_groups(compute: np.ndarray, values: np.ndarray, keys: list[str] | None = None) -> list[dict[str, float]]:
    """Seed noise where it was measured: for every group of ≥ 2 runs that differ only by seed, the sample
    standard deviation of ``values`` there, its degrees of freedom, and where it sits (the geometric mean
    of the group's computes). Groups: ``keys`` (the runs' sweep point) where given, else equal compute.
    With C taken at the best checkpoint, the seeds of one point stop at different computes, so grouping
    by compute alone would miss them."""
    keys = [k or f"compute={c!r}" for k, c in zip(keys or [""] * len(compute), compute)]
    out = []
    for key in dict.fromkeys(keys):
        idx = np.array([k == key for k in keys])
        v = values[idx]
        if len(v) > 1:
            c = compute[idx]
            where = float(c[0]) if np.all(c == c[0]) else float(np.exp(np.log(c).mean()))
            out.append({"compute": where, "sigma": float(v.std(ddof=1)), "dof": len(v) - 1})
    return sorted(out, key=lambda g: g["compute"])


def sigma_at(query: np.ndarray, groups: list[dict[str, float]]) -> np.ndarray:
    """Seed σ at each query compute: the σ measured at the nearest compute (in log C) that has ≥ 2 seeds.

    Seed noise changes by ~10× between small and large runs, so one pooled value would be too wide at one
    end and too narrow at the other; nearest-measured does not extrapolate a trend beyond what was run.
    NaN when no compute has repeated seeds."""
    if not groups:
        return np.full(len(query), np.nan)
    gc = np.log(np.array([g["compute"] for g in groups]))
    gs = np.array([g["sigma"] for g in groups])
    nearest = np.abs(np.log(np.asarray(query, float))[:, None] - gc[None, :]).argmin(axis=1)
    return gs[nearest]


def _resample(rng: np.random.Generator, compute: np.ndarray) -> np.ndarray:
    """Bootstrap indices over runs with at least two distinct computes (else the curve is undefined)."""
    n = len(compute)
    for _ in range(100):
        idx = rng.integers(0, n, n)
        if len(np.unique(compute[idx])) >= 2:
            return idx
    return np.arange(n)


def refits(form: str, compute: np.ndarray, ne: np.ndarray, c_ref: float, n: int, rng: np.random.Generator) -> Iterator[Fit | None]:
    """The bootstrap loop: ``n`` quick refits of ``form`` on runs resampled with replacement (None where a fit fails)."""
    for _ in range(n):
        idx = _resample(rng, compute)
        try:
            yield fit_form(form, compute[idx], ne[idx], c_ref=c_ref, thorough=False)
        except ValueError:
            yield None


def bootstrap(form: str, compute: np.ndarray, ne: np.ndarray, c_ref: float, query: np.ndarray, n_boot: int,
              rng: np.random.Generator) -> np.ndarray:
    """ln-NE predictions at ``query`` from ``n_boot`` refits on runs resampled with replacement: [n_boot, q]."""
    out = np.full((n_boot, len(query)), np.nan)
    for b, fit in enumerate(refits(form, compute, ne, c_ref, n_boot, rng)):
        if fit is not None:
            out[b] = fit.log_predict(query)
    return out


def intervals(boot: np.ndarray, sigma: float | np.ndarray, level: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Percentile confidence interval of the curve, and a prediction interval adding N(0, σ²) noise in ln NE
    (σ a scalar, or one value per query point)."""
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    noisy = boot + rng.normal(0.0, sigma, boot.shape)
    return {"ci_lower": np.exp(np.nanpercentile(boot, lo, axis=0)), "ci_upper": np.exp(np.nanpercentile(boot, hi, axis=0)),
            "lower": np.exp(np.nanpercentile(noisy, lo, axis=0)), "upper": np.exp(np.nanpercentile(noisy, hi, axis=0))}


def prediction_interval(form: str, compute: np.ndarray, ne: np.ndarray, query: np.ndarray, n_boot: int, level: float,
                        sigma_seed_log: float | np.ndarray | None, rng: np.random.Generator,
                        c_ref: float | None = None) -> tuple[Fit, dict, np.ndarray]:
    """Fit ``form`` (all starts), bootstrap it, and return (fit, intervals at ``query``, σ of the added noise in
    ln NE at each query point).

    σ = max(residual standard deviation with n − k degrees of freedom, seed noise at that compute), so a
    prediction interval is never narrower than what re-running the same point with another seed would give."""
    c_ref = float(compute.min()) if c_ref is None else c_ref
    fit = fit_form(form, compute, ne, c_ref=c_ref)
    resid = fit.log_predict(compute) - np.log(ne)
    dof = len(compute) - len(fit.theta)
    sigma_resid = float(np.sqrt((resid ** 2).sum() / dof)) if dof > 0 else 0.0
    seed = np.nan_to_num(np.broadcast_to(np.asarray(sigma_seed_log if sigma_seed_log is not None else np.nan, float),
                                         query.shape), nan=0.0)
    sigma = np.maximum(sigma_resid, seed)
    boot = bootstrap(form, compute, ne, c_ref, query, n_boot, rng)
    return fit, intervals(boot, sigma, level, rng), sigma


def split_holdout(compute: np.ndarray, k: int) -> np.ndarray:
    """Mask of held-out runs: every run at one of the ``k`` largest distinct computes."""
    distinct = np.unique(compute)
    if k < 0:
        raise KunlunError(f"--holdout: expected >= 0, got {k}")
    if len(distinct) - k < 2:
        raise KunlunError(f"{len(distinct)} distinct compute value(s): holding out {k} leaves fewer than 2 to fit "
                          "(a curve needs runs at ≥ 2 computes)")
    return compute >= distinct[len(distinct) - k] if k else np.zeros(len(compute), bool)


def rolling_origin(compute: np.ndarray, ne: np.ndarray, forms: list[str]) -> dict[str, list[dict[str, float]]]:
    """For every origin k: fit on runs at the k smallest computes, predict every larger run."""
    distinct = np.unique(compute)
    out: dict[str, list[dict[str, float]]] = {f: [] for f in forms}
    for k in range(2, len(distinct)):
        inside = compute <= distinct[k - 1]
        for name in forms:
            if inside.sum() <= len(FORMS[name].params):  # at least one residual degree of freedom
                continue
            fit = fit_form(name, compute[inside], ne[inside], thorough=False)
            pred = fit.predict(compute[~inside])
            for c, y, p in zip(compute[~inside], ne[~inside], pred):
                out[name].append({"origin": float(distinct[k - 1]), "compute": float(c), "decades": float(np.log10(c / distinct[k - 1])),
                                  "ne": float(y), "predicted": float(p), "error": float((p - y) / y)})
    return out


def analyse(points: list[Point], holdout: int = 2, n_boot: int = 1000, level: float = 0.9, tolerance: float = 1e-3,
            seed: int = 0, forms: list[str] | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit and validate every form on one family's runs; see the module docstring."""
    forms = forms or list(FORMS)
    fams = sorted({p.family for p in points})
    if len(fams) > 1:
        raise KunlunError(f"runs from several families ({', '.join(fams)}): fit one at a time, or compare two with --compare")
    if n_boot < 1:
        raise KunlunError(f"bootstrap resamples: expected >= 1, got {n_boot}")
    order = np.argsort([p.compute for p in points], kind="stable")
    points = [points[i] for i in order]
    compute = np.array([p.compute for p in points])
    ne = np.array([p.ne for p in points])
    if len(np.unique(compute)) < 2:
        raise KunlunError("all runs have the same compute: a scaling fit needs runs at ≥ 2 distinct computes")
    held = split_holdout(compute, holdout)
    fc, fy = compute[~held], ne[~held]
    usable = [f for f in forms if len(fc) >= len(FORMS[f].params)]
    if not usable:
        raise KunlunError(f"{len(fc)} run(s) to fit: fewer points than parameters of every form ({', '.join(forms)})")
    keys = [p.point for p in points]
    groups, groups_log = seed_groups(compute, ne, keys), seed_groups(compute, np.log(ne), keys)
    rng = np.random.default_rng(seed)
    c_ref = float(fc.min())
    curve_c = np.logspace(np.log10(compute.min()), np.log10(compute.max()), 60)
    result: dict[str, Any] = {
        "family": points[0].family, "dataset": points[0].dataset, "metric": points[0].metric, "convention": CONVENTION,
        "objective": f"sum of Huber(ln L̂ − ln L), delta = {DELTA}", "n_runs": len(points), "n_fit": int(len(fc)),
        "n_holdout": int(held.sum()), "bootstrap": n_boot, "level": level, "tolerance": tolerance,
        "seed_sigma_by_compute": groups, "c_ref": c_ref, "provenance": provenance(points),
        "fit_window": [float(fc.min()), float(fc.max())],
        "runs": [{"compute": p.compute, "ne": p.ne, "seed": p.seed, "layers": p.layers, "flops_per_example": p.flops_per_example,
                  "held_out": bool(h), "source": p.source, "code": p.code, "compute_kind": p.compute_kind}
                 for p, h in zip(points, held)],
        "forms": {},
    }
    for name in forms:
        if name not in usable:
            result["forms"][name] = {"title": FORMS[name].title, "skipped": f"needs ≥ {len(FORMS[name].params)} runs to fit"}
            continue
        if progress:
            progress(f"fitting {name} and bootstrapping ({n_boot} resamples)")
        query = np.concatenate([compute[held], curve_c])
        fit, iv, sigma = prediction_interval(name, fc, fy, query, n_boot, level, sigma_at(query, groups_log), rng, c_ref)
        resid = fit.log_predict(fc) - np.log(fy)
        theta_boot = _param_intervals(name, fc, fy, c_ref, rng, min(n_boot, 200), level)
        nh = int(held.sum())
        pred_h = fit.predict(compute[held])
        rows = []
        seed_h = sigma_at(compute[held], groups)
        for i, (c, y, p) in enumerate(zip(compute[held], ne[held], pred_h)):
            inside = bool(iv["lower"][i] <= y <= iv["upper"][i])
            rows.append({"compute": float(c), "ne": float(y), "predicted": float(p), "lower": float(iv["lower"][i]),
                         "upper": float(iv["upper"][i]), "error": float((p - y) / y), "abs_error": float(p - y), "inside": inside,
                         "decades": float(np.log10(c / fc.max())),
                         "seed_sigma": None if np.isnan(seed_h[i]) else float(seed_h[i])})
        ok_tol = all(abs(r["error"]) <= tolerance for r in rows)
        has_noise = bool(groups)
        ok_noise = has_noise and all(abs(r["abs_error"]) <= 2 * r["seed_sigma"] for r in rows)
        ok_inside = all(r["inside"] for r in rows)
        result["forms"][name] = {
            "title": FORMS[name].title, "params": fit.params(), "param_intervals": theta_boot, "loss": fit.loss,
            "starts": fit.starts, "starts_agree": fit.starts_agree,
            "in_sample_rms_log": float(np.sqrt((resid ** 2).mean())), "in_sample_mean_abs_error": float(np.mean(np.abs(np.expm1(resid)))),
            "sigma_pi_log": sigma[:nh].tolist(), "holdout": rows,
            "holdout_mean_abs_error": float(np.mean([abs(r["error"]) for r in rows])) if rows else None,
            "passes": bool(rows) and ok_tol and ok_noise and ok_inside,
            "checks": {"within_tolerance": ok_tol, "within_2_sigma_seed": ok_noise if has_noise else None, "inside_interval": ok_inside},
            "curve": {"compute": curve_c.tolist(), "predicted": fit.predict(curve_c).tolist(),
                      "lower": iv["lower"][nh:].tolist(), "upper": iv["upper"][nh:].tolist(),
                      "ci_lower": iv["ci_lower"][nh:].tolist(), "ci_upper": iv["ci_upper"][nh:].tolist()},
        }
    if progress:
        progress("rolling-origin validation")
    rolling = rolling_origin(compute, ne, usable)
    for name in usable:
        errs = [abs(r["error"]) for r in rolling[name]]
        result["forms"][name]["rolling"] = rolling[name]
        result["forms"][name]["rolling_mean_abs_error"] = float(np.mean(errs)) if errs else None
    result.update(choose(result))
    return result


def _param_intervals(name: str, fc, fy, c_ref, rng, n: int, level: float) -> dict[str, list[float]]:
    t = np.array([fit.theta for fit in refits(name, fc, fy, c_ref, n, rng) if fit is not None])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {p: [float(np.percentile(t[:, i], lo)), float(np.percentile(t[:, i], hi))] for i, p in enumerate(FORMS[name].params)}


def choose(result: dict[str, Any]) -> dict[str, Any]:
    """Form with the smallest held-out error (rolling-origin error when nothing is held out); ties → fewer params."""
    fitted = {k: v for k, v in result["forms"].items() if "skipped" not in v}
    key = "holdout_mean_abs_error" if result["n_holdout"] else "rolling_mean_abs_error"
    scored = [(v[key], len(FORMS[k].params), k) for k, v in fitted.items() if v.get(key) is not None and np.isfinite(v[key])]
    if not scored:
        return {"chosen": None, "accepted": False, "params": {}, "holdout": [],
                "verdict": "no law: nothing held out and no rolling-origin predictions to validate a form on"}
    _, _, best = min(scored)
    f = fitted[best]
    holdout = [{k: r[k] for k in ("compute", "ne", "predicted", "lower", "upper", "seed_sigma")} for r in f["holdout"]]
    if not result["n_holdout"]:
        verdict = f"{best} chosen by rolling-origin error; nothing held out, so no law is accepted"
        return {"chosen": best, "accepted": False, "params": f["params"], "holdout": holdout, "verdict": verdict}
    if f["passes"]:
        verdict = (f"law accepted: {best} ({FORMS[best].title}) predicts all {len(holdout)} held-out runs within "
                   f"{100 * result['tolerance']:.2f} % NE, within 2σ of the seed noise at its compute and inside the "
                   f"{100 * result['level']:.0f} % interval")
    else:
        failed = [k for k, ok in f["checks"].items() if ok is False]
        if f["checks"]["within_2_sigma_seed"] is None:
            failed.append("no seed-noise estimate (needs ≥ 2 seeds at some compute)")
        passing = [k for k, v in fitted.items() if v.get("passes")]
        verdict = (f"no law: the best form by held-out error, {best}, fails " + ", ".join(failed)
                   + ("" if not passing else f" (forms passing all checks: {', '.join(passing)})")
                   + ("; no form passes" if not passing else ""))
    return {"chosen": best, "accepted": bool(f["passes"]), "params": f["params"], "holdout": holdout, "verdict": verdict}


# ------------------------------------------------------------------------------------------ comparison

def compare(a: list[Point], b: list[Point], n_boot: int = 1000, level: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Two families on one compute axis, each fitted with M0 (L = a − η ln c) on all its runs.

    Scaling efficiency = η_A / η_B. Effective-compute multiplier k: L_A(C) = L_B(k·C) at C = the geometric
    middle of the compute range both families cover, so k = exp((L_B(C) − L_A(C)) / η_B); k > 1 means A
    reaches there the NE that B needs k× the compute for."""
    ca, ya = np.array([p.compute for p in a]), np.array([p.ne for p in a])
    cb, yb = np.array([p.compute for p in b]), np.array([p.ne for p in b])
    for name, c in ((a[0].family or "A", ca), (b[0].family or "B", cb)):
        if len(np.unique(c)) < 2:
            raise KunlunError(f"family {name}: needs runs at ≥ 2 distinct computes to fit a slope")
    lo_c, hi_c = max(ca.min(), cb.min()), min(ca.max(), cb.max())
    overlap = hi_c > lo_c
    c_mid = float(np.sqrt(lo_c * hi_c)) if overlap else float(np.sqrt(max(ca.max(), cb.max()) * min(ca.min(), cb.min())))
    c_ref = float(min(ca.min(), cb.min()))

    def stats(ia, ib):
        fa = fit_form("M0", ca[ia], ya[ia], c_ref=c_ref, thorough=False)
        fb = fit_form("M0", cb[ib], yb[ib], c_ref=c_ref, thorough=False)
        eta_a, eta_b = fa.theta[1], fb.theta[1]
        la, lb = fa.predict(np.array([c_mid]))[0], fb.predict(np.array([c_mid]))[0]
        k = float(np.exp((lb - la) / eta_b)) if eta_b > 0 else float("nan")
        return eta_a, eta_b, eta_a / eta_b if eta_b > 0 else float("nan"), k

    point = stats(np.arange(len(ca)), np.arange(len(cb)))
    rng = np.random.default_rng(seed)
    boots = np.array([stats(_resample(rng, ca), _resample(rng, cb)) for _ in range(n_boot)])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    names = ("eta_a", "eta_b", "slope_ratio", "compute_multiplier")
    # A resample where B's fitted slope is not positive has no multiplier (B never reaches A's NE by adding
    # compute): such resamples are left out of that interval, and the fraction left out is reported with it.
    out = {n: {"value": float(v), "lower": float(np.nanpercentile(boots[:, i], lo)), "upper": float(np.nanpercentile(boots[:, i], hi)),
               "dropped_fraction": float(np.mean(~np.isfinite(boots[:, i])))}
           for i, (n, v) in enumerate(zip(names, point))}
    return {"a": a[0].family or "A", "b": b[0].family or "B", "form": "M0", "at_compute": c_mid, "overlap": bool(overlap),
            "bootstrap": n_boot, "level": level, **out}


# ------------------------------------------------------------------------------------------ inputs → results

def frontier(points: list[Point]) -> tuple[list[Point], list[dict[str, Any]]]:
    """The compute-optimal frontier of a grid (sizes × data): a sweep point (its runs differ only by seed; NE averaged,
    compute geometric-averaged) is on it when its NE is below that of every point run at less compute. Returns the
    runs of the frontier's points, and one row per grid point: compute, NE, seeds, FLOPs/example, examples processed
    (C / (3 × FLOPs/example)) and whether it is on the frontier, in order of compute."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.point or p.source or f"compute={p.compute!r}", []).append(p)
    rows = []
    for key, runs in groups.items():
        c = float(np.exp(np.mean(np.log([r.compute for r in runs]))))
        f = runs[0].flops_per_example
        rows.append({"point": key, "compute": c, "ne": float(np.mean([r.ne for r in runs])), "seeds": len(runs),
                     "flops_per_example": f, "examples": c / (3 * f) if f else None, "layers": runs[0].layers})
    rows.sort(key=lambda r: r["compute"])
    best = np.inf
    for r in rows:
        r["on_frontier"] = bool(r["ne"] < best)
        best = min(best, r["ne"])
    kept = {r["point"] for r in rows if r["on_frontier"]}
    return [p for k, runs in groups.items() if k in kept for p in runs], rows


def optimal_size(rows: list[dict[str, Any]], n_boot: int, level: float, seed: int, holdout: int = 0) -> dict[str, Any] | None:
    """How the compute-optimal model size grows with compute: ``kunlun.scaling.surface.fit_surface`` over the grid's
    points (seed means), the ``holdout`` of largest compute held out. None unless the fitted points vary both size
    (FLOPs/example) and data (examples) and number ≥ 6."""
    grid = sorted((r for r in rows if r["flops_per_example"]), key=lambda r: r["compute"])
    fitted = grid[:len(grid) - holdout]
    if len(fitted) < 6 or len({r["flops_per_example"] for r in fitted}) < 2 or len({round(r["examples"]) for r in fitted}) < 2:
        return None
    return fit_surface(np.array([r["flops_per_example"] for r in grid]), np.array([r["examples"] for r in grid]),
                       np.array([r["ne"] for r in grid]), n_boot, level, seed, holdout)


def by_layers(points: list[Point]) -> list[Point]:
    """The runs with the number of layers in place of compute, for the layer law (NE against depth at a fixed width)."""
    missing = [p.source for p in points if not p.layers]
    if missing:
        raise KunlunError(f"{missing[0]}: no model.num_layers recorded (a CSV needs a layers column) for --x layers")
    return [replace(p, compute=float(p.layers)) for p in points]


def reduce_points(points: list[Point], x: str, use_frontier: bool, n_boot: int, level: float, seed: int,
                  holdout: int = 0) -> tuple[list[Point], dict[str, Any]]:
    """The runs ``analyse`` fits for ``kunlun fit --x/--frontier``, and what to add to its result about them."""
    extra: dict[str, Any] = {"x": x}
    if x == "layers":
        points = by_layers(points)
        extra["convention"] = "x = number of layers (model.num_layers) at the width and data the runs share; L = NE as for compute"
    if use_frontier:
        points, rows = frontier(points)
        extra["grid"] = rows
        extra["optimal_size"] = optimal_size(rows, min(n_boot, 200), level, seed, holdout)
    return points, extra


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise KunlunError(f"--level: expected a number between 0 and 1, got {level}")


def fit_inputs(inputs: list[Path], family: str | None = None, holdout: int = 2, n_boot: int = 1000, level: float = 0.9,
               tolerance: float = 1e-3, seed: int = 0, progress: Callable[[str], None] | None = None, x: str = "compute",
               use_frontier: bool = False) -> dict[str, Any]:
    """``analyse`` the runs of ``inputs`` (run directories, sweep folders, CSV tables), or only ``family``'s; against
    ``x`` (compute, or layers), on the compute-optimal frontier of the runs only with ``use_frontier``."""
    _check_level(level)
    if not inputs:
        raise KunlunError("give run directories, a sweep folder or a CSV file to fit")
    pts = load_points(list(inputs))
    if family:
        fams = families(pts)
        if family not in fams:
            raise KunlunError(f"--family: {family!r} not among the runs ({', '.join(sorted(fams))})")
        pts = fams[family]
    pts, extra = reduce_points(pts, x, use_frontier, n_boot, level, seed, holdout)
    return {**analyse(pts, holdout, n_boot, level, tolerance, seed, progress=progress), **extra}


def compare_inputs(inputs: list[Path], a: str, b: str, holdout: int = 2, n_boot: int = 1000, level: float = 0.9,
                   tolerance: float = 1e-3, seed: int = 0, progress: Callable[[str], None] | None = None, x: str = "compute",
                   use_frontier: bool = False) -> dict[str, Any]:
    """Two families, each a family name among the runs of ``inputs`` or a path of its own: ``analyse`` of each and
    their ``compare``. Returns {"a": result, "b": result, "comparison": ...}."""
    _check_level(level)
    groups = []
    pts = families(load_points(list(inputs))) if inputs else {}
    for name in (a, b):
        if name in pts:
            groups.append(pts[name])
        elif Path(name).exists():
            groups.append(load_points([Path(name)]))
        else:
            known = ", ".join(sorted(pts)) or "none loaded"
            raise KunlunError(f"--compare: {name!r} is neither a family among the inputs ({known}) nor a path")
    check_points(groups[0] + groups[1])
    reduced = [reduce_points(g, x, use_frontier, n_boot, level, seed, holdout) for g in groups]
    groups = [g for g, _ in reduced]
    results = [{**analyse(g, holdout, n_boot, level, tolerance, seed, progress=progress), **extra} for g, extra in reduced]
    return {"a": results[0], "b": results[1], "comparison": compare(groups[0], groups[1], n_boot, level, seed)}
