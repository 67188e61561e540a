"""``recsys experiment report``: the notebooks' tables and figures as one markdown file with PNGs, for people
who do not open notebooks. Every number comes from ``recsys.experiments.analysis``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from recsys.experiments import analysis as A
from recsys.experiments import decision as D
from recsys.experiments import off_policy as OP
from recsys.experiments import sequential as S


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
    """report.md, summary.json and the PNGs in ``out``; returns the markdown's path. Interleaved logs alone get
    the interleaving report; an A/B run gets the split check first (nothing else when it fails), then the
    pre-registered decision, the sequential looks, the guardrails, the secondary metrics and segments corrected
    for multiple testing, calibration and power, and the optional interleaving and off-policy sections."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if d.meta.get("mode") == "interleave":
        return _interleaving_only(d, out)
    control, treatment = _arms(d, control)
    users = A.per_user(d)
    r = Report(out, [f"# Experiment report: {d.meta.get('name', d.folder.name)}", "",
                     f"Logs: `{d.folder}`; {d.exposures.height:,} exposures (replies), {d.outcomes.height:,} outcomes, "
                     f"{users['user_id'].n_unique():,} users; arms {d.arms} (control {control!r}) at shares "
                     f"{d.shares}{' (recorded with the logs)' if d.meta.get('designs') else ''}.", ""], {})
    warned = A.dropped_warning(d)
    if warned:
        r.lines += [f"**Warning: {warned}.**", ""]
        r.summary["dropped"] = d.dropped
    for change in A.design_changes(d):
        r.lines += [f"**Warning: the design changed mid-run** ({change}). The split check and the metrics mix "
                    "periods served under different designs: read each period on its own.", ""]
    split = A.srm(users, d.shares)
    r.lines += ["## 1. Split check (sample-ratio mismatch)", "", str(split), ""]
    r.summary["srm_p"] = split.p_value
    if not split.ok:
        r.lines += ["**The split is broken: the metrics below are not reported.** Find why users went missing "
                    "from an arm (bot filtering, crashes, redirects) before reading anything.", ""]
        return r.write()
    _decision(r, d, users, control, treatment)
    _calibration(r, d, users, control)
    if interleaved is not None:
        _interleaving(r, users, interleaved, control, treatment)
    if explored is not None:
        _off_policy(r, explored, truth)
    return r.write()


class Report:
    """The markdown lines and summary a report accumulates, written once at the end."""

    def __init__(self, out: Path, lines: list[str], summary: dict):
        self.out, self.lines, self.summary = out, lines, summary

    def write(self) -> Path:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        (self.out / "report.md").write_text("\n".join(self.lines))
        return self.out / "report.md"


def _arms(d: A.ExperimentData, control: str | None) -> tuple[str, str]:
    arms = d.arms
    control = control or arms[0]
    if control not in arms:
        raise ValueError(f"control arm {control!r} is not one of {arms}")
    others = [a for a in arms if a != control]
    if not others:
        raise ValueError(f"these logs hold one arm ({control!r}: the service ran without an [experiment]), so there "
                         "is nothing to compare; configure an [experiment] with two or more arms and serve with it")
    return control, others[0]


