"""Experiments on real service traffic (issue: experiments on real traffic): a small two-tower served by a real
`recsys serve` (uvicorn) with a configured experiment, driven by returning users over 14 simulated days
(recsys.experiments.traffic); the figures are read from the logs the service wrote.

- A/A calibration with 14 daily looks over 500 re-salts of the A/A run's users: the group-sequential test, the
  mSPRT, a naive fixed-horizon test read daily (peeking) and read once at the end.
- The split check: a 90/10 re-split passes (p > 0.001); one arm losing 5% of its users is flagged; at the logs'
  size and at 100,000 users.
- Interval coverage with repeat visitors (1-20 requests per user): over 200 re-salted A/A splits, how often the
  95% interval of the ratio metric (clicks / exposures, delta method over users) covers 0, beside the interval
  that treats requests as independent.
- A planted +10% click lift in one arm of a 50/50 run: the day each sequential test allows a decision, beside the
  fixed-horizon test at day 14.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

SALTS, COVERAGE_SPLITS, DAYS = 500, 200, 14


def trained_workdir(root: Path):
    """A two-tower trained on a small synthetic catalog (as the serving tests train one); reused when present."""
    from recsys.config import Config

    cfg_path = root / "work" / "config.json"
    if cfg_path.exists():
        return Config.model_validate_json(cfg_path.read_text())
    from recsys.data.synthetic import SyntheticSpec, generate
    from recsys.flows.demo import run_demo

    data = generate(root / "data", SyntheticSpec(n_items=600, n_users=60, mean_interactions=20, seed=5))
    cfg = Config.model_validate({"workdir": str(root / "work"), "data": {"source": "synthetic", "path": str(data)},
                                 "eval": {"protocols": ["loo"], "bootstrap": 100},
                                 "train": {"max_epochs": 2, "newest_items": 0, "id_embeddings": False}})
    run_demo(cfg, sample_users=1)
    return cfg


@contextlib.contextmanager
def service(cfg):
    """`uvicorn --factory serving.app:app_from_env` on ``cfg`` (one worker), its URL for the block, then SIGTERM."""
    import httpx

    from recsys.flows.simulate import _free_port

    port = _free_port()
    env = {**os.environ, "RECSYS_SERVE_CONFIG": cfg.model_dump_json(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serving.app:app_from_env", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def traffic(cfg, name: str, logs: Path, arms: list[dict], spec) -> dict:
    """One experiment served for real and driven by ``spec``; the run's counts and its wall time."""
    from recsys.experiments.traffic import drive

    exp = {"name": name, "salt": f"bench-{name}", "log_dir": str(logs), "flush_s": 1.0, "arms": arms,
           "primary_metric": "clicks", "mde": 0.1, "days": DAYS}
    served = cfg.model_copy(update={"experiment": cfg.experiment.model_validate(exp)})
    t0 = time.perf_counter()
    with service(served) as url:
        run = drive(url, spec)
    seconds = time.perf_counter() - t0
    return {**run.to_dict(), "seconds": round(seconds, 1), "requests_per_s": round(run.requests / seconds, 1)}


def srm_rates(ids: list[str], salts: int) -> dict:
    """90/10 re-splits of ``ids``: the share passing the split check, and the share flagged when either arm loses
    5% of its users (a random 5%)."""
    from recsys.experiments.analysis import srm
    from recsys.experiments.policy import assign

    shares = {"control": 0.9, "treatment": 0.1}
    rng = np.random.default_rng(0)
    passed, flagged = 0, {"control": 0, "treatment": 0}
    for s in range(salts):
        arms = np.array([assign(u, "srm", f"s{s}", list(shares.items())) for u in ids])
        frame = pl.DataFrame({"arm": arms})
        passed += srm(frame, shares).ok
        for lose in flagged:
            keep = (arms != lose) | (rng.random(len(arms)) >= 0.05)
            flagged[lose] += not srm(pl.DataFrame({"arm": arms[keep]}), shares).ok
    return {"users": len(ids), "salts": salts, "pass_rate": passed / salts,
            "flagged_rate": {k: v / salts for k, v in flagged.items()}}


