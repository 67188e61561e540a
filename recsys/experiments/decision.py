"""Deciding on an experiment as it was pre-registered: the primary metric read alone at alpha, the secondary
metrics and the segments corrected for multiple testing (Benjamini-Hochberg), the guardrails tested from the
logs, and, before launch, the users and days a planned experiment needs (``plan``).

The plan (primary metric, secondary metrics, MDE, alpha, power, guardrails) is recorded with the design when the
service starts (recsys.experiments.logs.design_of), so the report reads what was fixed before the first reply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from recsys.config import ExperimentConfig
from recsys.experiments.analysis import ExperimentData, per_user
from recsys.experiments.logs import design_of
from recsys.experiments.sequential import day_cuts

DEFAULT_PLAN = design_of(ExperimentConfig())["plan"]  # what logs from before plans were recorded are read with


def plan_of(d: ExperimentData) -> dict:
    """The pre-registered plan of these logs (the defaults for logs written before plans were recorded)."""
    got = d.meta.get("plan") or {}
    return {**DEFAULT_PLAN, **got, "guardrails": {**DEFAULT_PLAN["guardrails"], **(got.get("guardrails") or {})}}


def benjamini_hochberg(p_values: list[float] | np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q-values): reject those <= alpha to keep the false discovery rate at alpha."""
    p = np.asarray(p_values, float)
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1.0)
    return out


def with_q_values(frame: pl.DataFrame, p_column: str = "p_value") -> pl.DataFrame:
    """``frame`` with a ``q_value`` column: its p-values adjusted together (Benjamini-Hochberg)."""
    return frame.with_columns(pl.Series("q_value", benjamini_hochberg(frame[p_column].to_numpy())))


@dataclass
class Guardrail:
    name: str
    control: float
    treatment: float
    limit: str
    p_value: float | None
    ok: bool

    def row(self) -> dict:
        return self.__dict__ | {"verdict": "ok" if self.ok else "FAILED"}


def _rate_worse(k_c: int, n_c: int, k_t: int, n_t: int, margin: float) -> float:
    """One-sided p-value of 'treatment's rate exceeds control's by more than ``margin``' being false (a small
    value: the treatment is significantly worse than the margin allows)."""
    if n_c == 0 or n_t == 0:
        return 1.0
    pc, pt = k_c / n_c, k_t / n_t
    se = np.sqrt(pc * (1 - pc) / n_c + pt * (1 - pt) / n_t)
    if se == 0:
        return 0.0 if pt - pc > margin else 1.0
    return float(stats.norm.sf((pt - pc - margin) / se))


def guardrails(d: ExperimentData, control: str, treatment: str, catalog_size: int | None = None) -> list[Guardrail]:
    """The pre-registered guardrails on the logs: each arm's p99 latency (the arm's own time per reply) against
    the limit; the error and fallback rates of the treatment against control's plus the allowed increase (a
    one-sided test at the plan's alpha); the distinct items shown against control's less the allowed drop."""
    plan = plan_of(d)
    g, alpha = plan["guardrails"], plan["alpha"]
    e = d.exposures
    has_error = "error" in e.columns
    out: list[Guardrail] = []

    def arm(name: str) -> pl.DataFrame:
        return e.filter(pl.col("arm") == name)

    c, t = arm(control), arm(treatment)
    if g.get("latency_p99_ms") is not None and "latency_ms" in e.columns:
        lat = [x.filter(pl.col("latency_ms").is_not_null())["latency_ms"] for x in (c, t)]
        p99 = [float(v.quantile(0.99)) if len(v) else float("nan") for v in lat]
        limit = float(g["latency_p99_ms"])
        out.append(Guardrail("latency p99 (ms)", p99[0], p99[1], f"each arm <= {limit:g}", None,
                             all(not np.isfinite(x) or x <= limit for x in p99)))
    for name, flag, key in (("error rate", "error", "error_rate_increase"), ("fallback rate", "fallback", "fallback_rate_increase")):
        if flag == "error" and not has_error:
            continue
        k = [int(x[flag].is_not_null().sum()) for x in (c, t)]
        n = [x.height for x in (c, t)]
        rates = [k[i] / n[i] if n[i] else float("nan") for i in range(2)]
        p = _rate_worse(k[0], n[0], k[1], n[1], float(g[key]))
        out.append(Guardrail(name, rates[0], rates[1], f"treatment <= control + {g[key]:g}", p, p >= alpha))
    if g.get("coverage_drop") is not None:
        cov = coverage_at_equal_size([x.filter(pl.col("items").list.len() > 0)["items"].to_list() for x in (c, t)])
        if catalog_size:
            cov = [v / catalog_size for v in cov]
        out.append(Guardrail("coverage (distinct items in equal numbers of replies" + (", share of catalog)" if catalog_size else ")"),
                             float(cov[0]), float(cov[1]), f"treatment >= control x {1 - g['coverage_drop']:g}", None,
                             cov[1] >= cov[0] * (1 - g["coverage_drop"])))
    return out


def coverage_at_equal_size(arms: list[list[list[str]]], draws: int = 20, seed: int = 0) -> list[float]:
    """Distinct items shown per arm in the same number of replies (the smallest arm's): each larger arm's replies
    subsampled ``draws`` times and averaged. An arm with a tenth of the traffic shows fewer distinct items by size
    alone; comparing raw counts across an unequal split would fail the smaller arm for nothing."""
    n = min((len(a) for a in arms), default=0)
    rng = np.random.default_rng(seed)
    out = []
    for replies in arms:
        if n == 0:
            out.append(0.0)
        elif len(replies) == n:
            out.append(float(len({i for r in replies for i in r})))
        else:
            out.append(float(np.mean([len({i for j in rng.choice(len(replies), n, replace=False) for i in replies[j]})
                                      for _ in range(draws)])))
    return out


def plan(d: ExperimentData, mde: float, metric: str = "clicks", alpha: float = 0.05, power: float = 0.8,
         shares: tuple[float, ...] = (0.5, 0.5), max_days: int | None = None) -> pl.DataFrame:
    """Before launch, from historical logs of the service (any arms, one policy is best): per day of a planned
    experiment, the users it would have by then (the logs' arrivals), the per-user mean and spread of ``metric``
    by then, and the users it needs to detect a relative change ``mde`` with ``power`` (fixed horizon, two-sided,
    users split by ``shares``; the smallest arm decides). The first day whose users reach the need is when to
    read it.

    Returns: day, users, mean, sd, needed, enough."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    smallest = min(shares) / sum(shares)
    rows = []
    for day, cut in enumerate(day_cuts(d, max_days), start=1):
        u = per_user(d, until=cut)
        v = u[metric].to_numpy().astype(float) if metric != "engagement_rate" else \
            (u["clicks"] / u["exposures"].clip(1)).to_numpy().astype(float)
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        diff = mde * mean
        # n_c = smallest share x N users, n_t likewise: var = sd^2 (1/n_c + 1/n_t); two arms of shares s, 1 - s
        other = 1 - smallest
        needed = int(np.ceil(z * z * sd * sd * (1 / smallest + 1 / other) / diff ** 2)) if diff > 0 and np.isfinite(sd) else None
        rows.append({"day": day, "users": u.height, "mean": mean, "sd": sd, "needed": needed,
                     "enough": needed is not None and u.height >= needed})
    return pl.DataFrame(rows)
