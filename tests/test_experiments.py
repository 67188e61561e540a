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
    terms = A.ope_terms(d, target_temperature=None).sort("request_id")
    # r1 showed y, which greedy never shows: weight 0; r2 showed x (greedy shows it always): weight 1 / 0.5
    assert terms["ips"].to_list() == [0.0, 2.0] and terms["wsum"].to_list() == [0.0, 2.0]
    est = {e.estimator: e.value for e in A.ope_estimates(terms, n_boot=50)}
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
