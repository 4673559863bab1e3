"""Scaling laws fitted to training runs, with bootstrap confidence intervals.

One resource at a time (parameters N, training-set size D, training FLOPs C):

    L(x) = a x^-alpha + L_inf

and parameters and data together, in the form of Hoffmann et al. (2022, "Chinchilla", approach 3):

    L(N, D) = E + A N^-alpha + B D^-beta

Losses here (flow / diffusion / interpolant regression, cross-entropy) are never negative, so L_inf and E are
bounded to [0, min L). Fits minimise squared residuals of log L, so a run at loss 0.3 counts as much as one at 3;
a robust loss (soft L1, as Hoffmann et al. use a Huber loss) keeps one diverged run from deciding an exponent.

Intervals come from a residual bootstrap: refit after adding resampled log-residuals of the best fit to its
predictions. Sweeps have 3-10 points, too few for resampling the points themselves (a resample repeating one
point is often unfittable). Residuals are inflated by sqrt(n / (n - p)) for the p fitted parameters, because
fitted residuals are smaller than the noise that produced them.

With a floor fitted, a law needs more points than parameters to say anything about its noise: with fewer than 4
points the one-resource law drops L_inf (a pure power law, two parameters), and the result says which form it
used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares

LOSS = "soft_l1"
F_SCALE = 0.05  # residuals of log L beyond ~5 % count linearly, not quadratically


@dataclass
class PowerLaw:
    """L(x) = a x^-alpha + l_inf; floor False: l_inf was held at 0, not fitted."""
    a: float
    alpha: float
    l_inf: float
    floor: bool = True

    def __call__(self, x):
        return self.a * np.asarray(x, dtype=float) ** -self.alpha + self.l_inf

    def params(self) -> dict[str, float]:
        return {"a": self.a, "alpha": self.alpha, **({"l_inf": self.l_inf} if self.floor else {})}


@dataclass
class JointLaw:
    """L(N, D) = e + a N^-alpha + b D^-beta."""
    e: float
    a: float
    alpha: float
    b: float
    beta: float

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.e + self.a * n ** -self.alpha + self.b * d ** -self.beta

    def params(self) -> dict[str, float]:
        return asdict(self)

    def compute_optimal(self, flops, flops_per_param_example: float) -> tuple[np.ndarray, np.ndarray]:
        """(N*, D*) minimising L(N, D) under the budget C = k N D (k FLOPs per parameter per training example):
        N* = G (C/k)^(beta/(alpha+beta)), D* = (C/k) / N*, G = (alpha a / (beta b))^(1/(alpha+beta))."""
        budget = np.asarray(flops, dtype=float) / flops_per_param_example
        g = (self.alpha * self.a / (self.beta * self.b)) ** (1 / (self.alpha + self.beta))
        n_opt = g * budget ** (self.beta / (self.alpha + self.beta))
        return n_opt, budget / n_opt


def _check(*columns) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=float).ravel() for c in columns]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("scaling fit: the columns have different lengths")
    for a in arrays:
        if not (np.isfinite(a).all() and (a > 0).all()):
            raise ValueError(f"scaling fit: every value must be finite and > 0, got {a.tolist()}")
    return arrays


def fit_power_law(x, loss, floor: bool | None = None, start: PowerLaw | None = None) -> PowerLaw:
    """Least-squares fit in log space, from `start` or from a grid of starts. floor=None fits L_inf when there
    are at least 4 points."""
    x, loss = _check(x, loss)
    if len(np.unique(x)) < 2:
        raise ValueError(f"scaling fit: need at least 2 distinct x, got {x.tolist()}")
    # fitted in units of the losses' geometric mean, so that losses of any size (1e300 from a diverged run) stay
    # within floating point; a and l_inf scale back with it
    unit = float(np.exp(np.log(loss).mean()))
    loss = loss / unit
    if start is not None:
        start = PowerLaw(start.a / unit, start.alpha, start.l_inf / unit, start.floor)
    floor = len(x) >= 4 if floor is None else floor
    lx, ly, top = np.log(x), np.log(loss), loss.min() * (1 - 1e-6)

    def residuals(theta):  # log(a x^-alpha + l_inf) - log L, without leaving floating point at any theta
        log_a, alpha, l_inf = theta if floor else (*theta, 0.0)
        return np.logaddexp(log_a - alpha * lx, np.log(l_inf) if l_inf > 0 else -np.inf) - ly

    # Without a start: the best straight lines of log(L - L_inf) against log x over a grid of floors.
    starts = []
    for l_inf in np.linspace(0, top, 12) if floor else [0.0]:
        slope, intercept = np.polyfit(lx, np.log(loss - l_inf), 1)
        starts.append([intercept, max(-slope, 1e-3)] + ([l_inf] if floor else []))
    if start is not None:
        starts = [[np.log(start.a), start.alpha] + ([min(start.l_inf, top)] if floor else [])]
    lower = [-np.inf, 0.0] + ([0.0] if floor else [])
    upper = [np.inf, 10.0] + ([top] if floor else [])
    best = min((least_squares(residuals, np.clip(s, np.add(lower, 1e-9), np.subtract(upper, 1e-9)),
                              bounds=(lower, upper), loss=LOSS, f_scale=F_SCALE) for s in starts), key=lambda r: r.cost)
    log_a, alpha, l_inf = best.x if floor else (*best.x, 0.0)
    return PowerLaw(float(np.exp(log_a)) * unit, float(alpha), float(l_inf) * unit, floor)


def fit_joint_law(n, d, loss, start: JointLaw | None = None) -> JointLaw:
    """L(N, D) = E + A N^-alpha + B D^-beta in log space, from `start` or from a grid of starts (the surface has
    local minima)."""
    n, d, loss = _check(n, d, loss)
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(loss) < 5:
        raise ValueError("scaling fit: the joint law needs at least 5 runs with at least 2 distinct N and 2 distinct D")
    unit = float(np.exp(np.log(loss).mean()))  # as in fit_power_law
    loss = loss / unit
    if start is not None:
        start = JointLaw(start.e / unit, start.a / unit, start.alpha, start.b / unit, start.beta)
    ln, ld, ly, top = np.log(n), np.log(d), np.log(loss), loss.min() * (1 - 1e-6)

    def residuals(theta):  # log(e + a N^-alpha + b D^-beta) - log L, as in fit_power_law
        e, log_a, alpha, log_b, beta = theta
        terms = np.logaddexp(log_a - alpha * ln, log_b - beta * ld)
        return (np.logaddexp(terms, np.log(e)) if e > 0 else terms) - ly

    starts = []
    for alpha in (0.2, 0.5, 1.0):
        for beta in (0.2, 0.5, 1.0):
            for e in (0.0, 0.5 * top):
                # split what is above the floor evenly between the two terms at the geometric-mean run
                excess = max(np.exp(ly.mean()) - e, 1e-6 * top)
                starts.append([e, np.log(excess / 2) + alpha * ln.mean(), alpha, np.log(excess / 2) + beta * ld.mean(), beta])
    if start is not None:
        starts = [[min(start.e, top), np.log(start.a), start.alpha, np.log(start.b), start.beta]]
    lower, upper = [0.0, -np.inf, 0.0, -np.inf, 0.0], [top, np.inf, 10.0, np.inf, 10.0]
    best = min((least_squares(residuals, np.clip(s, np.add(lower, 1e-12), np.subtract(upper, 1e-12)),
                              bounds=(lower, upper), loss=LOSS, f_scale=F_SCALE) for s in starts), key=lambda r: r.cost)
    e, log_a, alpha, log_b, beta = best.x
    return JointLaw(float(e) * unit, float(np.exp(log_a)) * unit, float(alpha), float(np.exp(log_b)) * unit, float(beta))


def percentile_intervals(samples: dict[str, list], level: float) -> tuple[dict, dict]:
    """(the samples as arrays, {param: (low, high)} percentile intervals at `level`). (nan, nan) where no resample
    could be fitted: no interval, rather than a made-up one."""
    tail = 100 * (1 - level) / 2
    samples = {k: np.array(v) for k, v in samples.items()}
    return samples, {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if len(v) else (np.nan, np.nan)
                     for k, v in samples.items()}


def bootstrap(fit, columns: list, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The best fit and percentile intervals of every parameter from a residual bootstrap in log space.

    fit(*columns, start=None) returns a PowerLaw or JointLaw; the last column is the loss. Each resample is
    refitted from the best fit. Returns {"fit": law, "interval": {param: (low, high)}, "samples": {param:
    array}}; resamples whose fit fails are dropped."""
    *inputs, loss = [np.asarray(c, dtype=float) for c in columns]
    law = fit(*inputs, loss)
    predicted = law(*inputs)
    residuals = np.log(loss) - np.log(predicted)
    residuals = residuals * np.sqrt(len(loss) / max(len(loss) - len(law.params()), 1))
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in law.params()}
    for _ in range(n_boot):
        resampled = predicted * np.exp(rng.choice(residuals, size=len(loss), replace=True))
        try:
            boot = fit(*inputs, resampled, start=law)
        except (ValueError, np.linalg.LinAlgError):
            continue
        for k, v in boot.params().items():
            samples[k].append(v)
    samples, interval = percentile_intervals(samples, level)
    return {"fit": law, "interval": interval, "samples": samples}


