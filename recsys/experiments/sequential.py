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
effect (the alternative one cares about); the plug-in variance makes it approximate in small samples, which the
A/A benchmark (`python -m benchmarks.run experiments`) measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

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


def looks(daily: list[tuple[np.ndarray, np.ndarray]], tau: float, alpha: float = 0.05) -> list[Look]:
    """The sequence of looks, one per entry of ``daily``: (control values, treatment values) per user, with
    each user's metric as of that look.

    Args:
        tau: the mixing prior's standard deviation, in the metric's units (e.g. the MDE in absolute terms).
    """
    out, p_run = [], 1.0
    tau2 = float(tau) ** 2
    for day, (c, t) in enumerate(daily, start=1):
        c, t = np.asarray(c, float), np.asarray(t, float)
        if len(c) < 2 or len(t) < 2:
            out.append(Look(day, len(c), len(t), float("nan"), p_run, -np.inf, np.inf, 1.0))
            continue
        diff = float(t.mean() - c.mean())
        var = float(c.var(ddof=1) / len(c) + t.var(ddof=1) / len(t))
        p_run = min(p_run, 1.0 / max(msprt_lambda(diff, var, tau2), 1e-300))
        low, high = confidence_sequence(diff, var, tau2, alpha)
        out.append(Look(day, len(c), len(t), diff, float(min(p_run, 1.0)), low, high, welch_p(c, t)))
    return out


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
    return pl.DataFrame([lk.__dict__ for lk in seq])


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
                    days: int | None = None) -> list[Look]:
    """The daily looks of this experiment on ``metric`` (per user), with the mSPRT's always-valid p-values."""
    return looks(daily_user_values(per_user_by_day(d, days), metric, control, treatment), tau, alpha)


def resalted_rates(users_by_day: list[pl.DataFrame], metric: str, tau: float, salts: int, alpha: float = 0.05,
                   shares: tuple[float, float] = (0.5, 0.5), experiment: str = "aa") -> dict:
    """A/A calibration with daily looks: the users of one policy's logs re-split with ``salts`` salts (what an
    A/A test with each salt would have assigned); how often the mSPRT stops on a 'difference' at any look, and
    how often a naive fixed-horizon test read at every look does.

    Returns: {salts, looks, sequential_rate, naive_rate, final_look_rate} (each a share of the salts)."""
    ids = sorted(set().union(*(set(u["user_id"].to_list()) for u in users_by_day)))
    values = [dict(zip(u["user_id"].to_list(), u[metric].to_numpy().astype(float))) for u in users_by_day]
    seq = naive = final = 0
    for s in range(salts):
        arm_a = {u: assign(u, experiment, f"aa-{s}", [("a", shares[0]), ("b", shares[1])]) == "a" for u in ids}
        daily = []
        for v in values:
            a = np.array([x for u, x in v.items() if arm_a[u]])
            b = np.array([x for u, x in v.items() if not arm_a[u]])
            daily.append((a, b))
        run = looks(daily, tau, alpha)
        seq += first_decision(run, alpha) is not None
        naive += first_naive(run, alpha) is not None
        final += run[-1].naive_p < alpha
    return {"salts": salts, "looks": len(users_by_day), "sequential_rate": seq / salts, "naive_rate": naive / salts,
            "final_look_rate": final / salts}