def coverage(d, splits: int) -> dict:
    """Re-salted A/A splits of one run's users: how often the 95% interval of clicks / exposures covers 0, by
    the delta method over users (what the report uses) and by an interval over requests (as if independent)."""
    from recsys.experiments.analysis import compare_ratio, per_request, per_user
    from recsys.experiments.policy import assign

    users = per_user(d).drop("arm")
    reqs = per_request(d).drop("arm")
    ids = users["user_id"].to_list()
    by_user = by_request = 0
    for s in range(splits):
        arm = pl.DataFrame({"user_id": ids, "arm": [assign(u, "cov", f"c{s}", [("a", 0.5), ("b", 0.5)]) for u in ids]})
        r = compare_ratio(users.join(arm, on="user_id"), "a", "b")
        by_user += r["diff_low"] <= 0 <= r["diff_high"]
        q = reqs.join(arm, on="user_id")
        rates = [q.filter(pl.col("arm") == a) for a in ("a", "b")]
        m = [x["clicks"].sum() / x["exposures"].sum() for x in rates]
        # requests as independent: each request's clicks/exposures a draw; the usual ratio variance over requests
        se = np.sqrt(sum(_ratio_var_requests(x) for x in rates))
        by_request += abs(m[1] - m[0]) <= 1.96 * se
    return {"splits": splits, "users": len(ids), "requests": reqs.height, "delta_method_by_user": by_user / splits,
            "requests_as_independent": by_request / splits}


def _ratio_var_requests(x: pl.DataFrame) -> float:
    y, n = x["clicks"].to_numpy().astype(float), x["exposures"].to_numpy().astype(float)
    r = y.sum() / n.sum()
    return float(((y - r * n) ** 2).sum() / n.sum() ** 2)


def run(args) -> dict:
    from recsys.experiments import sequential as S
    from recsys.experiments.analysis import load, per_user
    from recsys.experiments.decision import plan
    from recsys.experiments.traffic import TrafficSpec

    root = Path(args.workdir) / "traffic"
    cfg = trained_workdir(root)
    users = int(getattr(args, "traffic_users", None) or 8000)
    out: dict = {"users": users, "lift_users": 3 * users // 2, "days": DAYS}
    aa_logs, lift_logs = root / "logs-aa", root / "logs-lift"
    for logs in (aa_logs, lift_logs):
        if logs.exists():
            import shutil

            shutil.rmtree(logs)
    out["aa_run"] = traffic(cfg, "aa", aa_logs, [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}],
                            TrafficSpec(users=users, days=DAYS, seed=1, concurrency=16))
    out["lift_run"] = traffic(cfg, "lift", lift_logs, [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5}],
                              TrafficSpec(users=3 * users // 2, days=DAYS, seed=2, effect={"treatment": 0.10},
                                          concurrency=16))
    aa = load(aa_logs)
    by_day = S.per_user_by_day(aa, DAYS)
    final = by_day[-1]
    tau = 0.1 * float(final["clicks"].mean())
    requests = final["requests"].to_numpy()
    out["aa_logs"] = {"users": final.height, "requests": int(requests.sum()), "requests_per_user_max": int(requests.max()),
                      "requests_per_user_mean": float(requests.mean()), "clicks_per_user": float(final["clicks"].mean())}
    t0 = time.perf_counter()
    out["aa_daily_looks"] = {**S.resalted_rates(by_day, "clicks", tau, SALTS), "tau": tau,
                             "seconds": round(time.perf_counter() - t0, 1)}
    ids = final["user_id"].to_list()
    out["srm"] = {"logs": srm_rates(ids, SALTS), "100k": srm_rates([f"x{i}" for i in range(100_000)], 100)}
    out["coverage"] = coverage(aa, COVERAGE_SPLITS)
    lift = load(lift_logs)
    lift_mean = float(per_user(lift).filter(pl.col("arm") == "control")["clicks"].mean())
    seq = S.sequential_test(lift, "control", "treatment", "clicks", 0.1 * lift_mean, planned=DAYS)
    last = seq[-1]
    out["planted"] = {"lift": 0.10, "group_sequential_day": S.first_gs(seq), "msprt_day": S.first_decision(seq),
                      "naive_peeking_day": S.first_naive(seq), "fixed_horizon_day": DAYS if last.naive_p < 0.05 else None,
                      "fixed_horizon_p": last.naive_p, "diff": last.diff, "control_mean": lift_mean,
                      "looks": S.looks_frame(seq).to_dicts()}
    p = plan(aa, 0.10, "clicks", max_days=DAYS)
    enough = p.filter(pl.col("enough"))
    out["plan"] = {"mde": 0.10, "first_day": int(enough["day"][0]) if enough.height else None,
                   "needed": int(p["needed"][-1]) if p["needed"][-1] is not None else None, "table": p.to_dicts()}
    return out