@dataclass
class IsoFlopFit:
    """Hoffmann et al.'s approach 2 (iso-FLOP profiles): at each budget C, runs of several sizes each trained for
    exactly C FLOPs; the minimum of a parabola of log L in log N gives that budget's N*, D* and L*. Then N*(C) =
    n_coef C^a and D*(C) = d_coef C^b, straight lines in log-log through the budgets' minima. D is examples seen.
    `skipped` says why a budget gave no minimum."""
    budgets: list
    n_opt: list
    d_opt: list
    l_opt: list
    a: float
    n_coef: float
    b: float
    d_coef: float
    skipped: dict

    def params(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}

    def predict(self, flops) -> tuple[np.ndarray, np.ndarray]:
        flops = np.asarray(flops, dtype=float)
        return self.n_coef * flops ** self.a, self.d_coef * flops ** self.b


def iso_flop_parabola(n, loss) -> np.ndarray:
    """(c2, c1, c0) of log L = c2 u^2 + c1 u + c0 with u = log N, through one budget's runs."""
    return np.polyfit(np.log(n), np.log(loss), 2)


def budget_minimum(n, d, loss) -> tuple[float, float, float]:
    """(N*, D*, L*) of one budget's runs: the vertex of the parabola of log L in log N, and D* on the straight
    line of log D in log N through the runs (D = C / (k N), with k, the FLOPs per parameter per example, nearly
    the same for every size). A vertex outside the sizes run is refused: it is an extrapolation, and the remedy
    is a larger or smaller model at that budget. Raises ValueError saying why there is no minimum."""
    n, d, loss = _check(n, d, loss)
    if len(np.unique(n)) < 3:
        raise ValueError(f"{len(np.unique(n))} distinct sizes; a parabola needs 3")
    c2, c1, c0 = iso_flop_parabola(n, loss)
    if c2 <= 0:
        raise ValueError("the losses do not rise on both sides of a size (the parabola opens downward): add sizes "
                         "further from the best one")
    u = -c1 / (2 * c2)
    if not np.log(n).min() <= u <= np.log(n).max():
        side = "larger" if u > np.log(n).max() else "smaller"
        raise ValueError(f"the minimum (N ~ {np.exp(u):.3g}) lies outside the sizes run ({n.min():.3g} to {n.max():.3g}): "
                         f"add a {side} model")
    slope, intercept = np.polyfit(np.log(n), np.log(d), 1)
    return float(np.exp(u)), float(np.exp(intercept + slope * u)), float(np.exp(c0 + c1 * u + c2 * u * u))


