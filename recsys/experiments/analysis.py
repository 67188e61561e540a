"""Reading an experiment from what the service logged: the split check first, then metrics per arm and their
differences, variance reduction, segments, A/A calibration, power, interleaving and off-policy estimates.

The unit of analysis is the user (the unit of assignment). Differences, confidence intervals, the delta
method for ratio metrics and CUPED come from tea-tasting; the sample-ratio check is a chi-square test
(scipy); interleaving credit and the off-policy estimators (IPS, SNIPS, doubly robust) are written here,
as obp does not install on Python 3.11. The notebooks and ``recsys experiment report`` call these functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import special, stats

from recsys.experiments.logs import read_designs, read_dropped, read_logs
from recsys.experiments.policy import assign

SRM_ALPHA = 0.001  # the usual threshold: a split this unlikely is broken, whatever the metrics say


class SampleRatioMismatch(RuntimeError):
    """The arms' sizes do not match the configured shares: the metrics cannot be read."""


@dataclass
class ExperimentData:
    """One experiment's logs and, for a simulated one, the users' ground truth and the items' attributes."""

    folder: Path
    exposures: pl.DataFrame
    outcomes: pl.DataFrame
    users: pl.DataFrame | None = None  # simulation: user_id, arrival, future, pre_interactions, pre_items_30d
    items: pl.DataFrame | None = None  # simulation: item_id, pre_count, cold, popularity bucket, modalities
    meta: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # kind -> arm -> rows the writers dropped (full queue)

    @property
    def arms(self) -> list[str]:
        names = [a["name"] for a in self.meta.get("arms", [])]
        return names or sorted(self.exposures["arm"].unique().to_list())

    @property
    def shares(self) -> dict[str, float]:
        arms = self.meta.get("arms", [])
        return {a["name"]: a["share"] for a in arms} if arms else {a: 1 / len(self.arms) for a in self.arms}


