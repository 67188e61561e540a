"""Looking at an experiment every day without inflating its false positives: the mixture sequential probability
ratio test (mSPRT; Johari, Koomen, Pekelis & Walsh, "Always valid inference", 2017/2022; what Optimizely's Stats
Engine runs) on the difference of two arms' per-user means.

At each look, with the difference estimate D (treatment minus control) and its variance V = s_c^2/n_c + s_t^2/n_t
(the user is the unit: one row per user, metrics up to the look), the mixture likelihood ratio against "no
difference", mixing the alternative over N(0, tau^2), is

    Lambda = sqrt(V / (V + tau^2)) * exp(D^2 tau^2 / (2 V (V + tau^2)))

and the always-valid p-value is the running minimum of 1 / Lambda: stopping at the first look where it falls
under alpha keeps the false-positive rate at alpha however often one looks. Its dual, the confidence sequence

    D +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) - 2 log alpha))

covers the true difference at every look at once. ``tau`` is set from the pre-registered minimum detectable
effect (the alternative one cares about); the plug-in variance makes it approximate in small samples. The mSPRT
holds alpha for any number of looks, so with a few planned looks it spends less than alpha (conservative).

Beside it, the group-sequential test for the planned looks (Lan & DeMets' O'Brien-Fleming-type alpha spending):
at look k, with information fraction t_k (users so far over users at the last planned look), the test rejects
when |z_k| >= c_k, the boundaries chosen so that the chance of crossing by look k under "no difference" is
alpha(t_k) = 2 - 2 Phi(z_(1-alpha/2) / sqrt(t_k)); it spends exactly alpha over the planned looks. The
boundaries are computed by simulating the z statistics' joint law (a Brownian motion at the fractions).
`python -m benchmarks.run traffic` measures both on real-traffic logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from recsys.experiments.analysis import ExperimentData, per_user, welch_p
from recsys.experiments.policy import assign


@dataclass(frozen=True)
class Look:
    """One look: users per arm so far, the difference, its always-valid p-value and confidence sequence, and the
    fixed-horizon (Welch) p-value a naive daily look would read."""

    day: int
    users_control: int
    users_treatment: int
    diff: float
    always_valid_p: float
    cs_low: float
    cs_high: float
    naive_p: float
    z: float = float("nan")
    gs_bound: float = float("inf")  # the group-sequential boundary for |z| at this look

    @property
    def gs_reject(self) -> bool:
        return bool(np.isfinite(self.z) and abs(self.z) >= self.gs_bound)


def msprt_lambda(diff: float, var: float, tau2: float) -> float:
    """The mixture likelihood ratio (see the module docstring); 1.0 where the variance is undefined."""
    if not (var > 0) or not np.isfinite(var):
        return 1.0
    return float(np.sqrt(var / (var + tau2)) * np.exp(diff * diff * tau2 / (2 * var * (var + tau2))))


def confidence_sequence(diff: float, var: float, tau2: float, alpha: float) -> tuple[float, float]:
    """(low, high) of the always-valid interval for the difference at this look."""
    if not (var > 0) or not np.isfinite(var):
        return (-np.inf, np.inf)
    half = np.sqrt(var * (var + tau2) / tau2 * (np.log((var + tau2) / var) - 2 * np.log(alpha)))
    return (float(diff - half), float(diff + half))


def obf_spent(t: np.ndarray | float, alpha: float) -> np.ndarray:
    """Alpha spent by information fraction ``t`` (O'Brien-Fleming-type, Lan-DeMets)."""
    t = np.clip(np.asarray(t, float), 1e-9, 1.0)
    return 2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / np.sqrt(t))


def gs_boundaries(fractions: list[float], alpha: float = 0.05, paths: int = 200_000, seed: int = 0) -> np.ndarray:
    """|z| boundaries at increasing information fractions (the last one 1) spending alpha as obf_spent does,
    from ``paths`` simulated Brownian paths (the z statistics' joint law under no difference)."""
    t = np.asarray(fractions, float)
    key = (tuple(np.round(t, 6)), alpha, paths, seed)
    if key in _BOUNDS:
        return _BOUNDS[key]
    rng = np.random.default_rng(seed)
    w = np.zeros(paths)
    alive = np.ones(paths, bool)
    spent, prev_t, out = 0.0, 0.0, []
    for tk, target in zip(t, obf_spent(t, alpha)):
        w += rng.standard_normal(paths) * np.sqrt(max(tk - prev_t, 0.0))
        prev_t = tk
        z = np.abs(w) / np.sqrt(max(tk, 1e-12))
        need = int(round((target - spent) * paths))
        if need <= 0 or not alive.any():
            out.append(np.inf)
            continue
        candidates = np.sort(z[alive])
        c = candidates[max(len(candidates) - need, 0)]
        crossed = alive & (z >= c)
        spent += crossed.sum() / paths
        alive &= ~crossed
        out.append(float(c))
    _BOUNDS[key] = np.array(out)
    return _BOUNDS[key]


_BOUNDS: dict = {}


