"""The experiment library on logs whose truth is known: assignment, team draft, the log writer, the split
check, differences (a planted effect found with the right sign, none found in an A/A), and the off-policy
estimators against values computed by hand on a tiny log."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.experiments import analysis as A
from recsys.experiments import off_policy as OP
from recsys.experiments.logs import EXPOSURE_SCHEMA, OUTCOME_SCHEMA, LogWriter, read_logs
from recsys.experiments.policy import assign, inclusion_probs, request_rng, softmax_sample, team_draft

T0 = datetime(2018, 1, 1, tzinfo=timezone.utc)


def exposure(request_id, user, arm, items, ts=T0, **kw) -> dict:
    row = {"request_id": request_id, "ts": ts, "user_id": user, "experiment": "e", "arm": arm, "mode": "ab",
           "model": "v1", "known_user": True, "fallback": None, "items": items, "scores": [1.0] * len(items),
           "propensities": [1.0] * len(items), "teams": [arm] * len(items), "pool_items": None, "pool_scores": None,
           "temperature": None}
    row.update(kw)
    return row


def data(exposures: list[dict], outcomes: list[tuple[str, str]], arms=("a", "b"), users=None) -> A.ExperimentData:
    e = pl.DataFrame(exposures, schema=EXPOSURE_SCHEMA)
    o = pl.DataFrame([{"request_id": r, "ts": T0, "user_id": "", "item_id": i, "event": "click", "value": None}
                      for r, i in outcomes], schema=OUTCOME_SCHEMA)
    return A.ExperimentData(Path("."), e, o, users, None, {"arms": [{"name": a, "share": 1 / len(arms)} for a in arms]})


def planted(n_users: int, p_a: float, p_b: float, seed: int, arms=("a", "b"), experiment="e") -> A.ExperimentData:
    """Each user gets one 10-item reply from their (hash-assigned) arm; each item is clicked with the arm's p."""
    rng = np.random.default_rng(seed)
    ex, out, users = [], [], []
    for u in range(n_users):
        uid = f"u{u}"
        arm = assign(uid, experiment, "s", [(arms[0], 0.5), (arms[1], 0.5)])
        rid = f"r{u}"
        items = [f"i{j}" for j in range(10)]
        ex.append(exposure(rid, uid, arm, items, ts=T0 + timedelta(minutes=u)))
        activity = int(rng.integers(1, 60))
        p = (p_a if arm == arms[0] else p_b) * activity / 30  # active users click more (CUPED's lever)
        out += [(rid, i) for i in items if rng.random() < p]
        users.append({"user_id": uid, "pre_interactions": int(activity), "pre_items_30d": int(activity // 4)})
    return data(ex, out, arms, pl.DataFrame(users))


def test_assignment_is_deterministic_salted_and_follows_the_shares():
    arms = [("a", 0.2), ("b", 0.8)]
    got = [assign(f"u{i}", "exp", "salt", arms) for i in range(20_000)]
    assert got == [assign(f"u{i}", "exp", "salt", arms) for i in range(20_000)]
    assert abs(got.count("a") / len(got) - 0.2) < 0.015
    other = [assign(f"u{i}", "exp", "salt2", arms) for i in range(20_000)]
    assert sum(x != y for x, y in zip(got, other)) > 5000  # a new salt re-randomizes


def test_team_draft_takes_alternately_without_duplicates_and_credits_the_contributor():
    a, b = ["1", "2", "3", "4", "5"], ["2", "6", "1", "7", "8"]
    merged = team_draft(a, b, 6, request_rng("x"))
    items = [i for i, _ in merged]
    assert len(items) == len(set(items)) == 6
    teams = [t for _, t in merged]
    assert abs(teams.count("a") - teams.count("b")) <= 1
    for item, team in merged:  # every item is its team's best one not taken before it
        assert item in (a if team == "a" else b)
    assert [i for i, _ in team_draft(["1"], ["1"], 5, request_rng("y"))] == ["1"]  # both lists exhausted: stop


def test_softmax_propensities_match_the_sampling_frequencies():
    scores = np.array([1.0, 0.9, 0.5, 0.1])
    probs = inclusion_probs(scores, 2, 0.2, np.random.default_rng(0), draws=20_000)
    assert probs.sum() == pytest.approx(2.0) and probs[0] > probs[1] > probs[2] > probs[3]
    rng = np.random.default_rng(1)
    counts = np.zeros(4)
    for _ in range(4000):
        order, _ = softmax_sample(scores, 2, 0.2, rng)
        counts[order] += 1
    np.testing.assert_allclose(counts / 4000, probs, atol=0.03)
    greedy = inclusion_probs(scores, 2, None, rng)
    assert greedy.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_the_log_writer_round_trips_partitioned_parquet(tmp_path):
    w = LogWriter(tmp_path, flush_rows=2, flush_s=0.2)
    for i in range(5):
        w.append("exposures", exposure(f"r{i}", "u", "a", ["x"], ts=T0 + timedelta(days=i % 2)))
    w.append("outcomes", {"request_id": "r1", "ts": T0, "user_id": "u", "item_id": "x", "event": "click", "value": None})
    w.close()
    e = read_logs(tmp_path, "exposures")
    assert sorted(e["request_id"].to_list()) == [f"r{i}" for i in range(5)]
    assert {p.name for p in (tmp_path / "exposures").iterdir()} == {"date=2018-01-01", "date=2018-01-02"}
    assert read_logs(tmp_path, "outcomes")["item_id"].to_list() == ["x"]
    assert not list(tmp_path.rglob(".*.tmp"))


def test_per_request_metrics_from_logged_positions():
    d = data([exposure("r1", "u1", "a", ["x", "y", "z"]), exposure("r2", "u2", "b", ["x", "y"])],
             [("r1", "y"), ("r1", "z"), ("r2", "q")])  # q was never shown in r2: not counted
    r = A.per_request(d).sort("request_id")
    assert r["clicks"].to_list() == [2, 0] and r["hit"].to_list() == [1.0, 0.0]
    dcg = 1 / np.log2(3) + 1 / np.log2(4)
    assert r["ndcg"][0] == pytest.approx(dcg / (1 + 1 / np.log2(3)))


def test_srm_fires_on_a_broken_split_and_not_on_a_good_one():
    d = planted(2000, 0.1, 0.1, seed=0)
    users = A.per_user(d)
    assert A.check_split(users, d.shares).ok
    broken = users.filter((pl.col("arm") == "a") | (pl.col("user_id").str.slice(1).cast(pl.Int64) % 4 != 0))
    with pytest.raises(A.SampleRatioMismatch, match="SAMPLE RATIO MISMATCH"):
        A.check_split(broken, d.shares)


def test_a_planted_effect_is_found_with_its_sign_and_cuped_narrows_the_interval():
    d = planted(3000, 0.10, 0.12, seed=1)
    users = A.per_user(d)
    t = {r["metric"]: r for r in A.compare(users, "a", "b", covariate="pre_log_interactions").iter_rows(named=True)}
    assert t["clicks"]["diff"] > 0 and t["clicks"]["p_value"] < 0.01
    assert t["engagement_rate"]["diff"] == pytest.approx(t["clicks"]["diff"] / 10, rel=1e-6)  # 10 shown each
    width = lambda r: r["diff_high"] - r["diff_low"]  # noqa: E731
    assert width(t["clicks (CUPED)"]) < width(t["clicks"])
    assert A.cuped_reduction(users, "clicks", "pre_log_interactions") > 0.05


def test_an_aa_split_is_significant_at_about_alpha():
    d = planted(1500, 0.1, 0.1, seed=2)
    aa = A.aa_false_positive_rate(A.per_user(d), splits=300, alpha=0.05)
    assert 0.02 <= aa["rate"] <= 0.09, aa


def test_interleaving_credit_and_sign_test():
    ex, out = [], []
    for u in range(200):
        items = ["p", "q", "r", "s"]
        ex.append(exposure(f"r{u}", f"u{u}", "interleaved", items, teams=["a", "b", "a", "b"]))
        out.append((f"r{u}", "q" if u % 4 else "p"))  # b's item clicked 3 times in 4
    d = data(ex, out)
    credit = A.interleaving_credit(d)
    res = A.interleaving_test(credit)
    assert (res["wins_treatment"], res["wins_control"]) == (150, 50) and res["p_value"] < 1e-6
    assert res["delta"] == pytest.approx(0.25)


def test_off_policy_estimators_match_hand_computed_values():
    # two explored requests over a pool of three; the target is greedy top-1 (the pool's best item)
    ex = [exposure("r1", "u1", "a", ["y"], propensities=[0.25], pool_items=["x", "y", "z"], pool_scores=[0.9, 0.5, 0.1],
                   temperature=0.1),
          exposure("r2", "u2", "a", ["x"], propensities=[0.5], pool_items=["x", "y", "z"], pool_scores=[0.9, 0.5, 0.1],
                   temperature=0.1)]
    d = data(ex, [("r2", "x")])
    terms = OP.ope_terms(d, target_temperature=None).sort("request_id")
    # r1 showed y, which greedy never shows: weight 0; r2 showed x (greedy shows it always): weight 1 / 0.5
    assert terms["ips"].to_list() == [0.0, 2.0] and terms["wsum"].to_list() == [0.0, 2.0]
    est = {e.estimator: e.value for e in OP.ope_estimates(terms, n_boot=50)}
    assert est["IPS"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert est["SNIPS"] == pytest.approx(1.0)  # (0 + 2) / (0 + 2) * k=1
    dm = terms["dm"].to_numpy()
    # DR = DM + weighted residuals; r1 adds nothing (weight 0), r2 adds 2 * (1 - r_hat(x))
    assert est["DR"] == pytest.approx(dm.mean() + (2 * (1 - terms["dm"][1])) / 2, abs=1e-9)


def _record(args):
    from recsys.experiments.logs import record_design

    root, salt = args
    return record_design(root, {"experiment": "e", "mode": "ab", "salt": salt,
                                "arms": [{"name": "a", "share": 0.9}, {"name": "b", "share": 0.1}]})


def test_workers_recording_the_design_at_once_leave_whole_lines_and_no_false_change(tmp_path):
    """Every worker of a service records the design as it starts: 16 processes at once write only whole lines,
    one id, and no 'design changed' report; a new salt afterwards is exactly one change."""
    from concurrent.futures import ProcessPoolExecutor

    from recsys.experiments.analysis import ExperimentData, design_changes
    from recsys.experiments.logs import read_designs

    with ProcessPoolExecutor(8) as pool:
        ids = set(pool.map(_record, [(str(tmp_path), "s1")] * 16))
    designs = read_designs(tmp_path)  # every line parses
    assert len(ids) == 1 and 1 <= len(designs) <= 16 and {d["design_id"] for d in designs} == ids
    meta = lambda: {"designs": read_designs(tmp_path)}  # noqa: E731
    assert design_changes(ExperimentData(tmp_path, pl.DataFrame(), pl.DataFrame(), meta=meta())) == []
    _record((str(tmp_path), "s2"))
    changes = design_changes(ExperimentData(tmp_path, pl.DataFrame(), pl.DataFrame(), meta=meta()))
    assert len(changes) == 1 and "salt changed" in changes[0], changes


# Looking daily, deciding as planned ---------------------------------------------------------------------------
def test_the_msprt_keeps_daily_looks_at_alpha_where_a_naive_daily_test_does_not():
    """Normal A/A data read 14 times: the always-valid p-value stops in about alpha of the runs or fewer, a
    fixed-horizon test read every day stops far more often; a real difference is still found."""
    from recsys.experiments import sequential as S

    rng = np.random.default_rng(0)
    seq = gs = naive = 0
    runs = 400
    for _ in range(runs):
        a, b = rng.normal(1.0, 1.0, 1400), rng.normal(1.0, 1.0, 1400)
        daily = [(a[: 100 * d], b[: 100 * d]) for d in range(1, 15)]
        looks = S.looks(daily, tau=0.1)
        seq += S.first_decision(looks) is not None
        gs += S.first_gs(looks) is not None
        naive += S.first_naive(looks) is not None
    assert seq / runs <= 0.07 and 0.025 <= gs / runs <= 0.075 and naive / runs >= 0.12, (seq / runs, gs / runs, naive / runs)
    a, b = rng.normal(1.0, 1.0, 1400), rng.normal(1.25, 1.0, 1400)
    looks = S.looks([(a[: 100 * d], b[: 100 * d]) for d in range(1, 15)], tau=0.1)
    day = S.first_decision(looks)
    assert day is not None and day <= 14 and looks[day - 1].cs_low > 0  # the confidence sequence excludes 0
    assert S.first_gs(looks) is not None
    half = S.looks([(a[: 100 * d], b[: 100 * d]) for d in range(1, 8)], tau=0.1, planned=14)  # a week of a planned two
    assert half[-1].gs_bound > looks[-1].gs_bound  # less of alpha is spent by the halfway look
    assert all(x.always_valid_p >= y.always_valid_p for x, y in zip(looks, looks[1:]))  # a running minimum


def test_benjamini_hochberg_matches_the_textbook_example():
    from recsys.experiments.decision import benjamini_hochberg

    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    q = benjamini_hochberg(p)
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 -> 0.025, 0.025, 0.05, 0.05, 0.5 (monotone from the top)
    assert q.tolist() == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])


def test_guardrails_fail_on_slow_failing_or_narrow_treatment_and_hold_otherwise():
    from recsys.experiments.decision import guardrails

    def run(lat_t: float, err_t: int, items_t: int) -> dict:
        rows = []
        for u in range(400):
            arm = "a" if u % 2 else "b"
            lat, n_items = (5.0, 40) if arm == "a" else (lat_t, items_t)
            err = "Timeout" if arm == "b" and u < 2 * err_t else None
            rows.append(exposure(f"r{u}", f"u{u}", arm, [] if err else [f"i{(u + j) % n_items}" for j in range(5)],
                                 latency_ms=lat, error=err))
        return {g.name.split(" (")[0]: g.ok for g in guardrails(data(rows, []), "a", "b")}

    assert run(6.0, 0, 40) == {"latency p99": True, "error rate": True, "fallback rate": True, "coverage": True}
    bad = run(250.0, 40, 10)  # p99 250 ms, 20% errors, a quarter of the items
    assert not bad["latency p99"] and not bad["error rate"] and not bad["coverage"] and bad["fallback rate"]


def test_dropped_log_rows_are_counted_per_arm_and_the_report_warns(tmp_path):
    from recsys.experiments.logs import read_dropped
    from recsys.experiments.report import write_report

    w = LogWriter(tmp_path, flush_rows=10_000, flush_s=60, max_queue=5)
    w._stop.set()  # the writer thread drains nothing more: the queue fills and rows are dropped
    w._thread.join()
    for u in range(20):
        w.append("exposures", exposure(f"r{u}", f"u{u}", "b" if u % 4 == 0 else "a", ["x"]))
    assert w.dropped == 15 and sum(w.dropped_by.values()) == 15
    w._flush()
    assert read_dropped(tmp_path) == {"exposures": {"a": w.dropped_by["exposures/a"], "b": w.dropped_by["exposures/b"]}}
    d = planted(400, 0.1, 0.1, seed=4)
    d.dropped = read_dropped(tmp_path)
    text = write_report(d, tmp_path / "report").read_text()
    assert "LOG ROWS WERE DROPPED" in text and "exposures: a" in text


def test_off_policy_intervals_resample_users_so_repeat_visitors_widen_them():
    """Ten requests per user, each user's requests alike: an interval over requests would be far too narrow."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(60):
        level = rng.choice([0.0, 3.0])  # a user always engages, or never
        for j in range(10):
            rows.append({"request_id": f"r{u}-{j}", "user_id": f"u{u}", "ips": level, "wsum": 1.0, "k": 1,
                         "dm": level, "dr": level})
    terms = pl.DataFrame(rows)
    by_user = {e.estimator: e.high - e.low for e in OP.ope_estimates(terms, n_boot=400)}
    by_request = {e.estimator: e.high - e.low for e in OP.ope_estimates(terms.drop("user_id"), n_boot=400)}
    assert by_user["IPS"] > 2.5 * by_request["IPS"]


def test_interleaving_credit_names_the_arms_and_refuses_a_run_of_other_arms():
    ex, out = [], []
    for u in range(100):
        ex.append(exposure(f"r{u}", f"u{u}", "interleaved", ["p", "q"], teams=["new", "old"]))
        out.append((f"r{u}", "q"))  # old's item always clicked
    d = data(ex, out, arms=("new", "old"))
    credit = A.interleaving_credit(d, control="old", treatment="new")
    res = A.interleaving_test(credit)
    assert (res["wins_treatment"], res["wins_control"]) == (0, 100)  # by name, whatever the run's order
    assert A.interleaving_test(A.interleaving_credit(d, "new", "old"))["wins_treatment"] == 100
    with pytest.raises(ValueError, match="no \\['champion'\\]"):
        A.interleaving_credit(d, control="champion", treatment="new")
    d.meta = {}  # a log without its design: the arms are the teams it credits
    assert set(A.interleaving_credit(d).columns) >= {"new", "old"}


def test_an_experiments_outcomes_are_those_of_its_own_replies(tmp_path):
    """One event log serves every experiment on a work directory: loading one experiment's logs keeps only the
    outcomes that quote its own replies (another run's clicks are not its outcomes)."""
    for name, ids in (("one", ["r1", "r2"]), ("two", ["r3"])):
        w = LogWriter(tmp_path / name, flush_s=0.05)
        for r in ids:
            w.append("exposures", exposure(r, "u1", "a", ["x"]))
        for r in ("r1", "r2", "r3"):  # a shared outcome stream (the event log) holds all three runs' clicks
            w.append("outcomes", {"request_id": r, "ts": T0, "user_id": "u1", "item_id": "x", "event": "click", "value": None})
        w.close()
    assert sorted(A.load(tmp_path / "one").outcomes["request_id"].to_list()) == ["r1", "r2"]
    assert A.load(tmp_path / "two").outcomes["request_id"].to_list() == ["r3"]


def test_the_coverage_guardrail_compares_arms_at_equal_numbers_of_replies():
    """A 90/10 split of one policy: the small arm shows fewer distinct items by size alone, and must not fail."""
    from recsys.experiments.decision import coverage_at_equal_size, guardrails

    rng = np.random.default_rng(5)
    rows = []
    for u in range(1000):
        arm = "b" if u % 10 == 0 else "a"
        rows.append(exposure(f"r{u}", f"u{u}", arm, [f"i{j}" for j in rng.choice(400, 5, replace=False)], latency_ms=5.0))
    raw = [len({i for r in rows if r["arm"] == a for i in r["items"]}) for a in ("a", "b")]
    assert raw[1] < 0.8 * raw[0]  # raw distinct counts would fail the small arm
    g = {x.name.split(" (")[0]: x for x in guardrails(data(rows, []), "a", "b")}
    assert g["coverage"].ok and abs(g["coverage"].control - g["coverage"].treatment) < 0.1 * g["coverage"].control
    assert coverage_at_equal_size([[["x"], ["y"]], [["x"]]]) == [1.0, 1.0]
