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


def _block(res) -> dict:
    return {m: e.to_dict() for m, e in res.estimates.items()}


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


def served_path(ranker, questions, recent: int, k: int = 50) -> tuple[np.ndarray, dict]:
    """Every question through :meth:`recsys.ranking.ServedRanker.rank`, one request at a time on one thread, as
    /recommend calls it (the latest ``recent`` items as the sequence, the whole history as seen): (Q, k) rows and
    the stage costs (median and p99 ms over the questions)."""
    import polars as pl
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a serving worker
    idx = ranker.sources.index
    hist = dict(questions.history.sort("timestamp").group_by("user_id", maintain_order=True).agg(pl.col("item_id")).iter_rows())
    rows = np.full((len(questions), k), -1, np.int64)
    spent: dict[str, list[float]] = {}
    for q, user in enumerate(questions.users):
        seq = np.array([idx[i] for i in hist.get(user, [])], np.int64)
        t0 = time.perf_counter()
        got, _, timings = ranker.rank(seq[-recent:], seq, len(seq), questions.at[q].timestamp(), k)
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        rows[q, :got.size] = got
        for name, v in timings.items():
            spent.setdefault(name, []).append(v)
    torch.set_num_threads(threads)
    cost = {name: {"median": round(float(np.median(v)), 3), "p99": round(float(np.percentile(v, 99)), 3)}
            for name, v in spent.items()}
    return rows, cost


def two_tower_rounds(cfg, ds, val, test, n_boot: int) -> dict:
    """The two-tower alone on the same questions, as the demo's pipeline makes it: the catalog embedded, the item
    input and recipe screened on the validation questions (recsys.flows.protocol.VariantSearch), trained on the
    interactions before the validation block (the other sources' fit window), read on test once.

    Returns {"val": EvalResult, "test": EvalResult (per user), "info": the search's record}."""
    from recsys.embed.catalog import embed_catalog, item_input_candidates
    from recsys.eval.ranker import by_user
    from recsys.eval.splits import RoundsSplit
    from recsys.flows.protocol import VariantSearch

    iv, ds = embed_catalog(cfg, ds, cold=False)
    split = RoundsSplit("loo", val.questions, test.questions, fit=val.fit)
    search = VariantSearch(cfg, ds, split, item_input_candidates(cfg, ds, iv))
    best = search.run()
    catalog = search.input(best.item_input).ds.catalog
    v = by_user(best.trained.evaluate(split, catalog, cfg, part="val", n_boot=1), val.owner, n_boot)
    t = by_user(best.trained.evaluate(split, catalog, cfg, part="test", n_boot=1), test.owner, n_boot)
    return {"val": v, "test": t, "info": search.record(best)}


def run(workdir: Path, n_boot: int = 1000, train_rounds: int = 10, sources: tuple[str, ...] | None = None,
        max_users: int | None = None, posters: Path | None = None, two_tower: bool = True) -> dict:
    """The record (``max_users``: a quick slice, to try the benchmark; ``posters``: the demo's images, for the
    two-tower's item vectors)."""
    from recsys import ranking
    from recsys.config import Config
    from recsys.data import load_dataset
    from recsys.eval.evaluate import evaluate
    from recsys.eval.metrics import paired_bootstrap_diff
    from recsys.eval.ranker import SOURCES, by_user, candidates, score_ranking
    from recsys.eval.splits import rounds
    from recsys.progress import console
    from recsys.quiet import silence

    silence()
    cfg = Config.load(None, workdir=str(workdir), ranker={"train_rounds": train_rounds, "ease_lambdas": LAMBDAS},
                      data={"max_users": max_users, "posters": str(posters) if posters else None})
    ds = load_dataset(cfg)
    idx, n_items, recent = ds.catalog.index, len(ds.catalog), cfg.features.recent_items
    test = rounds(ds, 0, 5, cfg.eval)
    ranker, v = ranking.fit(ds, cfg, end=5, sources=sources or SOURCES, n_boot=n_boot, say=console.print)
    out = {"protocol": "each user's last 5 interactions (test), the 5 before (validation), the "
                       f"{train_rounds} before those (ranker training)", **ranker.report}
    out["sets"]["test"] = {"questions": len(test.questions), "users": len(set(test.owner)), "fit_interactions": test.fit.height}
    folder = ranker.save(Path(workdir) / "bundle").parent
    out["bundle_mb"] = round((folder / ranking.BUNDLE).stat().st_size / 2**20, 1)
    ranker = ranking.ServedRanker.load(folder)  # what a service loads: item-kNN sparse, EASE's dual in float32
    t0 = time.perf_counter()
    c_test = candidates(ranker.sources, test.questions, ranker.per_source, recent=recent)
    out["times_s"]["test_candidates_s"] = round(time.perf_counter() - t0, 1)
    out["candidate_recall"]["test"] = round(c_test.recall, 4)
    # test: read once, for the choice validation made
    t = {name: by_user(evaluate(m, test.questions, idx, "loo-rounds", part="test", n_boot=1), test.owner, n_boot)
         for name, m in ranker.sources.models.items()}
    t["ranker"] = score_ranking("ranker", ranker.model.rank(c_test), test.questions, test.owner, n_items, "test", n_boot)
    if two_tower:  # the two-tower alone on the same questions (its figures join the table; not a source)
        t0 = time.perf_counter()
        tt = two_tower_rounds(cfg, ds, rounds(ds, 5, 10, cfg.eval), test, n_boot)
        out["val"]["two-tower"] = _block(tt["val"])
        t["two-tower"] = tt["test"]
        out["two_tower"] = {**tt["info"], "seconds": round(time.perf_counter() - t0, 1)}
    served_rows, cost = served_path(ranker, test.questions, recent)
    t_served = score_ranking("ranker", served_rows, test.questions, test.owner, n_items, "test", n_boot)
    batch_top = ranker.model.rank(c_test, k=10)
    same = float(np.mean([(a[a >= 0].tolist() == b[b >= 0].tolist()) for a, b in zip(batch_top, served_rows[:, :10])]))
    singles = [s for s in t if s != "ranker"]
    best = max(singles, key=lambda s: out["val"][s]["NDCG@10"]["mean"])  # the two-tower counts as a single model too
    served = "ranker" if out["val"]["ranker"]["NDCG@10"]["mean"] > out["val"][best]["NDCG@10"]["mean"] else best
    out.update({"best_single_on_val": best, "served": served})

    def minus(a, b):
        j = t[a].per_user.join(t[b].per_user, on="user_id", suffix="_b")
        return {m: paired_bootstrap_diff(j[m].to_numpy(), j[f"{m}_b"].to_numpy(), n_boot).to_dict()
                for m in ("NDCG@10", "HR@10", "Recall@50")}

    out.update({
        "test": {k: _block(r) for k, r in t.items()},
        "served_minus_best_single_test": minus("ranker", best) if served == "ranker" else None,
        "ranker_minus_each_test": {s: minus("ranker", s)["NDCG@10"] for s in singles},
        "served_path": {"test": _block(t_served), "same_top10_as_batch": round(same, 4), "cost_ms": cost,
                        "sequence_items": recent},
        "ranker_cost": serving_cost(ranker.model, c_test.x[0]), "users": len(set(test.owner)),
    })
    return out
