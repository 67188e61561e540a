"""The multi-source ranking stage as served (recsys.ranking): fitted with its verdict on validation, saved and
loaded, and one request ranked the way the evaluation ranks a whole batch."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.config import Config
from recsys.eval.splits import rounds
from tests.test_ranker import _newest_wins


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from recsys.eval.sasrec import SASRecConfig
    from recsys.ranking import ServedRanker, fit

    ds = _newest_wins()
    cfg = Config.model_validate({"workdir": str(tmp_path_factory.mktemp("ranking")), "eval": {"bootstrap": 50},
                                 "ranker": {"val_rounds": 3, "train_rounds": 6, "per_source": 10,
                                            "ease_lambdas": [10.0, 100.0]}})
    small = SASRecConfig(dim=16, max_len=20, max_epochs=10, eval_every=5)
    ranker, val = fit(ds, cfg, end=3, n_boot=50, say=lambda *_: None, sasrec=small)
    folder = cfg.workdir / "ranker"
    ranker.save(folder)
    return ds, ranker, ServedRanker.load(folder), val


def test_one_request_is_ranked_as_the_evaluation_ranks_the_batch(fitted):
    """The served path (one user's rows, no eval set) and the evaluation's batch path give the same top 10 for
    held-out questions, with the saved bundle's sparse item-kNN and the sequence cut to the latest items as the
    online store keeps them (5 here); seen and blocked items never come back."""
    from recsys.eval.ranker import candidates

    ds, _, served, _ = fitted
    idx = ds.catalog.index
    test = rounds(ds, 0, 3).questions
    batch = served.model.rank(candidates(served.sources, test, served.per_source, recent=5), k=10)
    hist = dict(test.history.sort("timestamp").group_by("user_id", maintain_order=True)
                .agg(pl.col("item_id")).iter_rows())
    same, rng = 0, np.random.default_rng(0)
    for q, user in enumerate(test.users):
        seq = np.array([idx[i] for i in hist[user]], np.int64)
        at = test.at[q].timestamp()
        rows, scores, timings = served.rank(seq[-5:], seq, len(seq), at, k=10)
        same += rows.tolist() == batch[q][batch[q] >= 0].tolist()
        assert not set(rows.tolist()) & set(seq.tolist()) and np.all(np.diff(scores) <= 0)
        assert timings["ranker_candidates"] > 10
        block = np.zeros(served.n_items, bool)
        block[rng.choice(rows, 3, replace=False)] = True
        again, _, _ = served.rank(seq[-5:], seq, len(seq), at, k=10, block=block)
        assert not block[again].any() and len(again) == 10
    assert same >= 0.95 * len(test.users), (same, len(test.users))


def test_the_fit_reports_its_verdict_on_validation_and_it_chose_the_ranker_here(fitted):
    _, ranker, served, val = fitted
    r = served.report
    assert r == ranker.report and r["sources"] == ["ease", "sasrec", "itemknn", "popularity"]
    best = r["best_single_on_val"]
    assert val["ranker"].estimates["NDCG@10"].mean > val[best].estimates["NDCG@10"].mean
    assert r["served"] == "ranker" and served.chosen
    assert r["ranker_minus_best_single_val"]["NDCG@10"]["low"] > 0
    assert r["sets"]["train"]["questions"] > r["sets"]["val"]["questions"] > 0


def test_a_bad_bundle_is_refused_naming_the_file(tmp_path):
    from recsys.ranking import BUNDLE, ServedRanker

    (tmp_path / BUNDLE).write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="ranker bundle .*ranker.joblib cannot be read"):
        ServedRanker.load(tmp_path)


def test_ranker_fit_on_too_little_history_says_so_in_one_line(tmp_path, capsys):
    """A catalog whose users have too few interactions for the ranker's rounds: exit 2 with the reason, no traceback."""
    from recsys.cli import main

    with pytest.raises(SystemExit) as made:
        main(["data", "example", str(tmp_path / "shop"), "--items", "40", "--users", "30"])
    assert made.value.code == 0
    (tmp_path / "ranker.toml").write_text("[ranker]\ntrain_rounds = 60\n")
    with pytest.raises(SystemExit) as exit_:
        main(["ranker", "fit", "--workdir", str(tmp_path / "work"), "--source", "generic", "--data",
              str(tmp_path / "shop"), "--config", str(tmp_path / "ranker.toml")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "too few interactions per user for the ranker's rounds" in err
    assert "Traceback" not in err


def test_a_batch_of_requests_is_ranked_as_each_alone(fitted):
    """`rank_many` (a serving batch: one scoring pass for all) gives each request what `rank` gives it alone."""
    from recsys.ranking import RankRequest

    ds, _, served, _ = fitted
    idx = ds.catalog.index
    test = rounds(ds, 0, 3).questions
    hist = dict(test.history.sort("timestamp").group_by("user_id", maintain_order=True).agg(pl.col("item_id")).iter_rows())
    reqs = []
    for q, user in enumerate(test.users[:40]):
        seq = np.array([idx[i] for i in hist[user]], np.int64)
        block = np.zeros(served.n_items, bool)
        block[seq[-1] + 1 if seq[-1] + 1 < served.n_items else 0] = q % 2 == 0  # some requests exclude an item
        reqs.append(RankRequest(seq[-5:], seq, len(seq), test.at[q].timestamp(), 5 + q % 7, block if q % 3 else None))
    together, timings = served.rank_many(reqs)
    assert timings["ranker_candidates"] > 5
    alone = [served.rank(r.seq, r.seen, r.n, r.at, r.k, r.block)[0] for r in reqs]
    same = sum(a.tolist() == t.tolist() for a, (t, _) in zip(alone, together))
    assert same >= 38 and all(len(t) == r.k for (t, _), r in zip(together, reqs)), (same, len(reqs))


def test_the_verdict_weighs_rivals_on_their_own_questions_and_leaves_out_one_that_cannot_score(fitted):
    """A rival (the served two-tower, in `recsys ranker fit`) is scored on the questions it names, paired with the
    ranker on the same questions; one that ranks every target first beats the ranker and takes the verdict, one
    that fails is left out with its reason."""
    from recsys.eval.evaluate import score_topk
    from recsys.eval.ranker import candidates
    from recsys.ranking import against_rival, verdict

    ds, _, served, _ = fitted
    val = rounds(ds, 3, 6)  # the fixture's validation block (end=3, val_rounds=3)
    ranked = served.model.rank(candidates(served.sources, val.questions, served.per_source, recent=20))

    def oracle(r):
        which = np.arange(0, len(r.questions), 2)
        sub = r.subset(which)
        rows = np.full((len(which), 50), -1, np.int64)
        rows[:, 0] = [t[0] for t in sub.questions.targets]
        return which, score_topk("oracle", rows, sub.questions, served.n_items, "loo-rounds", "val", n_boot=1)

    def broken(r):
        raise ValueError("a checkpoint of another catalog")

    said = []
    won = against_rival("oracle", oracle, val, ranked, served.n_items, 50, said.append)
    assert won["questions"] == (len(val.questions) + 1) // 2 and won["oracle"]["HR@10"]["mean"] == 1.0
    assert won["ranker_minus"]["NDCG@10"]["high"] < 0 and any("oracle" in s for s in said)
    failed = against_rival("broken", broken, val, ranked, served.n_items, 50, said.append)
    assert "another catalog" in failed["error"] and "leaves it out" in said[-1]
    ndcg = {"ranker": 0.10, "ease": 0.08, "sasrec": 0.07}
    assert verdict(ndcg, {}) == ("ease", "ranker")
    assert verdict(ndcg, {"broken": failed}) == ("ease", "ranker")
    assert verdict(ndcg, {"broken": failed, "oracle": won}) == ("ease", "oracle")
    assert verdict({**ndcg, "ranker": 0.05}, {"oracle": won}) == ("ease", "ease")
