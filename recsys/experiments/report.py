"""``recsys experiment report``: the notebooks' tables and figures as one markdown file with PNGs, for people
who do not open notebooks. Every number comes from ``recsys.experiments.analysis``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from recsys.experiments import analysis as A


def _md(frame: pl.DataFrame, digits: int = 4) -> str:
    """A polars frame as a markdown table."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
        return str(v)

    head = "| " + " | ".join(frame.columns) + " |"
    sep = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([head, sep, *rows])


def _pyplot():
    """matplotlib's pyplot on the file-only backend (reports are written, not shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_deltas(rows: pl.DataFrame, path: Path, title: str) -> Path:
    """Treatment minus control with its interval, one line per metric or segment (a forest plot)."""
    plt = _pyplot()
    labels = rows["label"].to_list()
    d, lo, hi = (rows[c].to_numpy() for c in ("diff", "diff_low", "diff_high"))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    y = range(len(labels))[::-1]
    colors = ["tab:red" if p < 0.05 else "tab:gray" for p in rows["p_value"].to_list()]
    for yi, di, l, h, c in zip(y, d, lo, hi, colors):
        ax.errorbar([di], [yi], xerr=[[di - l], [h - di]], fmt="o", color=c, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("treatment - control (95% CI; red: p < 0.05)")
    ax.set_title(title)
    return _save(fig, path)


def plot_cumulative(cum: pl.DataFrame, path: Path, metric: str = "clicks") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (arm,), g in cum.group_by("arm", maintain_order=True):
        ax.plot(g["ts"].to_list(), g[f"cumulative_{metric}"].to_list(), label=str(arm))
    ax.set_ylabel(f"cumulative mean {metric} per reply")
    ax.set_xlabel("arrival time")
    ax.legend()
    ax.set_title("Metric over time per arm")
    fig.autofmt_xdate()
    return _save(fig, path)


def plot_power(curve: pl.DataFrame, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve["users"], curve["ab_power"], "o-", label="A/B test (Welch, clicks per user)")
    ax.plot(curve["users"], curve["interleaving_power"], "s-", label="team-draft interleaving (sign test)")
    ax.axhline(0.8, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("users in the experiment")
    ax.set_ylabel("power (share of subsamples significant, right sign)")
    ax.legend()
    return _save(fig, path)


def deltas_table(d: A.ExperimentData, users: pl.DataFrame, control: str, treatment: str,
                 covariate: str | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(overall differences, segment differences) with one ``label`` column for the forest plot."""
    overall = A.compare(users, control, treatment, covariate).with_columns(pl.col("metric").alias("label"))
    segs = []
    for by in [c for c in ("cold", "popularity", "modality") if d.items is not None and c in d.items.columns] + \
            (["history"] if d.users is not None else []):
        s = A.segment_rates(d, by, control, treatment)
        if s.height:
            segs.append(s.with_columns((pl.lit("rate | ") + pl.col("segment") + "=" + pl.col("value")).alias("label")))
    return overall, pl.concat(segs, how="diagonal_relaxed") if segs else pl.DataFrame()