def _decision(r: Report, d: A.ExperimentData, users: pl.DataFrame, control: str, treatment: str) -> None:
    """The pre-registered plan: the primary metric alone at alpha, its sequential looks, the guardrails, then
    the secondary metrics and the segments with Benjamini-Hochberg q-values."""
    plan = D.plan_of(d)
    primary, alpha = plan["primary_metric"], plan["alpha"]
    covariate = "pre_log_interactions" if "pre_log_interactions" in users.columns else None
    per_arm = users.group_by("arm").agg(pl.len().alias("users"), pl.col("requests").sum(), pl.col("exposures").sum(),
                                        pl.col("clicks").mean().alias("clicks_per_user"), pl.col("hit").mean(),
                                        pl.col("ndcg").mean(), (pl.col("clicks").sum() / pl.col("exposures").sum())
                                        .alias("engagement_rate")).sort("arm")
    r.lines += ["## 2. Per arm", "", _md(per_arm.join(A.catalog_metrics(d).drop("exposures"), on="arm", how="left")), ""]
    overall, segs = deltas_table(d, users, control, treatment, covariate)
    first = overall.filter(pl.col("metric") == primary)
    row = first.row(0, named=True)
    verdict = "significant" if row["p_value"] < alpha else "not significant"
    r.lines += [f"## 3. The pre-registered decision: {primary}", "",
                f"Plan recorded with the design: primary metric **{primary}**, alpha {alpha}, power {plan['power']}, "
                f"MDE {plan['mde']:.1%} of control's mean; secondary {plan['secondary_metrics']}.", "",
                f"Fixed horizon (Welch over users, read once at the end): {treatment} minus {control} = "
                f"{row['diff']:+.4f} [{row['diff_low']:+.4f}, {row['diff_high']:+.4f}], p {row['p_value']:.3g}: {verdict}.", ""]
    control_mean = float(users.filter(pl.col("arm") == control)[primary].mean() or 0.0) if primary != "engagement_rate" else \
        float(row["control"])
    tau = max(plan["mde"] * abs(control_mean), 1e-9)
    seq = S.sequential_test(d, control, treatment, primary, tau, alpha, planned=plan["days"]) \
        if primary != "engagement_rate" else []
    if seq:
        decided, gs, peeked = S.first_decision(seq, alpha), S.first_gs(seq), S.first_naive(seq, alpha)
        r.lines += [f"Daily looks, safe to read every day (planned {plan['days']} days, the logs cover {len(seq)}):", "",
                    "- group-sequential (O'Brien-Fleming-type alpha spending over the planned looks; reject when |z| >= "
                    "the look's boundary): " + (f"**a decision was allowed from day {gs}**" if gs else "no decision allowed"),
                    f"- mSPRT (always valid for any number of looks; normal mixture, tau = the MDE = {tau:.4g}): "
                    + (f"a decision was allowed from day {decided}" if decided else "no decision allowed"),
                    "- for contrast, a fixed-horizon test read every day (not valid: peeking) would have stopped on "
                    + (f"day {peeked}" if peeked else "no day"), "", _md(S.looks_frame(seq)), ""]
        r.summary["sequential"] = {"methods": ["group-sequential (O'Brien-Fleming spending)", "mSPRT (normal mixture)"],
                                   "tau": tau, "planned_days": plan["days"], "decision_day": gs,
                                   "msprt_decision_day": decided, "naive_day": peeked,
                                   "looks": S.looks_frame(seq).to_dicts()}
    rails = D.guardrails(d, control, treatment)
    if rails:
        failed = [g.name for g in rails if not g.ok]
        r.lines += ["## 4. Guardrails", "", _md(pl.DataFrame([g.row() for g in rails])), "",
                    f"**Guardrails failed: {failed}.**" if failed else "All guardrails hold.", ""]
        r.summary["guardrails"] = [g.row() for g in rails]
    rest = D.with_q_values(overall.filter(pl.col("metric") != primary))
    r.lines += [f"## 5. Secondary metrics: {treatment} minus {control}", "",
                "Means over users (Welch); engagement_rate = clicks / exposures, a ratio of per-user sums (delta "
                "method, clustered by user); CUPED rows adjust by the users' pre-period activity. q_value: "
                "Benjamini-Hochberg over these rows (read those, not p_value, against alpha).", "",
                _md(rest.drop("label")), ""]
    if covariate:
        red = {m: A.cuped_reduction(users, m, covariate) for m in ("clicks", "hit")}
        r.lines += ["CUPED variance reduction: " + ", ".join(f"{m} {v:.1%}" for m, v in red.items()), ""]
    forest = pl.concat([overall.select("label", "diff", "diff_low", "diff_high", "p_value"),
                        segs.select("label", "diff", "diff_low", "diff_high", "p_value")] if segs.height else
                       [overall.select("label", "diff", "diff_low", "diff_high", "p_value")])
    plot_deltas(forest, r.out / "deltas.png", f"{treatment} - {control}")
    r.lines += ["![deltas by metric and segment](deltas.png)", ""]
    if segs.height:
        r.lines += ["## 6. Segments (engagement rate of shown items)", "",
                    "Exploratory: an item segment depends on what each arm showed, so these are not causal effects; "
                    "q_value corrects for the number of segments.", "", _md(D.with_q_values(segs).drop("label")), ""]
    r.summary["overall"] = overall.drop("label").to_dicts()
    r.summary["primary"] = {"metric": primary, **{k: row[k] for k in ("diff", "diff_low", "diff_high", "p_value")}}