def load(folder: str | Path) -> ExperimentData:
    """An experiment folder (``<workdir>/experiments/<name>``, holding ``logs/``) or a logs folder itself."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no experiment folder {folder}")
    logs = folder / "logs" if (folder / "logs").is_dir() else folder
    root = logs.parent if logs.name == "logs" else logs
    exposures = read_logs(logs, "exposures")
    if exposures.is_empty():
        raise FileNotFoundError(f"no exposure log under {logs} (expected exposures/date=*/part-*.parquet)")
    read = lambda name: pl.read_parquet(root / name) if (root / name).exists() else None  # noqa: E731
    meta = json.loads((root / "simulation.json").read_text()) if (root / "simulation.json").exists() else {}
    designs = read_designs(logs)
    if designs and not meta.get("arms"):  # a service's logs: the design it recorded (shares, salt, mode)
        last = designs[-1]
        meta = {**meta, "name": last["experiment"] or root.name, "mode": last["mode"], "salt": last["salt"],
                "temperature": last.get("temperature"), "arms": [{"name": a["name"], "share": a["share"]} for a in last["arms"]],
                "plan": last.get("plan")}
    meta["designs"] = designs
    # the outcomes of these replies only: one event log serves every experiment run on a work directory
    outcomes = read_logs(logs, "outcomes")
    outcomes = outcomes.filter(pl.col("request_id").is_in(exposures["request_id"].implode()))
    return ExperimentData(root, exposures, outcomes, read("users.parquet"), read("items.parquet"), meta, read_dropped(logs))


def dropped_warning(d: ExperimentData) -> str | None:
    """A loud warning when the writers dropped log rows (full queue), with the count per kind and arm: rows lost
    unevenly per arm bias every comparison."""
    if not any(d.dropped.values()):
        return None
    shown = "; ".join(f"{kind}: " + ", ".join(f"{arm} {n:,}" for arm, n in sorted(arms.items()))
                      for kind, arms in sorted(d.dropped.items()))
    return f"LOG ROWS WERE DROPPED (the log writer's queue was full): {shown}. The metrics miss those rows"


def design_changes(d: ExperimentData) -> list[str]:
    """Each time the recorded design changed while these logs were written, in words ([] when it never did)."""
    out, designs = [], d.meta.get("designs") or []
    for before, after in zip(designs, designs[1:]):
        if before["design_id"] == after["design_id"]:  # workers starting together may each record the same one
            continue
        what = [k for k in ("experiment", "mode", "salt", "arms", "explore", "temperature", "plan") if before.get(k) != after.get(k)]
        out.append(f"{after['since']}: {', '.join(what)} changed ({before['design_id']} -> {after['design_id']})")
    return out


# Per request and per user ---------------------------------------------------------------------------------
def per_request(d: ExperimentData, until=None) -> pl.DataFrame:
    """One row per reply: arm, time, items shown, engagements (outcomes quoting its request id, on shown
    items), hit (any engagement) and NDCG of the engaged positions. ``until`` (a datetime): only replies and
    outcomes up to that time (a look during the experiment)."""
    exposures, outcomes = d.exposures, d.outcomes
    if until is not None:
        exposures, outcomes = exposures.filter(pl.col("ts") <= until), outcomes.filter(pl.col("ts") <= until)
    if "error" in exposures.columns:  # a failed request showed nothing: the guardrails count it, the metrics do not
        exposures = exposures.filter(pl.col("error").is_null())
    shown = exposures.select("request_id", "user_id", "arm", "ts", "items").with_row_index("req")
    long = shown.select("req", "items").explode("items").with_columns(
        pl.int_range(pl.len()).over("req").alias("position")).rename({"items": "item_id"})
    long = long.with_columns((pl.col("position") + 1).alias("position"))
    clicked = outcomes.select("request_id", "item_id").unique().join(
        shown.select("req", "request_id"), on="request_id").join(long, on=["req", "item_id"])
    per = clicked.group_by("req").agg(
        pl.len().alias("clicks"),
        (1.0 / (pl.col("position") + 1).log(2)).sum().alias("dcg"))
    out = shown.join(per, on="req", how="left").with_columns(
        pl.col("clicks").fill_null(0), pl.col("dcg").fill_null(0.0), pl.col("items").list.len().alias("exposures"))
    ideal = pl.int_ranges(1, pl.col("clicks") + 1).list.eval(1.0 / (pl.element() + 1).log(2)).list.sum()
    return out.with_columns(
        (pl.col("clicks") > 0).cast(pl.Float64).alias("hit"),
        pl.when(pl.col("clicks") > 0).then(pl.col("dcg") / ideal).otherwise(0.0).alias("ndcg"),
    ).drop("req")


def per_user(d: ExperimentData, until=None) -> pl.DataFrame:
    """One row per user and arm: requests, exposures, clicks, hit (share of requests with a click), NDCG, and
    the pre-period covariates when the simulation recorded them (``until``: as of that time)."""
    r = per_request(d, until)
    u = r.group_by("user_id", "arm").agg(
        pl.len().alias("requests"), pl.col("exposures").sum(), pl.col("clicks").sum().cast(pl.Float64),
        pl.col("hit").mean(), pl.col("ndcg").mean(), pl.col("ts").min().alias("first_seen"))
    if d.users is not None:
        u = u.join(d.users.select("user_id", "pre_interactions", "pre_items_30d"), on="user_id", how="left")
        u = u.with_columns(pl.col("pre_interactions").fill_null(0).log1p().alias("pre_log_interactions"),
                           pl.col("pre_items_30d").fill_null(0).cast(pl.Float64))
    return u.sort("user_id")


# The split --------------------------------------------------------------------------------------------------
@dataclass
class SRMResult:
    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float

    @property
    def ok(self) -> bool:
        return self.p_value >= SRM_ALPHA

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "SAMPLE RATIO MISMATCH: do not read the metrics"
        return (f"SRM check: observed {self.observed}, expected {{{', '.join(f'{k}: {v:.1f}' for k, v in self.expected.items())}}}, "
                f"chi2 {self.chi2:.2f}, p {self.p_value:.3g} -> {verdict}")


def srm(users: pl.DataFrame, shares: dict[str, float]) -> SRMResult:
    """Chi-square goodness of fit of users per arm against the configured shares."""
    counts = dict(users.group_by("arm").len().iter_rows())
    observed = {a: int(counts.get(a, 0)) for a in shares}
    n = sum(observed.values())
    expected = {a: n * s / sum(shares.values()) for a, s in shares.items()}
    chi2, p = stats.chisquare(list(observed.values()), list(expected.values()))
    return SRMResult(observed, expected, float(chi2), float(p))


def check_split(users: pl.DataFrame, shares: dict[str, float]) -> SRMResult:
    """``srm``, raising SampleRatioMismatch when the split is broken (the notebooks stop there)."""
    result = srm(users, shares)
    if not result.ok:
        raise SampleRatioMismatch(str(result))
    return result


# Differences ------------------------------------------------------------------------------------------------
METRICS = ("clicks", "hit", "ndcg", "engagement_rate")


def compare(users: pl.DataFrame, control: str, treatment: str, covariate: str | None = None,
            alpha: float = 0.05) -> pl.DataFrame:
    """Treatment minus control per metric, with confidence intervals and p-values (tea-tasting).

    clicks, hit and ndcg are means over users (Welch); engagement_rate = clicks / exposures is a ratio of
    means (delta method). With ``covariate`` (a pre-period column) each gets a CUPED row too.
    Returns: metric, control, treatment, diff, diff_low, diff_high, rel, rel_low, rel_high, p_value.
    """
    import tea_tasting as tt

    data = users.filter(pl.col("arm").is_in([control, treatment]))
    level = 1 - alpha
    metrics = {"clicks": tt.Mean("clicks", confidence_level=level), "hit": tt.Mean("hit", confidence_level=level),
               "ndcg": tt.Mean("ndcg", confidence_level=level),
               "engagement_rate": tt.RatioOfMeans("clicks", "exposures", confidence_level=level)}
    if covariate:
        metrics |= {"clicks (CUPED)": tt.Mean("clicks", covariate, confidence_level=level),
                    "hit (CUPED)": tt.Mean("hit", covariate, confidence_level=level),
                    "engagement_rate (CUPED)": tt.RatioOfMeans("clicks", "exposures", covariate,
                                                               confidence_level=level)}
    frame = tt.Experiment(metrics, variant="arm").analyze(data, control=control).to_polars()
    return frame.select(
        "metric", "control", "treatment", pl.col("effect_size").alias("diff"),
        pl.col("effect_size_ci_lower").alias("diff_low"), pl.col("effect_size_ci_upper").alias("diff_high"),
        pl.col("rel_effect_size").alias("rel"), pl.col("rel_effect_size_ci_lower").alias("rel_low"),
        pl.col("rel_effect_size_ci_upper").alias("rel_high"), pl.col("pvalue").alias("p_value"))


def cuped_reduction(users: pl.DataFrame, metric: str, covariate: str) -> float:
    """Share of the metric's variance CUPED removes (theta = cov(Y, X) / var(X); 1 - var(Y - theta X) / var(Y)),
    with theta pooled over arms and the variance within arms."""
    parts = []
    for _, g in users.group_by("arm"):
        y, x = g[metric].to_numpy().astype(float), g[covariate].to_numpy().astype(float)
        parts.append((y - y.mean(), x - x.mean()))
    y = np.concatenate([p[0] for p in parts])
    x = np.concatenate([p[1] for p in parts])
    if x.var() == 0 or y.var() == 0:
        return 0.0
    theta = (x * y).mean() / (x * x).mean()
    return float(1 - (y - theta * x).var() / y.var())


# Catalog-side metrics and segments ----------------------------------------------------------------------------
def exposure_items(d: ExperimentData) -> pl.DataFrame:
    """One row per shown item: arm, user, position, clicked, and the item's attributes when known."""
    long = d.exposures.select("request_id", "user_id", "arm", "items").explode("items").rename({"items": "item_id"})
    long = long.with_columns((pl.int_range(pl.len()).over("request_id") + 1).alias("position"))
    clicked = d.outcomes.select("request_id", "item_id").unique().with_columns(pl.lit(1.0).alias("clicked"))
    long = long.join(clicked, on=["request_id", "item_id"], how="left").with_columns(pl.col("clicked").fill_null(0.0))
    if d.items is not None:
        long = long.join(d.items, on="item_id", how="left")
    return long