def near_best_sizes(budgets, n, loss, factor: float) -> np.ndarray:
    """The runs (a boolean mask) whose size lies within `factor` of their budget's best size, the size of lowest loss
    (averaged over its seeds). A parabola of log L in log N describes a profile near its minimum only: further out the
    profile is lopsided (it climbs steeply where a model too large for its budget trains few steps), and a sweep whose
    sizes reach much further on one side than the other pulls a parabola through all of them off its minimum."""
    budgets, n, loss = (np.asarray(c, dtype=float) for c in (budgets, n, loss))
    if not factor > 1:
        raise ValueError(f"a window of sizes needs a factor above 1, not {factor}")
    keep = np.zeros(len(loss), dtype=bool)
    for c in np.unique(budgets):
        at = budgets == c
        sizes = np.unique(n[at])
        best = sizes[np.argmin([loss[at & (n == size)].mean() for size in sizes])]
        keep |= at & (n >= best / factor) & (n <= best * factor)
    return keep


def fit_iso_flop(budgets, n, d, loss) -> IsoFlopFit:
    """The iso-FLOP fit of runs at two or more budgets (each run's budget as asked: runs of one budget share it)."""
    budgets, n, d, loss = _check(budgets, n, d, loss)
    found, skipped = [], {}
    for c in np.unique(budgets):
        at = budgets == c
        try:
            found.append((float(c), *budget_minimum(n[at], d[at], loss[at])))
        except ValueError as e:
            skipped[float(c)] = str(e)
    if len(found) < 2:
        raise ValueError(f"scaling fit: {len(found)} budget(s) with a minimum, the iso-FLOP fit needs 2"
                         + "".join(f"; at {c:.3g} FLOPs: {why}" for c, why in skipped.items()))
    c, n_opt, d_opt, l_opt = (np.array(col) for col in zip(*found))
    a, log_n = np.polyfit(np.log(c), np.log(n_opt), 1)
    b, log_d = np.polyfit(np.log(c), np.log(d_opt), 1)
    return IsoFlopFit(c.tolist(), n_opt.tolist(), d_opt.tolist(), l_opt.tolist(), float(a), float(np.exp(log_n)),
                      float(b), float(np.exp(log_d)), skipped)