def looks(daily: list[tuple[np.ndarray, np.ndarray]], tau: float, alpha: float = 0.05,
          planned: int | None = None) -> list[Look]:
    """The sequence of looks, one per entry of ``daily``: (control values, treatment values) per user, with
    each user's metric as of that look. The group-sequential boundaries take the information fraction of a look
    as its users over the users at the last planned look: the last entry's, or with ``planned`` looks beyond
    the data, the last entry's users scaled by planned / len(daily) (arrivals assumed steady).

    Args:
        tau: the mSPRT mixing prior's standard deviation, in the metric's units (e.g. the MDE in absolute terms).
    """
    out, p_run = [], 1.0
    tau2 = float(tau) ** 2
    n_last = max(len(daily[-1][0]) + len(daily[-1][1]), 1) if daily else 1
    n_last *= max(1.0, (planned or len(daily)) / max(len(daily), 1))
    fractions = [min((len(c) + len(t)) / n_last, 1.0) for c, t in daily]
    fractions = list(np.maximum.accumulate(np.maximum(fractions, 1e-6)))
    bounds = gs_boundaries(fractions, alpha) if daily else []
    for day, (c, t) in enumerate(daily, start=1):
        c, t = np.asarray(c, float), np.asarray(t, float)
        if len(c) < 2 or len(t) < 2:
            out.append(Look(day, len(c), len(t), float("nan"), p_run, -np.inf, np.inf, 1.0, float("nan"), bounds[day - 1]))
            continue
        diff = float(t.mean() - c.mean())
        var = float(c.var(ddof=1) / len(c) + t.var(ddof=1) / len(t))
        p_run = min(p_run, 1.0 / max(msprt_lambda(diff, var, tau2), 1e-300))
        low, high = confidence_sequence(diff, var, tau2, alpha)
        z = diff / np.sqrt(var) if var > 0 else float("nan")
        out.append(Look(day, len(c), len(t), diff, float(min(p_run, 1.0)), low, high, welch_p(c, t), float(z),
                        float(bounds[day - 1])))
    return out


def first_gs(seq: list[Look]) -> int | None:
    """The first look where the group-sequential test crosses its boundary."""
    return next((lk.day for lk in seq if lk.gs_reject), None)


def first_decision(seq: list[Look], alpha: float = 0.05) -> int | None:
    """The first day the always-valid p-value is under ``alpha`` (a decision is allowed from then on)."""
    return next((lk.day for lk in seq if lk.always_valid_p < alpha), None)


def first_naive(seq: list[Look], alpha: float = 0.05) -> int | None:
    """The first day a naive fixed-horizon test read daily says 'significant' (what peeking stops on)."""
    return next((lk.day for lk in seq if lk.naive_p < alpha), None)


def daily_user_values(users_by_day: list[pl.DataFrame], metric: str, control: str,
                      treatment: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per look, each arm's per-user ``metric`` (frames as recsys.experiments.analysis.per_user gives, one per
    look, cumulative up to it)."""
    out = []
    for u in users_by_day:
        out.append((u.filter(pl.col("arm") == control)[metric].to_numpy().astype(float),
                    u.filter(pl.col("arm") == treatment)[metric].to_numpy().astype(float)))
    return out


def looks_frame(seq: list[Look]) -> pl.DataFrame:
    return pl.DataFrame([{**lk.__dict__, "gs_reject": lk.gs_reject} for lk in seq])


def day_cuts(d: ExperimentData, days: int | None = None) -> list:
    """The end of each day of the experiment, counted from its first reply (a daily look each)."""
    from datetime import timedelta

    start, end = d.exposures["ts"].min(), d.exposures["ts"].max()
    n = days or max(1, int(np.ceil((end - start).total_seconds() / 86400)))
    return [start + timedelta(days=i) for i in range(1, n + 1)]


def per_user_by_day(d: ExperimentData, days: int | None = None) -> list[pl.DataFrame]:
    """per_user as of each daily look (each user's metrics counted up to it; users not yet arrived absent)."""
    return [per_user(d, until=cut) for cut in day_cuts(d, days)]


def sequential_test(d: ExperimentData, control: str, treatment: str, metric: str, tau: float, alpha: float = 0.05,
                    days: int | None = None, planned: int | None = None) -> list[Look]:
    """The daily looks of this experiment on ``metric`` (per user): the mSPRT's always-valid p-values and the
    group-sequential test over ``planned`` looks (default: the days the logs cover)."""
    return looks(daily_user_values(per_user_by_day(d, days), metric, control, treatment), tau, alpha, planned)


def resalted_rates(users_by_day: list[pl.DataFrame], metric: str, tau: float, salts: int, alpha: float = 0.05,
                   shares: tuple[float, float] = (0.5, 0.5), experiment: str = "aa") -> dict:
    """A/A calibration with daily looks: the users of one policy's logs re-split with ``salts`` salts (what an
    A/A test with each salt would have assigned); how often each test says 'different' at some look: the mSPRT,
    the group-sequential test, a naive fixed-horizon test read at every look, and that test read once at the end.

    Returns: {salts, looks, users, msprt_rate, group_sequential_rate, naive_rate, final_look_rate}."""
    ids = sorted(set().union(*(set(u["user_id"].to_list()) for u in users_by_day)))
    index = {u: i for i, u in enumerate(ids)}
    values = np.full((len(ids), len(users_by_day)), np.nan)
    for j, u in enumerate(users_by_day):
        values[[index[x] for x in u["user_id"].to_list()], j] = u[metric].to_numpy().astype(float)
    rates = {"msprt": 0, "gs": 0, "naive": 0, "final": 0}
    for s in range(salts):
        in_a = np.array([assign(u, experiment, f"aa-{s}", [("a", shares[0]), ("b", shares[1])]) == "a" for u in ids])
        daily = [(col[in_a & ~np.isnan(col)], col[~in_a & ~np.isnan(col)]) for col in values.T]
        run = looks(daily, tau, alpha)
        rates["msprt"] += first_decision(run, alpha) is not None
        rates["gs"] += first_gs(run) is not None
        rates["naive"] += first_naive(run, alpha) is not None
        rates["final"] += run[-1].naive_p < alpha
    return {"salts": salts, "looks": len(users_by_day), "users": len(ids), "msprt_rate": rates["msprt"] / salts,
            "group_sequential_rate": rates["gs"] / salts, "naive_rate": rates["naive"] / salts,
            "final_look_rate": rates["final"] / salts}
