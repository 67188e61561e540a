"""Metrics against hand-computed cases, the protocols' invariants, full ranking, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import sparse

from recsys.eval import bootstrap, coverage, hit_rate, make_split, ndcg, paired_bootstrap_diff, recall, top_k
from recsys.eval.baselines import EASE, Popularity
from recsys.eval.evaluate import evaluate


def test_metrics_hand_computed():
    topk = np.array([[5, 3, 9, 1], [2, 4, 6, 8]])
    targets = [np.array([9, 7]), np.array([0])]
    # user 0: hit at rank 3 (index 2) out of 2 relevant; user 1: no hit
    assert hit_rate(topk, targets, 2).tolist() == [0.0, 0.0]
    assert hit_rate(topk, targets, 3).tolist() == [1.0, 0.0]
    assert recall(topk, targets, 4).tolist() == [0.5, 0.0]
    dcg = 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg(topk, targets, 4)[0] == pytest.approx(dcg / idcg)
    assert ndcg(topk, targets, 4)[1] == 0.0
    # a perfect ranking has NDCG 1
    assert ndcg(np.array([[7, 9, 1]]), [np.array([9, 7])], 3)[0] == pytest.approx(1.0)
    assert coverage(topk, 2, n_candidates=10) == pytest.approx(4 / 10)
    assert coverage(np.array([[1, -1]]), 2, n_candidates=4) == pytest.approx(1 / 4)  # empty slots don't count


def test_bootstrap_interval_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = bootstrap(rng.random(50) < 0.3, n_boot=500)
    big = bootstrap(rng.random(5000) < 0.3, n_boot=500)
    assert small.low <= small.mean <= small.high
    assert (big.high - big.low) < (small.high - small.low) / 3
    assert big.low < 0.3 < big.high
    diff = paired_bootstrap_diff(np.ones(100), np.zeros(100), n_boot=100)
    assert diff.mean == 1.0 and diff.low == 1.0


def test_top_k_excludes_seen_and_respects_candidates():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    seen = sparse.csr_matrix(np.array([[1, 0, 0, 0, 0]]))
    rng = np.random.default_rng(0)
    assert top_k(scores, seen, None, 2, rng).tolist() == [[1, 2]]
    assert top_k(scores, seen, np.array([3, 4]), 2, rng).tolist() == [[3, 4]]


def test_loo_split(movielens):
    s = make_split("loo", movielens)
    assert len(s.test) == len(s.val) == 610
    f = movielens.interactions.frame
    last = f.group_by("user_id", maintain_order=True).agg(pl.col("item_id").last())
    idx = movielens.catalog.index
    expected = {u: idx[i] for u, i in last.iter_rows()}
    assert all(t.tolist() == [expected[u]] for u, t in zip(s.test.users, s.test.targets))
    assert s.train.height + 2 * 610 == f.height
    # validation rows are history for the test round, never for the validation round
    assert s.test.history.height == s.train.height + 610


def test_cold_split_hides_cold_items_everywhere(movielens):
    s = make_split("cold", movielens)
    ids = np.array(movielens.catalog.ids)
    cold_ids = set(ids[s.cold_items].tolist())
    assert s.test.candidates.size == 589  # 20% of the 2,947 movies with posters
    assert not set(s.train["item_id"].to_list()) & cold_ids
    assert all(set(t.tolist()) <= set(s.test.candidates.tolist()) for t in s.test.targets)
    assert 550 < len(s.test) < 650


def test_temporal_split_is_a_time_cut(movielens):
    s = make_split("temporal", movielens)
    cut = s.test.at[0]
    assert s.test.history["timestamp"].max() < cut
    assert 10 < len(s.test) < 100
    seen = s.test.history.group_by("user_id").agg("item_id")
    seen = {u: set(i) for u, i in seen.iter_rows()}
    idx_to_id = np.array(movielens.catalog.ids)
    assert all(not (set(idx_to_id[t]) & seen[u]) for u, t in zip(s.test.users, s.test.targets))


def test_baselines_on_a_toy_world():
    # items 0,1 always co-occur; item 2 is popular alone
    index = {str(i): i for i in range(4)}
    rows = [("u1", "0"), ("u1", "1"), ("u2", "0"), ("u2", "1"), ("u3", "2"), ("u4", "2"), ("u5", "2"), ("u7", "2"), ("u6", "0")]
    hist = pl.DataFrame(rows, schema=["user_id", "item_id"], orient="row").with_columns(
        pl.lit(0).cast(pl.Datetime("us", "UTC")).alias("timestamp"))
    from recsys.eval.splits import EvalSet

    es = EvalSet(["u6"], [np.array([1])], [None], history=hist)
    pop = Popularity(index).fit(hist)
    assert pop.score(es, np.array([0]))[0].argmax() == 2
    ease = EASE(index, lam=0.5).fit(hist)
    assert ease.score(es, np.array([0]))[0].argmax() == 1  # co-occurrence beats raw popularity
    res = evaluate(ease, es, index, "toy", n_boot=10)
    assert res.estimates["HR@10"].mean == 1.0


def test_linear_map_baseline_learns_a_linear_world_and_keeps_its_validation_best():
    """The embedder report's baseline: paired rows related by a noisy linear map. Early stopping on held-out
    pairs returns a map at least as good on them as training to the end, and far above chance."""
    from recsys.eval.embedder import LinearMap, chance, retrieval_recall

    rng = np.random.default_rng(0)
    A = rng.normal(size=(32, 16))
    x = rng.normal(size=(600, 32)).astype(np.float32)
    y = (x @ A + 4.0 * rng.normal(size=(600, 16))).astype(np.float32)  # noisy: it overfits if trained long
    tr, va, te = slice(0, 200), slice(200, 400), slice(400, 600)
    kw = dict(epochs=300, lr=1e-2)
    stopped = LinearMap.fit(x[tr], y[tr], val=(x[va], y[va]), **kw)
    final = LinearMap.fit(x[tr], y[tr], **kw)
    r_stop, r_final = retrieval_recall(y[va], stopped(x[va]))[10], retrieval_recall(y[va], final(x[va]))[10]
    assert r_stop >= r_final
    assert retrieval_recall(y[te], stopped(x[te]))[10] > 3 * chance(200)[10]