def catalog_metrics(d: ExperimentData) -> pl.DataFrame:
    """Per arm: distinct items shown, coverage of the catalog, and popularity bias (the mean popularity
    percentile of shown items: 0.5 is neutral, near 1 means the arm shows mostly the head)."""
    long = exposure_items(d)
    n_catalog = d.items.height if d.items is not None else None
    aggs = [pl.col("item_id").n_unique().alias("distinct_items"), pl.len().alias("exposures")]
    if "pop_percentile" in long.columns:
        aggs.append(pl.col("pop_percentile").mean().alias("popularity_bias"))
    out = long.group_by("arm").agg(aggs).sort("arm")
    if n_catalog:
        out = out.with_columns((pl.col("distinct_items") / n_catalog).alias("coverage"))
    return out


def segment_rates(d: ExperimentData, by: str, control: str, treatment: str) -> pl.DataFrame:
    """Engagement rate (clicks / exposures) of shown items per segment and arm, and treatment minus control
    with a delta-method interval over users (tea-tasting RatioOfMeans on per-user sums).

    ``by``: an item column (cold, modality, popularity bucket) or ``history`` (users by pre-period length)."""
    long = exposure_items(d)
    if by == "history":
        if d.users is None:
            raise ValueError("segments by history need the simulation's users.parquet")
        n = pl.col("pre_interactions").fill_null(0)
        long = long.join(d.users.select("user_id", "pre_interactions"), on="user_id", how="left").with_columns(
            pl.when(n < 20).then(pl.lit("<20")).when(n < 50).then(pl.lit("20-49")).when(n < 200).then(pl.lit("50-199"))
            .otherwise(pl.lit("200+")).alias("history"))
    if by not in long.columns:
        raise ValueError(f"no segment column {by!r} (have {long.columns})")
    rows = []
    for seg in sorted(long[by].drop_nulls().unique().to_list(), key=str):
        g = long.filter(pl.col(by) == seg).group_by("user_id", "arm").agg(
            pl.col("clicked").sum().alias("clicks"), pl.len().cast(pl.Float64).alias("exposures"))
        arms = set(g["arm"].unique().to_list())
        if not {control, treatment} <= arms:
            continue
        c = compare_ratio(g, control, treatment)
        rows.append({"segment": by, "value": str(seg), **c})
    return pl.DataFrame(rows)


