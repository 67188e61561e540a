"""The ranking stage against the best single model, on many questions per user (the quality issue).

Three blocks of each user's interactions in ml-latest-small, from the end (recsys.eval.splits.rounds):

- test: the last 5 interactions, each asked with the history before it;
- validation: the 5 before those; every source's knob (EASE's lambda, SASRec's epoch), the ranker's number of
  trees, and the choice (ranker or the best single source) are made here;
- ranker training: the 10 before those, with the sources fitted on what came before them.

The sources for validation and test are fitted once on everything before the validation block (no refit on
validation: one policy for all). The test figures are read once, for the choice validation made.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

LAMBDAS = [2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 500.0, 1000.0]  # the demo's grid ends at 20, which won here


def _est(e) -> dict:
    return {"mean": e.mean, "low": e.low, "high": e.high}


def _block(res) -> dict:
    return {m: _est(e) for m, e in res.estimates.items()}


def serving_cost(ranker, x: np.ndarray, n: int = 200, repeats: int = 300) -> dict:
    """The ranker's own cost per request: scoring ``n`` candidates on one thread, median and p99 over ``repeats``
    calls (features assumed at hand)."""
    one = np.ascontiguousarray(np.resize(x, (n, x.shape[1])))  # one question's candidates, repeated up to n
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ranker.scores(one, threads=1)
        times.append((time.perf_counter() - t0) * 1000)
    return {"candidates": n, "median_ms": round(float(np.median(times)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def run(workdir: Path, n_boot: int = 1000, train_rounds: int = 10, sources: tuple[str, ...] | None = None) -> dict:
    from recsys.config import Config
    from recsys.data import load_dataset
    from recsys.eval.evaluate import evaluate
    from recsys.eval.metrics import paired_bootstrap_diff
    from recsys.eval.ranker import SOURCES, LambdaRanker, Sources, by_user, candidates, feature_names, score_ranking
    from recsys.eval.splits import rounds
    from recsys.progress import console
    from recsys.quiet import silence

    silence()
    cfg = Config.load(None, workdir=str(workdir))
    ds = load_dataset(cfg)
    idx, n_items = ds.catalog.index, len(ds.catalog)
    test, val, train = rounds(ds, 0, 5, cfg.eval), rounds(ds, 5, 10, cfg.eval), rounds(ds, 10, 10 + train_rounds, cfg.eval)
    out: dict = {"protocol": "each user's last 5 interactions (test), the 5 before (validation), the "
                             f"{train_rounds} before those (ranker training)",
                 "sets": {k: {"questions": len(r.questions), "users": len(set(r.owner)), "fit_interactions": r.fit.height}
                          for k, r in (("train", train), ("val", val), ("test", test))}}
    times = {}
    t0 = time.perf_counter()
    console.print("ranker training questions: " + train.describe())
    inner = Sources.fit(idx, train.fit, train.questions, LAMBDAS, sources=sources or SOURCES)
    c_train = candidates(inner, train.questions)
    inner_settings = inner.settings
    times["training_sources_and_candidates_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    console.print("validation and test questions: " + val.describe() + "; " + test.describe())
    outer = Sources.fit(idx, val.fit, val.questions, LAMBDAS, sources=sources or SOURCES)
    c_val, c_test = candidates(outer, val.questions), candidates(outer, test.questions)
    times["sources_and_candidates_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ranker = LambdaRanker(seed=cfg.train.seed).fit(c_train, c_val)
    times["ranker_fit_s"] = round(time.perf_counter() - t0, 1)
    c_train_recall = c_train.recall
    del inner, c_train

    def results(r, cs, part):
        rows = {name: by_user(evaluate(m, r.questions, idx, "loo-rounds", part=part, n_boot=1), r.owner, n_boot)
                for name, m in outer.models.items()}
        rows["ranker"] = score_ranking("ranker", ranker.rank(cs), r.questions, r.owner, n_items, part, n_boot)
        return rows

    v = results(val, c_val, "val")
    singles = [s for s in v if s != "ranker"]
    best = max(singles, key=lambda s: v[s].estimates["NDCG@10"].mean)
    served = "ranker" if v["ranker"].estimates["NDCG@10"].mean > v[best].estimates["NDCG@10"].mean else best
    console.print("validation NDCG@10: " + ", ".join(f"{k} {r.estimates['NDCG@10']}" for k, r in v.items())
                  + f" -> served: {served}")
    t = results(test, c_test, "test")  # read once, for the choice above

    def minus(a, b, part_rows):
        j = part_rows[a].per_user.join(part_rows[b].per_user, on="user_id", suffix="_b")
        return {m: _est(paired_bootstrap_diff(j[m].to_numpy(), j[f"{m}_b"].to_numpy(), n_boot))
                for m in ("NDCG@10", "HR@10", "Recall@50")}

    importance = dict(zip(feature_names(tuple(outer.models)), ranker.model.booster_.feature_importance("gain").tolist()))
    total = sum(importance.values()) or 1.0
    out.update({
        "sources": list(outer.models), "settings": {"validation_and_test": outer.settings, "ranker_training": inner_settings},
        "candidate_recall": {"train": round(c_train_recall, 4), "val": round(c_val.recall, 4), "test": round(c_test.recall, 4),
                             "slots": int(c_val.rows.shape[1])},
        "ranker": {"trees": ranker.trees, "curve_every_10_trees": ranker.curve[::10], "params": ranker.params,
                   "features": feature_names(tuple(outer.models)),
                   "gain_share": {k: round(g / total, 4) for k, g in sorted(importance.items(), key=lambda kv: -kv[1])}},
        "val": {k: _block(r) for k, r in v.items()}, "best_single_on_val": best, "served": served,
        "test": {k: _block(r) for k, r in t.items()},
        "served_minus_best_single_test": minus("ranker", best, t) if served == "ranker" else None,
        "ranker_minus_each_test": {s: minus("ranker", s, t)["NDCG@10"] for s in singles},
        "ranker_minus_best_single_val": minus("ranker", best, v),
        "ranker_cost": serving_cost(ranker, c_test.x[0]), "times_s": times, "users": len(set(test.owner)),
    })
    return out
