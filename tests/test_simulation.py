"""An online experiment end to end on a synthetic catalog: arms trained on the pre-cut period, the real
service (uvicorn) assigning users and writing exposure and outcome logs, the replay simulator (A/B, A/A,
interleaved, explored) and the report command; the notebooks run on real-traffic logs (test_traffic_notebooks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from recsys.cli import app as cli
from recsys.config import ArmConfig
from recsys.experiments import analysis as A
from recsys.experiments import off_policy as OP
from recsys.experiments.policy import assign
from tests.conftest import small_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from recsys.data.synthetic import SyntheticSpec, generate
    from recsys.flows.simulate import prepare, simulate

    root = tmp_path_factory.mktemp("simulation")
    data = generate(root / "data", SyntheticSpec(n_items=240, n_users=200, mean_interactions=12, seed=3,
                                                share_audio=0.05, share_video=0.0))
    cfg = small_config(root / "work", data={"source": "synthetic", "path": str(data)})
    arms = prepare(cfg, ["train.max_epochs=1", "train.lr=0.00005"])
    champion, challenger = ArmConfig(name="champion", alias="sim-champion"), ArmConfig(name="challenger", alias="sim-challenger")
    out = {"cfg": cfg, "arms": arms}
    out["ab"] = simulate(cfg, "ab", [champion, challenger])
    out["aa-first"] = simulate(cfg, "aa", [champion, ArmConfig(name="champion-2", alias="sim-champion")])
    out["aa-first-replies"] = A.per_request(A.load(cfg.workdir / "experiments" / "aa")).select("user_id", "items", "clicks")
    out["aa"] = simulate(cfg, "aa", [champion, ArmConfig(name="champion-2", alias="sim-champion")])  # rerun: fresh store
    out["il"] = simulate(cfg, "il", [champion, challenger], mode="interleave")
    out["explore"] = simulate(cfg, "explore", [champion, ArmConfig(name="champion-2", alias="sim-champion")],
                              explore="softmax", temperature=0.05)
    return out


def test_every_reply_is_logged_with_its_arm_and_every_outcome_joins_an_exposure(runs):
    cfg, run = runs["cfg"], runs["ab"]
    assert run.errors == 0 and run.requests == run.users > 20
    d = A.load(cfg.workdir / "experiments" / "ab")
    assert d.exposures["known_user"].all()  # every replayed user has pre-period features online
    assert d.exposures.height == run.requests and d.exposures["request_id"].n_unique() == run.requests
    for user, arm in d.exposures.select("user_id", "arm").iter_rows():  # the salted hash, nothing else
        assert arm == assign(user, "ab", "sim-ab", [("champion", 0.5), ("challenger", 0.5)])
    assert set(d.exposures["model"].unique().to_list()) == {
        f"{cfg.train.registered_model}/v{runs['arms'][a]['version']}" for a in ("sim-champion", "sim-challenger")}
    assert d.outcomes.height == run.engagements > 0
    shown = {(r, i) for r, items in d.exposures.select("request_id", "items").iter_rows() for i in items}
    assert all((r, i) in shown for r, i in d.outcomes.select("request_id", "item_id").iter_rows())
    users = pl.read_parquet(cfg.workdir / "experiments" / "ab" / "users.parquet")
    future = dict(zip(users["user_id"].to_list(), users["future"].to_list()))
    assert all(i in future[u] for u, i in d.outcomes.select("user_id", "item_id").iter_rows())  # real futures only


def test_same_users_same_future_only_the_arm_differs(runs):
    """A user served by the champion gets the same reply and the same engagements in the A/B run and in the
    A/A run: the simulation is a function of the arm, nothing else."""
    cfg = runs["cfg"]
    ab, aa = A.load(cfg.workdir / "experiments" / "ab"), A.load(cfg.workdir / "experiments" / "aa")
    assert ab.users.select("user_id", "arrival").equals(aa.users.select("user_id", "arrival"))
    a = A.per_request(ab).filter(pl.col("arm") == "champion").select("user_id", "items", "clicks").sort("user_id")
    b = A.per_request(aa).filter(pl.col("user_id").is_in(a["user_id"].implode())).select("user_id", "items", "clicks").sort("user_id")
    assert a.height > 5 and a.equals(b)


def test_a_rerun_starts_from_a_fresh_store_and_replays_identically(runs):
    """The first A/A run's clicks were pushed into its store; the rerun must not see them (nor a stale
    materialization): every user known, the same replies, the same engagements."""
    cfg = runs["cfg"]
    again = A.load(cfg.workdir / "experiments" / "aa")
    assert again.exposures["known_user"].all()
    assert A.per_request(again).select("user_id", "items", "clicks").sort("user_id").equals(
        runs["aa-first-replies"].sort("user_id"))


def test_interleaved_replies_credit_each_item_to_an_arm(runs):
    cfg = runs["cfg"]
    d = A.load(cfg.workdir / "experiments" / "il")
    assert set(d.exposures["arm"].unique().to_list()) == {"interleaved"}
    teams = {t for ts in d.exposures["teams"].to_list() for t in ts}
    assert teams == {"champion", "challenger"}
    credit = A.interleaving_credit(d)
    assert credit.height == d.exposures["user_id"].n_unique()
    assert (credit["champion"] + credit["challenger"]).sum() == d.outcomes.height


def test_explored_replies_carry_propensities_and_off_policy_estimates_bracket_the_truth(runs):
    cfg = runs["cfg"]
    explored, truth = A.load(cfg.workdir / "experiments" / "explore"), A.load(cfg.workdir / "experiments" / "aa")
    props = np.concatenate([np.array(p) for p in explored.exposures["propensities"].to_list()])
    assert ((props > 0) & (props <= 1)).all() and (props < 1).any()
    assert explored.exposures["pool_items"].list.len().min() > 10
    est = {e.estimator: e for e in OP.ope_estimates(OP.ope_terms(explored, None), n_boot=300)}
    v, lo, hi = OP.policy_value(truth)
    for name in ("IPS", "SNIPS", "DR"):
        e = est[name]
        assert np.isfinite([e.value, e.low, e.high]).all()
        assert e.low <= hi and lo <= e.high, (name, e, (v, lo, hi))  # the intervals overlap the truth's


def test_report_command_writes_markdown_and_figures(runs):
    cfg = runs["cfg"]
    ex = cfg.workdir / "experiments"
    out = ex / "report"
    res = CliRunner().invoke(cli, ["experiment", "report", "--logs", str(ex / "ab"), "--out", str(out),
                                   "--interleaving", str(ex / "il"), "--off-policy", str(ex / "explore"),
                                   "--truth", str(ex / "aa")])
    assert res.exit_code == 0, res.output
    text = (out / "report.md").read_text()
    for heading in ("Split check", "Per arm", "minus", "Segments", "Calibration and power", "Interleaving", "Off-policy"):
        assert heading in text
    assert (out / "deltas.png").stat().st_size > 5000 and (out / "power.png").exists()
    bad = CliRunner().invoke(cli, ["experiment", "report", "--logs", str(ex / "nope")])
    assert bad.exit_code == 2 and "no experiment folder" in bad.output