def compare_ratio(g: pl.DataFrame, control: str, treatment: str, alpha: float = 0.05) -> dict:
    import tea_tasting as tt

    exp = tt.Experiment({"rate": tt.RatioOfMeans("clicks", "exposures", confidence_level=1 - alpha)}, variant="arm")
    data = g.filter(pl.col("arm").is_in([control, treatment]))
    r = exp.analyze(data, control=control).to_polars().row(0, named=True)
    n = dict(data.group_by("arm").len().iter_rows())
    return {"users_control": n.get(control, 0), "users_treatment": n.get(treatment, 0), "control": r["control"],
            "treatment": r["treatment"], "diff": r["effect_size"], "diff_low": r["effect_size_ci_lower"],
            "diff_high": r["effect_size_ci_upper"], "p_value": r["pvalue"]}


def cumulative(d: ExperimentData, metric: str = "clicks") -> pl.DataFrame:
    """Per arm, the running mean of a per-request metric in arrival order (what a dashboard shows daily)."""
    r = per_request(d).sort("ts")
    return r.with_columns(
        (pl.col(metric).cum_sum().over("arm") / pl.int_range(1, pl.len() + 1).over("arm")).alias(f"cumulative_{metric}"),
        pl.int_range(1, pl.len() + 1).over("arm").alias("requests_so_far")).select("ts", "arm", f"cumulative_{metric}", "requests_so_far")


