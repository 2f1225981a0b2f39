"""Candidate scaling forms and their robust fit (``../shared/design/scaling.md`` is the spec).

All forms predict ln L from x = ln c, c = C / C_ref (C_ref = the smallest fitted compute):

    M0 log-linear      L = a − η·x                     params (a, η)
    M1 power law       ln L = ln A − α·x               params (ln A, α)
    M2 saturating      L = E + A·c^−α                  params (ln E, ln A, α)

Objective: Σ Huber_δ(ln L̂ − ln L) with δ = 1e-3 — a sum, not a mean (a mean makes L-BFGS-B stop early).
M2's global search is variable projection: for each α on a grid, (E, A) ≥ 0 solve a non-negative least
squares problem in [1, c^−α]; the best α seeds L-BFGS-B, run also from Chinchilla's grid of starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

DELTA = 1e-3
_TINY = 1e-300


def huber_terms(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Huber_δ of each residual: r²/2 within ±δ, linear beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber(r: np.ndarray, delta: float = DELTA) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(r) and its derivative with respect to each r."""
    return float(huber_terms(r, delta).sum()), np.clip(r, -delta, delta)


class Form:
    name: str
    title: str
    params: tuple[str, ...]

    def log_predict(self, theta: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ln L̂ [n], ∂ ln L̂ / ∂θ [n, k]) at x = ln c."""
        raise NotImplementedError

    def starts(self, x: np.ndarray, y: np.ndarray, thorough: bool) -> list[np.ndarray]:
        raise NotImplementedError

    bounds: list[tuple[float | None, float | None]] = []

    def objective(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
        pred, jac = self.log_predict(theta, x)
        if not np.all(np.isfinite(pred)):
            return 1e30, np.zeros_like(theta)
        loss, dr = huber(pred - y, delta)
        return loss, dr @ jac


class LogLinear(Form):
    name, title, params = "M0", "log-linear  L = a − η ln c", ("a", "eta")
    bounds = [(1e-9, None), (None, None)]

    def log_predict(self, theta, x):
        a, eta = theta
        u = a - eta * x
        if np.any(u <= 0):
            return np.full_like(x, np.nan), np.zeros((len(x), 2))
        return np.log(u), np.stack([1 / u, -x / u], axis=1)

    def starts(self, x, y, thorough):
        L = np.exp(y)
        coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(x), -x], 1), L, rcond=None)
        return [coef] + ([np.array([L.mean(), 0.0])] + [coef * [1, s] for s in (0.5, 2.0)] if thorough else [])


class PowerLaw(Form):
    name, title, params = "M1", "power law  ln L = ln A − α ln c", ("lnA", "alpha")
    bounds = [(None, None), (None, None)]

    def log_predict(self, theta, x):
        lna, alpha = theta
        return lna - alpha * x, np.stack([np.ones_like(x), -x], axis=1)

    def starts(self, x, y, thorough):
        coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(x), -x], 1), y, rcond=None)
        return [coef] + ([np.array([y.mean(), 0.0]), coef * [1, 0.5]] if thorough else [])


class SaturatingPowerLaw(Form):
    name, title, params = "M2", "saturating  L = E + A c^−α", ("lnE", "lnA", "alpha")
    bounds = [(-30.0, 5.0), (-30.0, 30.0), (0.0, 5.0)]
    alpha_grid = np.linspace(0.0, 2.0, 401)

    def log_predict(self, theta, x):
        lne, lna, alpha = theta
        t1 = lna - alpha * x
        pred = np.logaddexp(t1, lne)
        w1, w2 = np.exp(t1 - pred), np.exp(lne - pred)
        return pred, np.stack([w2, w1, -x * w1], axis=1)

    def varpro(self, x: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
        """Best (ln E, ln A, α) over the α grid; for each α, (E, A) = argmin ‖E + A·c^−α − L‖² over E, A ≥ 0.

        The two-variable NNLS is solved in closed form for every α at once: the unconstrained solution
        when both are ≥ 0, else the better of the two one-variable boundary solutions."""
        L = np.exp(y)
        b = np.exp(-np.outer(self.alpha_grid, x))  # [g, n]
        n, sb, sbb, sl, sbl = len(x), b.sum(1), (b * b).sum(1), L.sum(), b @ L
        det = n * sbb - sb * sb
        with np.errstate(divide="ignore", invalid="ignore"):
            e_free = np.where(det > 1e-12 * n * sbb, (sbb * sl - sb * sbl) / det, -1.0)
            a_free = np.where(det > 1e-12 * n * sbb, (n * sbl - sb * sl) / det, -1.0)
        cand_e = np.stack([e_free, np.zeros_like(sb), np.full_like(sb, sl / n)])
        cand_a = np.stack([a_free, np.maximum(sbl / sbb, 0), np.zeros_like(sb)])
        ok = (cand_e >= 0) & (cand_a >= 0)
        resid = cand_e[..., None] + cand_a[..., None] * b[None] - L  # [3, g, n]
        sse = np.where(ok, (resid ** 2).sum(-1), np.inf)
        pick = sse.argmin(0)
        g = np.arange(len(self.alpha_grid))
        e, a = cand_e[pick, g], cand_a[pick, g]
        pred = np.log(np.maximum(e[:, None] + a[:, None] * b, _TINY))
        loss = huber_terms(pred - y, delta).sum(1)
        k = int(loss.argmin())
        return np.array([np.log(max(e[k], 1e-12)), np.log(max(a[k], 1e-12)), self.alpha_grid[k]])

    def starts(self, x, y, thorough):
        out = [self.varpro(x, y, DELTA)]
        if thorough:  # Chinchilla's initialisation grid (Hoffmann et al. 2022, approach 3)
            out += [np.array([e, a, al]) for al, e, a in itertools.product([0, .5, 1, 1.5, 2], [-1, -.5, 0, .5, 1], range(0, 26, 5))]
        return out


FORMS: dict[str, Form] = {f.name: f for f in (LogLinear(), PowerLaw(), SaturatingPowerLaw())}


@dataclass
class Fit:
    form: str
    theta: np.ndarray
    loss: float
    c_ref: float
    starts: int = 1
    starts_agree: int = 1  # starts that reached the best objective (within 1e-9 relative + 1e-12)
    extra: dict = field(default_factory=dict)

    def log_predict(self, compute: np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(compute, dtype=float) / self.c_ref)
        return FORMS[self.form].log_predict(self.theta, x)[0]

    def predict(self, compute: np.ndarray) -> np.ndarray:
        return np.exp(self.log_predict(compute))

    def params(self) -> dict[str, float]:
        return dict(zip(FORMS[self.form].params, map(float, self.theta)))


def fit_form(name: str, compute: np.ndarray, ne: np.ndarray, c_ref: float | None = None, thorough: bool = True,
             delta: float = DELTA) -> Fit:
    """Fit one form by Huber loss on log residuals; ``thorough`` adds the full grid of L-BFGS-B starts."""
    form = FORMS[name]
    compute, ne = np.asarray(compute, float), np.asarray(ne, float)
    c_ref = float(compute.min()) if c_ref is None else c_ref
    x, y = np.log(compute / c_ref), np.log(ne)
    results = []
    for start in form.starts(x, y, thorough):
        start = np.clip(start, [lo if lo is not None else -np.inf for lo, _ in form.bounds],
                        [hi if hi is not None else np.inf for _, hi in form.bounds])
        if not np.isfinite(form.objective(start, x, y, delta)[0]) or form.objective(start, x, y, delta)[0] >= 1e30:
            continue
        res = minimize(form.objective, start, args=(x, y, delta), jac=True, method="L-BFGS-B", bounds=form.bounds,
                       options={"maxiter": 500, "ftol": 1e-15, "gtol": 1e-12})
        results.append((float(res.fun), res.x))
    if not results:
        raise ValueError(f"{name}: no feasible starting point")
    results.sort(key=lambda r: r[0])
    best_loss, best_theta = results[0]
    agree = sum(r[0] <= best_loss * (1 + 1e-9) + 1e-12 for r in results)
    return Fit(name, best_theta, best_loss, c_ref, starts=len(results), starts_agree=agree)
