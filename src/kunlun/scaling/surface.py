"""NE as a function of model size and data together, fitted over a grid of both (Chinchilla's approach 3).

    L(F, D) = E + A·(F/F₀)^−α + B·(D/D₀)^−β

F = useful forward FLOPs per example (the model's size in compute), D = training examples processed, F₀ and D₀ the
fitted runs' smallest. With C = 3·F·D, the F that minimises L at a fixed C grows as F_opt ∝ C^a with a = β / (α + β)
(and D_opt ∝ C^(1−a)): the compute-optimal split between size and data. Fitting the surface to every grid point
reads a off the whole grid; reading it off the best run at each compute would follow the grid's edges instead.

Objective: Σ Huber_δ(ln L̂ − ln L) (``kunlun.scaling.forms``' δ), L-BFGS-B with an analytic gradient from a grid
of starts; bootstrap refits over grid points start from the point estimate and from a high and a low floor.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy.optimize import minimize

from kunlun.scaling.forms import DELTA, huber

PARAMS = ("lnE", "lnA", "alpha", "lnB", "beta")
BOUNDS = [(None, None), (None, None), (0.0, 3.0), (None, None), (0.0, 3.0)]


def _objective(theta: np.ndarray, f: np.ndarray, d: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Huber loss of ln L̂ − y at f = ln(F/F₀), d = ln(D/D₀), and its gradient in θ = (ln E, ln A, α, ln B, β)."""
    ln_e, ln_a, alpha, ln_b, beta = theta
    terms = np.stack([np.full_like(f, ln_e), ln_a - alpha * f, ln_b - beta * d])  # ln of each of L's three terms [3, n]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    loss, dr = huber(top + np.log(total) - y, DELTA)
    share = weights / total  # ∂ ln L̂ / ∂ (ln term k)
    grad = np.array([dr @ share[0], dr @ share[1], -(dr * share[1]) @ f, dr @ share[2], -(dr * share[2]) @ d])
    return loss, grad


def _solve(f, d, y, starts) -> np.ndarray:
    best = None
    for s in starts:
        r = minimize(_objective, np.asarray(s, float), args=(f, d, y), jac=True, method="L-BFGS-B", bounds=BOUNDS)
        if best is None or r.fun < best.fun:
            best = r
    return best.x


def fit_surface(flops: np.ndarray, examples: np.ndarray, ne: np.ndarray, n_boot: int = 200, level: float = 0.9,
                seed: int = 0, holdout: int = 0) -> dict[str, Any]:
    """Fit L(F, D) to runs at sizes ``flops`` [n] and data ``examples`` [n] with NE ``ne`` [n], holding out the
    ``holdout`` runs of largest compute F·D; the parameters, the optimal-size exponent a = β/(α+β), each with a
    bootstrap interval over the fitted runs, and each held-out run against its prediction and 90 % prediction
    interval (bootstrap refits plus the fit's residual noise, in ln L)."""
    flops, examples, ne = (np.asarray(v, float) for v in (flops, examples, ne))
    held = np.zeros(len(ne), bool)
    if holdout:
        held[np.argsort(flops * examples, kind="stable")[-holdout:]] = True
    f0, d0 = float(flops[~held].min()), float(examples[~held].min())
    f_all, d_all = np.log(flops / f0), np.log(examples / d0)
    f, d, y = f_all[~held], d_all[~held], np.log(ne[~held])
    floor = float(y.min())
    starts = itertools.product([floor - 0.05, floor - 0.7], [floor - 2, floor - 4], [0.2, 0.6], [floor - 2, floor - 4], [0.2, 0.6])
    theta = _solve(f, d, y, [(e, a, al, b, be) for e, a, al, b, be in starts])

    def exponent(t: np.ndarray) -> float:
        return float(t[4] / (t[2] + t[4])) if t[2] + t[4] > 0 else float("nan")

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if np.ptp(f[i]) > 0 and np.ptp(d[i]) > 0:  # both axes must vary for the surface to be defined
            # from the estimate and from a floor near the resample's best NE and far below it: a floor the runs do not
            # pin down then shows as a wide interval instead of the estimate's own local optimum
            yi = float(y[i].min())
            boots.append(_solve(f[i], d[i], y[i], [theta, np.r_[yi - 0.05, theta[1:]], np.r_[yi - 0.7, theta[1:]]]))
    boots_arr = np.array(boots) if boots else np.full((1, len(PARAMS)), np.nan)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    a_boot = np.array([exponent(t) for t in boots_arr])
    resid = log_predict(theta, f, d) - y
    sigma = float(np.sqrt(np.mean(resid ** 2)))
    rows = []
    for k in np.flatnonzero(held):
        sims = np.array([log_predict(t, f_all[k:k + 1], d_all[k:k + 1])[0] for t in boots_arr]) + rng.normal(0, sigma, len(boots_arr))
        pred = float(np.exp(log_predict(theta, f_all[k:k + 1], d_all[k:k + 1])[0]))
        rows.append({"flops_per_example": float(flops[k]), "examples": float(examples[k]), "compute": float(3 * flops[k] * examples[k]),
                     "ne": float(ne[k]), "predicted": pred, "lower": float(np.exp(np.nanpercentile(sims, lo))),
                     "upper": float(np.exp(np.nanpercentile(sims, hi))), "error": pred / float(ne[k]) - 1})
    return {
        "form": "L = E + A·(F/F0)^-alpha + B·(D/D0)^-beta", "F0": f0, "D0": d0, "n_fit": int((~held).sum()),
        "params": dict(zip(PARAMS, map(float, theta))),
        "param_intervals": {p: [float(np.nanpercentile(boots_arr[:, k], lo)), float(np.nanpercentile(boots_arr[:, k], hi))]
                            for k, p in enumerate(PARAMS)},
        "E": float(np.exp(theta[0])),
        "E_interval": [float(np.exp(np.nanpercentile(boots_arr[:, 0], lo))), float(np.exp(np.nanpercentile(boots_arr[:, 0], hi)))],
        "size_exponent": exponent(theta),
        "size_exponent_interval": [float(np.nanpercentile(a_boot, lo)), float(np.nanpercentile(a_boot, hi))],
        "bootstrap": len(boots), "level": level,
        "in_sample_mean_abs_error": float(np.mean(np.abs(np.expm1(resid)))), "holdout": rows,
    }


def log_predict(theta: np.ndarray, f: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ln L̂ at f = ln(F/F₀), d = ln(D/D₀)."""
    ln_e, ln_a, alpha, ln_b, beta = theta
    return np.logaddexp(np.logaddexp(np.full_like(f, ln_e), ln_a - alpha * f), ln_b - beta * d)