# Calibration and power ----------------------------------------------------------------------------------------
def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's t-test p-value (two-sided; scipy's ttest_ind(equal_var=False) computed directly: it is called
    thousands of times in re-salted calibrations); 1.0 where it is undefined (fewer than 2 users, or no variance
    at all: small subsamples of a rare event are often all zeros)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return 1.0
    va, vb = np.var(a, ddof=1) / na, np.var(b, ddof=1) / nb
    if va + vb == 0:
        return 1.0
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    return float(2 * special.stdtr(df, -abs(t)))


def aa_false_positive_rate(users: pl.DataFrame, metric: str = "clicks", splits: int = 200, alpha: float = 0.05,
                           experiment: str = "aa") -> dict:
    """Re-randomize the users of a single-policy run into two halves with ``splits`` different salts (exactly
    what an A/A test with that salt would have done) and count how often the difference is 'significant'.

    Returns: {splits, alpha, false_positives, rate, ci: Wilson 95% interval of the rate}."""
    values = dict(zip(users["user_id"].to_list(), users[metric].to_numpy().astype(float)))
    ids = list(values)
    hits = 0
    for s in range(splits):
        arm = np.array([assign(u, experiment, f"aa-{s}", [("a", 0.5), ("b", 0.5)]) == "a" for u in ids])
        y = np.array([values[u] for u in ids])
        hits += welch_p(y[arm], y[~arm]) < alpha
    lo, hi = wilson(hits, splits)
    return {"splits": splits, "alpha": alpha, "false_positives": int(hits), "rate": hits / splits, "ci": (lo, hi)}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, c - h)), float(min(1.0, c + h)))


def _variance_and_z(users: pl.DataFrame, metric: str, alpha: float, power: float) -> tuple[list[np.ndarray], float, float]:
    """Per-arm values, their mean within-arm variance, and z_(1-alpha/2) + z_power."""
    groups = [g[metric].to_numpy().astype(float) for _, g in users.group_by("arm", maintain_order=True)]
    var = float(np.mean([g.var(ddof=1) for g in groups if len(g) > 1]))
    return groups, var, float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))


def minimum_detectable_effect(users: pl.DataFrame, metric: str = "clicks", alpha: float = 0.05,
                              power: float = 0.8) -> dict:
    """The smallest absolute difference this experiment's size and variance detect with ``power``, and the
    users per arm a difference of 5% of the control mean would need."""
    groups, var, z = _variance_and_z(users, metric, alpha, power)
    n = [len(g) for g in groups]
    mean = float(np.mean(np.concatenate(groups)))
    mde = z * np.sqrt(var * sum(1 / max(k, 1) for k in n))
    return {"metric": metric, "users_per_arm": n, "sd": var ** 0.5, "mean": mean, "mde_abs": float(mde),
            "mde_rel": float(mde / mean) if mean else None,
            "users_per_arm_for_5pct": users_for_difference(users, 0.05 * mean, metric, alpha, power)}


def users_for_difference(users: pl.DataFrame, diff: float, metric: str = "clicks", alpha: float = 0.05,
                         power: float = 0.8) -> int | None:
    """Users per arm an A/B test needs to detect ``diff`` (absolute) on ``metric`` with ``power``, for the
    variance observed here (two-sided normal approximation: n = 2 s^2 (z_a/2 + z_b)^2 / diff^2)."""
    if diff == 0:
        return None
    _, var, z = _variance_and_z(users, metric, alpha, power)
    return int(np.ceil(2 * var * z * z / diff ** 2))