def write_report(d: A.ExperimentData, out: Path, control: str | None = None,
                 interleaved: A.ExperimentData | None = None, explored: A.ExperimentData | None = None,
                 truth: A.ExperimentData | None = None) -> Path:
    """report.md and its PNGs in ``out``; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arms = d.arms
    control = control or arms[0]
    if control not in arms:
        raise ValueError(f"control arm {control!r} is not one of {arms}")
    others = [a for a in arms if a != control]
    if not others:
        raise ValueError(f"these logs hold one arm ({control!r}: the service ran without an [experiment]), so there "
                         "is nothing to compare; configure an [experiment] with two or more arms and serve with it")
    treatment = others[0]
    if d.meta.get("mode") == "interleave":
        raise ValueError(f"these logs are an interleaved run of {arms}: pass them as --interleaving beside an A/B run")
    users = A.per_user(d)
    lines = [f"# Experiment report: {d.meta.get('name', d.folder.name)}", "",
             f"Logs: `{d.folder}`; {d.exposures.height:,} exposures (replies), {d.outcomes.height:,} outcomes, "
             f"{users['user_id'].n_unique():,} users; arms {arms} (control {control!r}) at shares "
             f"{d.shares}{' (recorded with the logs)' if d.meta.get('designs') else ''}.", ""]
    for change in A.design_changes(d):
        lines += [f"**Warning: the design changed mid-run** ({change}). The split check and the metrics mix "
                  "periods served under different designs: read each period on its own.", ""]
    split = A.srm(users, d.shares)
    lines += ["## 1. Split check (sample-ratio mismatch)", "", str(split), ""]
    if not split.ok:
        lines += ["**The split is broken: the metrics below are not reported.** Find why users went missing "
                  "from an arm (bot filtering, crashes, redirects) before reading anything.", ""]
        (out / "report.md").write_text("\n".join(lines))
        return out / "report.md"
    covariate = "pre_log_interactions" if "pre_log_interactions" in users.columns else None
    per_arm = users.group_by("arm").agg(pl.len().alias("users"), pl.col("requests").sum(), pl.col("exposures").sum(),
                                        pl.col("clicks").mean().alias("clicks_per_user"), pl.col("hit").mean(),
                                        pl.col("ndcg").mean(), (pl.col("clicks").sum() / pl.col("exposures").sum())
                                        .alias("engagement_rate")).sort("arm")
    lines += ["## 2. Per arm", "", _md(per_arm.join(A.catalog_metrics(d).drop("exposures"), on="arm", how="left")), ""]
    overall, segs = deltas_table(d, users, control, treatment, covariate)
    lines += [f"## 3. {treatment} minus {control}", "",
              "Means over users (Welch); engagement_rate = clicks / exposures, a ratio metric (delta method); "
              "CUPED rows adjust by the users' pre-period activity (log interactions before their held-out period).", "",
              _md(overall.drop("label")), ""]
    if covariate:
        red = {m: A.cuped_reduction(users, m, covariate) for m in ("clicks", "hit")}
        lines += ["CUPED variance reduction: " + ", ".join(f"{m} {v:.1%}" for m, v in red.items()), ""]
    forest = pl.concat([overall.select("label", "diff", "diff_low", "diff_high", "p_value"),
                        segs.select("label", "diff", "diff_low", "diff_high", "p_value")] if segs.height else
                       [overall.select("label", "diff", "diff_low", "diff_high", "p_value")])
    plot_deltas(forest, out / "deltas.png", f"{treatment} - {control}")
    lines += ["![deltas by metric and segment](deltas.png)", ""]
    if segs.height:
        lines += ["## 4. Segments (engagement rate of shown items)", "", _md(segs.drop("label")), ""]
    plot_cumulative(A.cumulative(d), out / "cumulative.png")
    lines += ["## 5. Over time", "", "![cumulative clicks per reply](cumulative.png)", ""]
    aa = A.aa_false_positive_rate(users.filter(pl.col("arm") == control), splits=200)
    mde = A.minimum_detectable_effect(users)
    lines += ["## 6. Calibration and power", "",
              f"A/A: the {control!r} arm's users re-split {aa['splits']} times with different salts: "
              f"{aa['false_positives']} 'significant' at alpha {aa['alpha']} -> false-positive rate {aa['rate']:.3f} "
              f"(95% CI {aa['ci'][0]:.3f}-{aa['ci'][1]:.3f}; expected {aa['alpha']}).", "",
              f"Minimum detectable effect on clicks per user (alpha 0.05, power 0.8) with {mde['users_per_arm']} users "
              f"per arm: {mde['mde_abs']:.4f} ({(mde['mde_rel'] or 0):.1%} of the mean {mde['mean']:.4f}); "
              f"a 5% change would need {mde['users_per_arm_for_5pct']} users per arm.", ""]
    summary = {"srm_p": split.p_value, "overall": overall.drop("label").to_dicts(), "aa": aa, "mde": mde}
    if interleaved is not None:
        credit = A.interleaving_credit(interleaved)
        il = A.interleaving_test(credit)
        n_total = users.height
        sizes = sorted({s for s in (10, 20, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800) if s <= 16 * max(n_total, 50)})
        curve = A.users_needed(users, credit, control, treatment, sizes)
        plot_power(curve, out / "power.png")
        ab_n, il_n = A.first_reaching(curve, "ab_power"), A.first_reaching(curve, "interleaving_power")
        lines += ["## 7. Interleaving", "",
                  f"Team-draft interleaving of the same arms: {il['users']} users, {il['wins_treatment']} prefer "
                  f"{treatment}, {il['wins_control']} prefer {control}, {il['ties']} no preference; delta {il['delta']:+.4f}, "
                  f"sign test p {il['p_value']:.3g}.", "", _md(curve), "",
                  f"Users for 80% power: A/B {ab_n or '> ' + str(sizes[-1])}, interleaving {il_n or '> ' + str(sizes[-1])}.", "",
                  "![power by users](power.png)", ""]
        summary["interleaving"] = {**il, "users_80_ab": ab_n, "users_80_interleaving": il_n, "curve": curve.to_dicts()}
    if explored is not None:
        terms = A.ope_terms(explored, target_temperature=None)
        est = A.ope_estimates(terms)
        rows = [{"estimator": e.estimator, "value": e.value, "low": e.low, "high": e.high} for e in est]
        if truth is not None:
            v, lo, hi = A.policy_value(truth)
            rows.append({"estimator": "ground truth (simulated)", "value": v, "low": lo, "high": hi})
        lines += ["## 8. Off-policy estimate of the greedy policy", "",
                  f"From {terms.height} explored replies (softmax, temperature {explored.meta.get('temperature')}): "
                  "engaged items per reply if the arm showed its top-k greedily.", "", _md(pl.DataFrame(rows)), ""]
        summary["off_policy"] = rows
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