def _calibration(r: Report, d: A.ExperimentData, users: pl.DataFrame, control: str) -> None:
    plot_cumulative(A.cumulative(d), r.out / "cumulative.png")
    r.lines += ["## 7. Over time", "", "![cumulative clicks per reply](cumulative.png)", ""]
    aa = A.aa_false_positive_rate(users.filter(pl.col("arm") == control), splits=200)
    mde = A.minimum_detectable_effect(users)
    r.lines += ["## 8. Calibration and power", "",
                f"A/A: the {control!r} arm's users re-split {aa['splits']} times with different salts: "
                f"{aa['false_positives']} 'significant' at alpha {aa['alpha']} -> false-positive rate {aa['rate']:.3f} "
                f"(95% CI {aa['ci'][0]:.3f}-{aa['ci'][1]:.3f}; expected {aa['alpha']}).", "",
                f"Minimum detectable effect on clicks per user (alpha 0.05, power 0.8) with {mde['users_per_arm']} users "
                f"per arm: {mde['mde_abs']:.4f} ({(mde['mde_rel'] or 0):.1%} of the mean {mde['mean']:.4f}); "
                f"a 5% change would need {mde['users_per_arm_for_5pct']} users per arm (for planning use "
                "`recsys experiment plan` on logs from before the launch).", ""]
    r.summary |= {"aa": aa, "mde": mde}


def _interleaving(r: Report, users: pl.DataFrame, interleaved: A.ExperimentData, control: str, treatment: str) -> None:
    credit = A.interleaving_credit(interleaved, control, treatment)
    il = A.interleaving_test(credit)
    sizes = sorted({s for s in (10, 20, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800) if s <= 16 * max(users.height, 50)})
    curve = A.users_needed(users, credit, control, treatment, sizes)
    plot_power(curve, r.out / "power.png")
    ab_n, il_n = A.first_reaching(curve, "ab_power"), A.first_reaching(curve, "interleaving_power")
    r.lines += ["## 9. Interleaving", "",
                f"Team-draft interleaving of the same arms: {il['users']} users, {il['wins_treatment']} prefer "
                f"{treatment}, {il['wins_control']} prefer {control}, {il['ties']} no preference; delta {il['delta']:+.4f}, "
                f"sign test p {il['p_value']:.3g}.", "", _md(curve), "",
                f"Users for 80% power: A/B {ab_n or '> ' + str(sizes[-1])}, interleaving {il_n or '> ' + str(sizes[-1])}.", "",
                "![power by users](power.png)", ""]
    r.summary["interleaving"] = {**il, "users_80_ab": ab_n, "users_80_interleaving": il_n, "curve": curve.to_dicts()}


def _interleaving_only(d: A.ExperimentData, out: Path) -> Path:
    """The report of an interleaved run alone: credit per user, the sign test, in the run's own arm names."""
    arms = [a for a in d.arms if a != "interleaved"]
    credit = A.interleaving_credit(d)
    control, treatment = arms[0] if arms else None, arms[1] if len(arms) > 1 else None
    il = A.interleaving_test(credit)
    r = Report(out, [f"# Interleaving report: {d.meta.get('name', d.folder.name)}", "",
                     f"Logs: `{d.folder}`; {d.exposures.height:,} interleaved replies, {d.outcomes.height:,} outcomes, "
                     f"{credit.height:,} users; team-draft of {control!r} and {treatment!r}.", ""], {"interleaving": il})
    warned = A.dropped_warning(d)
    if warned:
        r.lines += [f"**Warning: {warned}.**", ""]
    r.lines += ["## Preference per user", "",
                f"{il['wins_treatment']} users prefer {treatment}, {il['wins_control']} prefer {control}, {il['ties']} "
                f"show no preference; delta {il['delta']:+.4f}, sign test p {il['p_value']:.3g}.", ""]
    return r.write()


def _off_policy(r: Report, explored: A.ExperimentData, truth: A.ExperimentData | None) -> None:
    terms = OP.ope_terms(explored, target_temperature=None)
    est = OP.ope_estimates(terms)
    rows = [{"estimator": e.estimator, "value": e.value, "low": e.low, "high": e.high} for e in est]
    if truth is not None:
        v, lo, hi = OP.policy_value(truth)
        rows.append({"estimator": "ground truth (simulated)", "value": v, "low": lo, "high": hi})
    r.lines += ["## 10. Off-policy estimate of the greedy policy", "",
                f"From {terms.height} explored replies (softmax, temperature {explored.meta.get('temperature')}): "
                "engaged items per reply if the arm showed its top-k greedily (intervals resample users).", "",
                _md(pl.DataFrame(rows)), ""]
    r.summary["off_policy"] = rows