# Interleaving -------------------------------------------------------------------------------------------------
def interleaving_credit(d: ExperimentData, control: str | None = None, treatment: str | None = None) -> pl.DataFrame:
    """Per user: clicks credited to each team (the arm that contributed the clicked item) and the preference
    (+1 ``treatment`` wins, -1 ``control`` wins, 0 tie or no click). The arms are the run's (its recorded design,
    else the teams in its logs; default control and treatment: the first two), named, never taken by position
    from another run."""
    teams = sorted(set(d.exposures["teams"].explode().drop_nulls().to_list())) if "teams" in d.exposures.columns else []
    arms = [a for a in d.arms if a != "interleaved"] or teams
    if len(arms) < 2:
        raise ValueError(f"these logs credit {len(arms)} team(s) {arms}: not an interleaved run of two arms")
    control, treatment = control or arms[0], treatment or arms[1]
    missing = [a for a in (control, treatment) if a not in arms]
    if missing:
        raise ValueError(f"the interleaved run's arms are {arms}; it has no {missing} (name the same arms in both runs)")
    long = d.exposures.select("request_id", "user_id", "items", "teams").explode("items", "teams").rename(
        {"items": "item_id", "teams": "team"})
    clicked = d.outcomes.select("request_id", "item_id").unique()
    credit = long.join(clicked, on=["request_id", "item_id"]).group_by("user_id", "team").len()
    wide = credit.pivot(on="team", index="user_id", values="len").fill_null(0) if credit.height else \
        pl.DataFrame({"user_id": []}, schema={"user_id": pl.Utf8})
    for a in (control, treatment):
        if a not in wide.columns:
            wide = wide.with_columns(pl.lit(0, pl.UInt32).alias(a))
    users = d.exposures.select("user_id").unique()
    wide = users.join(wide, on="user_id", how="left").fill_null(0)
    a, b = control, treatment
    return wide.with_columns(pl.when(pl.col(b) > pl.col(a)).then(1).when(pl.col(b) < pl.col(a)).then(-1)
                             .otherwise(0).alias("preference")).sort("user_id")


def interleaving_test(credit: pl.DataFrame) -> dict:
    """Sign test over users with a preference; delta = (wins_b + ties/2) / users - 1/2 (Chapelle et al. 2012)."""
    pref = credit["preference"].to_numpy()
    wins_b, wins_a, ties = int((pref > 0).sum()), int((pref < 0).sum()), int((pref == 0).sum())
    n = wins_a + wins_b
    p = float(stats.binomtest(wins_b, n, 0.5).pvalue) if n else 1.0
    delta = (wins_b + ties / 2) / len(pref) - 0.5 if len(pref) else 0.0
    return {"users": len(pref), "wins_treatment": wins_b, "wins_control": wins_a, "ties": ties, "delta": delta,
            "p_value": p}


def users_needed(ab_users: pl.DataFrame, il_credit: pl.DataFrame, control: str, treatment: str,
                 sizes: list[int], reps: int = 200, alpha: float = 0.05, seed: int = 0) -> pl.DataFrame:
    """Power curve by subsampling: for n users in total, how often each method finds the difference at
    ``alpha``. A/B: n/2 users drawn from each arm, Welch on clicks per user; interleaving: n users drawn
    from the interleaved run, sign test on preferences. Draws are with replacement (a bootstrap of the
    population the simulation saw)."""
    rng = np.random.default_rng(seed)
    a = ab_users.filter(pl.col("arm") == control)["clicks"].to_numpy().astype(float)
    b = ab_users.filter(pl.col("arm") == treatment)["clicks"].to_numpy().astype(float)
    pref = il_credit["preference"].to_numpy()
    ab_sign = np.sign(b.mean() - a.mean())
    il_sign = np.sign(pref.mean())
    rows = []
    for n in sizes:
        ab_hits = il_hits = 0
        for _ in range(reps):
            xa, xb = rng.choice(a, n // 2), rng.choice(b, n // 2)
            ab_hits += welch_p(xa, xb) < alpha and np.sign(xb.mean() - xa.mean()) == ab_sign
            s = rng.choice(pref, n)
            wb, wa = int((s > 0).sum()), int((s < 0).sum())
            p = stats.binomtest(wb, wa + wb, 0.5).pvalue if wa + wb else 1.0
            il_hits += p < alpha and np.sign(wb - wa) == il_sign
        rows.append({"users": n, "ab_power": ab_hits / reps, "interleaving_power": il_hits / reps})
    return pl.DataFrame(rows)


def first_reaching(curve: pl.DataFrame, column: str, power: float = 0.8) -> int | None:
    hit = curve.filter(pl.col(column) >= power)
    return int(hit["users"].min()) if hit.height else None