def bootstrap_iso_flop(budgets, n, d, loss, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The iso-FLOP fit and percentile intervals of its exponents a and b (and of each budget's N*) from a residual
    bootstrap: the parabolas' log-residuals, pooled over the budgets (one noise, that of a run's final loss) and
    inflated by sqrt(m / (m - 3 B)) for the 3 parameters of each of B parabolas, are resampled onto the parabolas'
    predictions. A resample in which a budget's minimum leaves its sizes is counted in `failed` and dropped;
    many failures mean the minima are poorly pinned. With 3 sizes per budget the parabolas pass through every
    run, nothing measures the noise, and the intervals are NaN."""
    budgets, n, d, loss = (np.asarray(c, dtype=float) for c in (budgets, n, d, loss))
    fit = fit_iso_flop(budgets, n, d, loss)
    used = np.isin(budgets, fit.budgets)
    budgets, n, d, loss = budgets[used], n[used], d[used], loss[used]
    predicted, residuals = np.empty_like(loss), np.empty_like(loss)
    for c in fit.budgets:
        at = budgets == c
        predicted[at] = np.exp(np.polyval(iso_flop_parabola(n[at], loss[at]), np.log(n[at])))
        residuals[at] = np.log(loss[at]) - np.log(predicted[at])
    dof = len(loss) - 3 * len(fit.budgets)
    keys = ["a", "b"] + [f"n_opt@{c:.3g}" for c in fit.budgets]
    samples, failed = {k: [] for k in keys}, 0
    if dof > 0:
        residuals = residuals * np.sqrt(len(loss) / dof)
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            resampled = predicted * np.exp(rng.choice(residuals, size=len(loss), replace=True))
            try:
                boot = fit_iso_flop(budgets, n, d, resampled)
            except ValueError:
                boot = None
            if boot is None or boot.skipped:
                failed += 1
                continue
            for k, v in zip(keys, [boot.a, boot.b, *boot.n_opt]):
                samples[k].append(v)
    samples, interval = percentile_intervals(samples, level)
    return {"fit": fit, "interval": interval, "samples": samples, "failed": failed, "n_boot": n_boot if dof > 0 else 0}


def held_out_budget(fit: IsoFlopFit, budgets, n, d, loss) -> dict | None:
    """The largest budget predicted from the smaller ones (at least 2 of them): N* and D* from their iso-FLOP fit,
    L* from a power law in C through their minima; beside it, what the largest budget's own runs measured. None
    with fewer than 3 budgets."""
    if len(fit.budgets) < 3:
        return None
    budgets = np.asarray(budgets, dtype=float)
    largest, smaller = fit.budgets[-1], np.isin(budgets, fit.budgets[:-1])
    early = fit_iso_flop(budgets[smaller], np.asarray(n)[smaller], np.asarray(d)[smaller], np.asarray(loss)[smaller])
    n_pred, d_pred = early.predict(largest)
    slope, intercept = np.polyfit(np.log(early.budgets), np.log(early.l_opt), 1)
    return {"flops": largest, "from_budgets": early.budgets, "predicted": {"params": float(n_pred), "examples": float(d_pred),
            "loss": float(np.exp(intercept + slope * np.log(largest)))},
            "measured": {"params": fit.n_opt[-1], "examples": fit.d_opt[-1], "loss": fit.l_opt[-1]}}