def render(blob: dict) -> list[str]:
    r = blob["results"]
    a, s, c, pl_, lk = r["aa_daily_looks"], r["srm"], r["coverage"], r["planted"], r["aa_logs"]
    ok = lambda v, lo, hi: "met" if lo <= v <= hi else "missed"  # noqa: E731
    return [
        f"A two-tower on a small synthetic catalog served by a real `recsys serve` (one uvicorn worker) with a configured "
        f"experiment; {r['users']:,} simulated users returning over {r['days']} simulated days "
        f"(recsys.experiments.traffic: Beta click propensities, 1-20 requests each, position-biased clicks). The A/A "
        f"run: {r['aa_run']['requests']:,} requests at {r['aa_run']['requests_per_s']:.0f}/s; in its logs "
        f"{lk['users']:,} users, {lk['requests_per_user_mean']:.1f} requests per user on average (max "
        f"{lk['requests_per_user_max']}).", "",
        "| goal | measured | |", "|---|---|---|",
        f"| A/A, {a['looks']} daily looks, {a['salts']} re-salts: group-sequential false-positive rate in 5% +- 2% | "
        f"{a['group_sequential_rate']:.3f} | {ok(a['group_sequential_rate'], 0.03, 0.07)} |",
        f"| ... the mSPRT (always valid for any number of looks) | {a['msprt_rate']:.3f} | (at most 0.05) |",
        f"| ... naive daily peeking (fixed-horizon test read every day), shown beside it | {a['naive_rate']:.3f} | |",
        f"| ... the fixed-horizon test read once at day {a['looks']} | {a['final_look_rate']:.3f} | |",
        f"| 90/10 split passes the split check (p > 0.001) in 95%+ of re-salts ({s['logs']['users']:,} users) | "
        f"{s['logs']['pass_rate']:.3f} | {ok(s['logs']['pass_rate'], 0.95, 1)} |",
        f"| one arm losing 5% of its users flagged in 95%+ ({s['logs']['users']:,} users): control / treatment arm | "
        f"{s['logs']['flagged_rate']['control']:.3f} / {s['logs']['flagged_rate']['treatment']:.3f} | "
        f"{ok(min(s['logs']['flagged_rate'].values()), 0.95, 1)} |",
        f"| ... at 100,000 users (assignment only): pass / flagged control / flagged treatment | {s['100k']['pass_rate']:.2f} / "
        f"{s['100k']['flagged_rate']['control']:.2f} / {s['100k']['flagged_rate']['treatment']:.2f} | |",
        f"| repeat visitors: 95% interval of clicks/exposures covers 0 in 93-97% of {c['splits']} A/A splits (delta "
        f"method over users) | {c['delta_method_by_user']:.3f} | {ok(c['delta_method_by_user'], 0.93, 0.97)} |",
        f"| ... the interval over requests as if independent, for contrast | {c['requests_as_independent']:.3f} | |",
        f"| planted +10% clicks (50/50, {r['lift_users']:,} users): day the group-sequential test decides / mSPRT / fixed horizon (day {r['days']}, "
        f"p {pl_['fixed_horizon_p']:.3g}) | {pl_['group_sequential_day'] or 'none'} / {pl_['msprt_day'] or 'none'} / "
        f"{pl_['fixed_horizon_day'] or 'not significant'} | "
        f"{'met' if pl_['group_sequential_day'] or pl_['msprt_day'] else 'missed'} |",
        "", f"`recsys experiment plan --mde 0.1` on the A/A logs: a 10% change needs {r['plan']['needed']:,} users by day "
        f"{r['days']}; enough from day {r['plan']['first_day'] or 'none (longer run needed)'}.",
        "The A/A figures re-randomize one run's users (what an A/A test with each salt would have assigned), so the "
        "splits share users; they are not independent runs."]
