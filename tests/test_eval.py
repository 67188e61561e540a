"""Metrics against hand-computed cases, the protocols' invariants, full ranking, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import sparse

from recsys.config import EvalConfig
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


def test_top_k_breaks_ties_by_the_seeded_order_alone():
    """Equal scores rank in the seeded permutation's order, whichever items the CPU's partition routine would
    keep (a model that scores everything alike must give the same ranking on every machine)."""
    n, k = 5000, 50
    scores = np.zeros((3, n))
    scores[1, 7] = 1.0  # one clear winner, then ties
    scores[2, :] = np.repeat(np.arange(50), 100)  # ties straddling the cut and inside the top k
    seen = sparse.csr_matrix((3, n))
    perm = np.random.default_rng(0).permutation(n)
    got = top_k(scores, seen, None, k, np.random.default_rng(0))
    assert got[0].tolist() == perm[:k].tolist()
    assert got[1].tolist() == [7] + [i for i in perm if i != 7][: k - 1]
    want = sorted(range(n), key=lambda j: (-scores[2, perm[j]], j))[:k]
    assert got[2].tolist() == perm[want].tolist()


def test_loo_split(movielens):
    s = make_split("loo", movielens)
    assert len(s.test) == len(s.val) == 610
    f = movielens.interactions.frame
    last_t = dict(f.group_by("user_id").agg(pl.col("timestamp").max()).iter_rows())
    ids = np.array(movielens.catalog.ids)
    in_last_second = {u: set(i) for u, i in f.filter(pl.col("timestamp") == pl.col("timestamp").max().over("user_id"))
                      .group_by("user_id").agg("item_id").iter_rows()}
    assert all(ids[t[0]] in in_last_second[u] for u, t in zip(s.test.users, s.test.targets))  # a last-second item
    assert all(a == last_t[u] for u, a in zip(s.test.users, s.test.at))
    assert s.train.height + 2 * 610 == f.height
    # validation rows are history for the test round, never for the validation round
    assert s.test.history.height == s.train.height + 610
    # same-second ties are drawn by the seed, not by file order: another seed moves some held-out items
    assert 50 < s.ties < 300
    other = make_split("loo", movielens, EvalConfig(seed=1))
    moved = sum(a.tolist() != b.tolist() for a, b in zip(s.test.targets, other.test.targets))
    assert 0 < moved <= s.ties
    assert [t.tolist() for t in make_split("loo", movielens).test.targets] == [t.tolist() for t in s.test.targets]


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


def test_sasrec_learns_a_sequential_rule_popularity_cannot(monkeypatch):
    """Every user walks the catalog in order (item i, then i+1, ...) from a random start: the next item is
    determined by the last one. SASRec must find it; popularity cannot. And the heap's freed pages go back after
    every epoch (in the demo's long process the fit otherwise held 5.9 GB resident)."""
    from datetime import datetime, timedelta, timezone

    from recsys.eval.sasrec import SASRec, SASRecConfig

    rng = np.random.default_rng(0)
    n_items, rows = 30, []
    t0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
    for u in range(150):
        start = int(rng.integers(n_items))
        for step in range(int(rng.integers(6, 12))):
            rows.append((f"u{u}", str((start + step) % n_items), t0 + timedelta(days=step)))
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    index = {str(i): i for i in range(n_items)}
    f = frame.with_columns(pl.int_range(pl.len()).over("user_id").alias("pos"), pl.len().over("user_id").alias("n"))
    train = f.filter(pl.col("pos") < pl.col("n") - 1).drop("pos", "n")
    last = f.filter(pl.col("pos") == pl.col("n") - 1)
    users = last["user_id"].to_list()
    from recsys.eval.splits import EvalSet

    es = EvalSet(users, [np.array([index[i]]) for i in last["item_id"].to_list()], last["timestamp"].to_list(), history=train)
    trims = []
    monkeypatch.setattr("recsys.eval.sasrec.release", lambda: trims.append(1) or True)
    model = SASRec(index, SASRecConfig(dim=32, max_len=8, max_epochs=40, negatives=None, dropout=0.1), "toy").fit(es)
    assert len(trims) == model.history[-1][0]  # one per epoch trained
    hr = evaluate(model, es, index, "toy", n_boot=10).estimates["HR@10"].mean
    first = evaluate(model, es, index, "toy", n_boot=10).estimates["NDCG@10"].mean
    pop = evaluate(Popularity(index).fit(train), es, index, "toy", n_boot=10).estimates["NDCG@10"].mean
    assert hr > 0.95 and first > 0.8 > pop + 0.4, (hr, first, pop)
    assert model.epochs >= 1 and model.history


def test_random_baseline_ranks_each_user_at_random_whatever_the_batching(synthetic):
    """COLD's "random" row: a different seeded ranking per user (not one shared tie-break), the same whether
    users are scored in one batch or many."""
    from recsys.eval.baselines import Random

    split = make_split("loo", synthetic)
    idx = synthetic.catalog.index
    one = evaluate(Random(idx), split.test, idx, "loo", n_boot=1, keep_topk=True)
    many = evaluate(Random(idx), split.test, idx, "loo", n_boot=1, keep_topk=True, batch_users=3)
    assert np.array_equal(one.topk, many.topk)
    tops = {tuple(row[:10]) for row in one.topk}
    assert len(tops) == len(one.topk)  # every user gets their own ten
    assert not np.array_equal(one.topk, evaluate(Random(idx, seed=1), split.test, idx, "loo", n_boot=1, keep_topk=True).topk)


def test_ease_dual_solver_gives_the_primal_scores(synthetic):
    """Fewer users than items: the m x m dual (Woodbury) must score every user as the n x n inverse does, and
    "auto" must take it there (on the toy world above, more users than items, the primal)."""
    split = make_split("loo", synthetic)
    idx = synthetic.catalog.index
    users = np.arange(len(split.val.users))
    for lam in (2.0, 64.0):
        primal = EASE(idx, lam, solver="primal").fit(split.val.history)
        dual = EASE(idx, lam, solver="dual").fit(split.val.history)
        p, d = primal.score(split.val, users), dual.score(split.val, users)
        np.testing.assert_allclose(d, p, atol=1e-4 * np.abs(p).max())
        assert primal.dual is None and dual.B is None
    m = EASE(idx, 8.0).fit(split.val.history)
    assert (m.dual is not None) == (split.val.history["user_id"].n_unique() < m.active.size)
    with pytest.raises(ValueError, match="solver"):
        EASE(idx, 8.0, solver="svd")


def test_ease_tuning_finds_the_exhaustive_grid_best_with_fewer_fits(synthetic, monkeypatch):
    split = make_split("loo", synthetic)
    idx = synthetic.catalog.index
    grid = [0.5, 2.0, 8.0, 32.0, 128.0, 512.0, 2048.0]
    exhaustive = {lam: evaluate(EASE(idx, lam).fit(split.val.history), split.val, idx, "loo", part="val",
                                n_boot=1).estimates["NDCG@10"].mean for lam in grid}
    fits = []
    real_fit = EASE.fit
    monkeypatch.setattr(EASE, "fit", lambda self, h: (fits.append(self.lam), real_fit(self, h))[1])
    best, tried = EASE.tuned(idx, split.val, grid, "loo")
    assert tried[best.lam] == max(exhaustive.values())
    assert all(exhaustive[lam] == v for lam, v in tried.items())
    assert len(fits) == len(set(fits)) < len(grid)


def test_evaluation_refuses_embedder_weights_that_trained_on_its_test_split(movielens):
    from recsys.embed.provenance import check_overlap, dataset_hash, trained_cold_items, trained_test_interactions
    from recsys.errors import DataError
    from recsys.embed.tasks import training_provenance

    record = training_provenance(movielens, EvalConfig())  # what `recsys train-embedder` writes in the manifest
    digest = dataset_hash(movielens)
    assert record["dataset_hash"] == digest and len(record["held_out_items"]) == 589 + 295
    for protocol in ("loo", "cold", "temporal"):  # the settings the weights were trained with: no overlap
        assert "no" in check_overlap(record, movielens, make_split(protocol, movielens), digest)
    cold1 = make_split("cold", movielens, EvalConfig(seed=1))
    with pytest.raises(DataError, match="COLD split's"):  # another seed holds out items the embedder trained on
        check_overlap(record, movielens, cold1, digest)
    assert trained_cold_items(record, movielens, make_split("cold", movielens)) == []
    assert 0.5 * cold1.cold_items.size < len(trained_cold_items(record, movielens, cold1)) < cold1.cold_items.size
    with pytest.raises(DataError, match="held-out"):
        check_overlap(record, movielens, make_split("cold", movielens, EvalConfig(cold_fraction=0.3)), digest)
    loo1 = make_split("loo", movielens, EvalConfig(seed=1))
    with pytest.raises(DataError, match="LOO split's test interactions"):  # another tie-break seed
        check_overlap(record, movielens, loo1, digest)
    # a benchmark over tie draws leaves out the test users whose drawn target the weights trained on
    seen = set(trained_test_interactions(record, movielens, loo1)["user_id"].to_list())
    clean = loo1.without_test_users(seen)
    assert 0 < len(seen) < 0.1 * len(loo1.test) and len(clean.test) == len(loo1.test) - len(seen)
    assert "no test interaction" in check_overlap(record, movielens, clean, digest) and clean.val is loo1.val
    # weights trained on other data, or that record nothing, are not refused (and say so)
    assert "other data" in check_overlap({**record, "dataset_hash": "0" * 16}, movielens, make_split("cold", movielens), digest)
    assert "not checked" in check_overlap(None, movielens, make_split("cold", movielens))


def test_the_shipped_embedder_weights_record_their_training_data(movielens):
    import json

    from recsys.embed.local import DEFAULT_WEIGHTS
    from recsys.embed.provenance import check_overlap, dataset_hash

    record = json.loads((DEFAULT_WEIGHTS / "manifest.json").read_text())["training_data"]
    assert record["dataset_hash"] == dataset_hash(movielens) and record["split"]["loo_ties"] == "seeded"
    for protocol in ("loo", "cold", "temporal"):
        check_overlap(record, movielens, make_split(protocol, movielens))


def test_the_simulators_holdout_split_refuses_the_shipped_embedder_whose_pairs_hold_its_targets(movielens, tmp_path):
    """The shipped weights' co-engagement pairs include most of each user's last 20% (the holdout split the
    simulator replays): `recsys experiment prepare` and `recsys simulate` refuse them there, as the demo refuses
    an overlapping protocol, and name the way out; the TEMPORAL split replays cleanly."""
    import json

    from recsys.config import Config
    from recsys.embed.catalog import ItemVectors
    from recsys.embed.local import DEFAULT_WEIGHTS
    from recsys.errors import DataError
    from recsys.eval.inputs import check_embedder_overlap

    version = json.loads((DEFAULT_WEIGHTS / "manifest.json").read_text())["version"]
    iv = ItemVectors(movielens.catalog.ids, np.zeros((len(movielens.catalog), 1), np.float32), "local", version, 1)
    cfg = Config.model_validate({"workdir": str(tmp_path)})
    with pytest.raises(DataError, match="HOLDOUT split's test interactions"):
        check_embedder_overlap(cfg, movielens, iv, make_split("holdout", movielens))
    check_embedder_overlap(cfg, movielens, iv, make_split("temporal", movielens))


def test_item_resampled_interval_sees_a_difference_carried_by_one_item_that_user_resampling_misses():
    from recsys.eval.metrics import item_bootstrap_diff, paired_bootstrap_diff, recall

    rng = np.random.default_rng(0)
    targets = [np.array([0, j]) for j in rng.integers(1, 51, 300)]  # every user: item 0 and one other
    a = np.tile(np.r_[0, np.arange(100, 149)], (300, 1))  # finds item 0 for everyone, nothing else
    b = np.tile(np.arange(100, 150), (300, 1))  # finds nothing
    by_users = paired_bootstrap_diff(recall(a, targets, 50), recall(b, targets, 50))
    by_items = item_bootstrap_diff(a, b, targets, "Recall@50")
    assert by_items.mean == pytest.approx(by_users.mean) == pytest.approx(0.5)
    assert by_users.low > 0.49  # every user gains the same: resampling users cannot see the one-item bet
    assert by_items.low == 0.0 and by_items.high > 0.5  # a draw without item 0 erases it; one with it twice grows it
    hr = item_bootstrap_diff(a, b, targets, "HR@10")
    assert hr.mean == pytest.approx(1.0) and hr.low == 0.0
    with pytest.raises(ValueError, match="NDCG"):
        item_bootstrap_diff(a, b, targets, "NDCG@10")
