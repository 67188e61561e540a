"""The multi-round questions (recsys.eval.splits.rounds) and the ranking stage over several sources
(recsys.eval.ranker)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from recsys.eval import make_split
from recsys.eval.splits import rounds


def test_rounds_ask_each_interaction_of_a_block_with_only_the_past(movielens):
    """Each question's history is exactly its user's interactions before it (in LOO's order), its target the
    interaction itself; models learn from the interactions before the block only; the last round is LOO's test."""
    r = rounds(movielens, 0, 5)
    q = r.questions
    assert len(q) == 5 * len(set(r.owner)) and len(set(q.users)) == len(q)
    loo = make_split("loo", movielens)
    one = rounds(movielens, 0, 1)
    assert one.questions.targets[0].tolist() == loo.test.targets[0].tolist()
    first_user = one.owner[0]
    assert one.questions.history.filter(pl.col("user_id") == one.questions.users[0]).height == \
        loo.test.history.filter(pl.col("user_id") == first_user).height
    by_q = dict(q.history.group_by("user_id").agg(pl.col("timestamp").max(), pl.len()).select(
        "user_id", pl.struct("timestamp", "len")).iter_rows())
    n_fit = dict(r.fit.group_by("user_id").len().iter_rows())
    for k in range(0, len(q), 97):
        user, pos = q.users[k].split("#")
        assert user == r.owner[k]
        info = by_q[q.users[k]]
        assert info["len"] == int(pos)  # everything before the position, nothing after
        assert info["timestamp"] <= q.at[k]
        assert n_fit[user] <= int(pos)
    first = {}
    for user, question in zip(r.owner, q.users):
        first.setdefault(user, int(question.split("#")[1]))
    assert all(n_fit[u] == p for u, p in first.items())  # the fit window stops where the block starts
    block = q.history.join(r.fit.rename({"user_id": "owner"}), on=["item_id", "timestamp"], how="anti")
    assert block.height > 0  # the questions read the block's earlier rounds as input
    assert r.fit.height + len(q) == movielens.interactions.frame.filter(
        pl.col("user_id").is_in(list(set(r.owner)))).height
    with pytest.raises(ValueError, match="last < first"):
        rounds(movielens, 5, 5)


def _newest_wins(n_groups: int = 3, days: int = 60, users_per_group: int = 40, seed: int = 0):
    """A world where each day brings one new item per taste group and users mostly take their group's newest
    one: EASE and item-kNN find the group, not which item is new; the item's age as of the question does."""
    rng = np.random.default_rng(seed)
    t0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
    rows = []
    for g in range(n_groups):
        for u in range(users_per_group):
            start = int(rng.integers(1, days // 2))
            for day in range(start, min(days, start + int(rng.integers(25, 35)))):
                item = day - 1 if rng.random() < 0.7 else int(rng.integers(0, day))
                when = t0 + timedelta(days=day, seconds=int(rng.integers(0, 86000)))
                rows.append((f"g{g}u{u}", f"{g}-{item}", when))
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").unique(
        ["user_id", "item_id"], keep="first").sort("user_id", "timestamp")
    ids = sorted(frame["item_id"].unique().to_list())
    return SimpleNamespace(catalog=SimpleNamespace(index={i: k for k, i in enumerate(ids)}, ids=ids),
                           interactions=SimpleNamespace(frame=frame))


def test_the_ranker_combines_sources_and_context_to_beat_each_source_on_held_out_rounds():
    """Trained on earlier rounds, stopped on the validation rounds, scored on the last rounds (never seen): the
    LambdaRank ranker beats every single source by a wide margin where the signal is the item's freshness as of the
    question (its age and its interactions before it), which no source scores."""
    from recsys.eval.evaluate import evaluate
    from recsys.eval.ranker import LambdaRanker, Sources, by_user, candidates, feature_names, score_ranking

    ds = _newest_wins()
    idx = ds.catalog.index
    test, val, train = rounds(ds, 0, 3), rounds(ds, 3, 6), rounds(ds, 6, 12)
    srcs = ("ease", "itemknn", "popularity")
    inner = Sources.fit(idx, train.fit, train.questions, [10.0, 100.0], sources=srcs)
    outer = Sources.fit(idx, val.fit, val.questions, [10.0, 100.0], sources=srcs)
    c_train, c_val, c_test = (candidates(s, r.questions, per_source=10) for s, r in
                              ((inner, train), (outer, val), (outer, test)))
    assert c_test.x.shape == (len(test.questions), 30, len(feature_names(srcs)))
    assert np.isfinite(c_test.x).all() and (c_test.rows[c_test.rows >= 0] < len(idx)).all()
    seen = {(q, i) for q, i in zip(test.questions.history["user_id"], test.questions.history["item_id"])}
    ids = ds.catalog.ids
    assert not any((test.questions.users[q], ids[i]) in seen for q, row in enumerate(c_test.rows) for i in row if i >= 0)
    ranker = LambdaRanker(n_estimators=300, min_child_samples=20, stopping=30).fit(c_train, c_val)
    ranked = score_ranking("ranker", ranker.rank(c_test), test.questions, test.owner, len(idx), "test", n_boot=50)
    singles = {n: by_user(evaluate(m, test.questions, idx, "rounds", n_boot=1), test.owner, 50).estimates["NDCG@10"].mean
               for n, m in outer.models.items()}
    got = ranked.estimates["NDCG@10"].mean
    assert got > 1.5 * max(singles.values()) and got > 0.3, (got, singles)
    assert ranked.per_user.height == len(set(test.owner))  # one row per real user: intervals resample users


def test_by_user_averages_questions_before_resampling():
    from recsys.eval.evaluate import EvalResult
    from recsys.eval.metrics import bootstrap
    from recsys.eval.ranker import by_user

    per_q = pl.DataFrame({"user_id": ["a#1", "a#2", "b#5"], "NDCG@10": [1.0, 0.0, 0.5]})
    res = EvalResult("m", "p", "test", per_q, 0.0, {"NDCG@10": bootstrap(per_q["NDCG@10"].to_numpy(), 10)})
    out = by_user(res, ["a", "a", "b"], n_boot=10)
    assert out.per_user.sort("user_id").to_dict(as_series=False) == {"user_id": ["a", "b"], "NDCG@10": [0.5, 0.5]}
    assert out.estimates["NDCG@10"].mean == 0.5
