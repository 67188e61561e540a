"""The multi-source ranking stage as it is served: fitted on a catalog's interactions, chosen or not on
validation, saved under ``<workdir>/ranker``, and asked one request at a time.

The pieces are the offline ones (recsys/eval/ranker.py: the sources, their merged candidates and features, the
LambdaRank model), so what serving computes for a request is what the ranker was trained and validated on:
:meth:`ServedRanker.rank` builds one user's :class:`~recsys.eval.ranker.Histories` and calls the same
:func:`~recsys.eval.ranker.rank_batch` as the evaluation (tests/test_ranking.py checks that both agree).

The sequential source reads a user's latest ``features.recent_items`` items, as many as the online store keeps,
in training, validation and serving alike.

The fit (:func:`fit`): each user's last ``ranker.val_rounds`` interactions are validation questions, the
``ranker.train_rounds`` before them train the ranker with sources fitted on what came before those; the served
sources are fitted on everything before the validation block (no refit: the house policy). The verdict
(``report["served"]``) is the ranker when its validation NDCG@10 beats every single source's; ``serve.ranker =
"auto"`` serves it only then. The two-tower is not among the sources; ``recsys ranker fit`` passes the two-tower kept
in the work directory as a rival (recsys.flows.saved.kept_two_tower_scorer), so that the verdict compares the
ranker with the model it would replace too. That two-tower learned from most of the validation block (its LOO
training keeps all but each user's last 2 interactions), so it is compared on those last 2 questions per user
only (the first of them chose its epochs: slightly in its favour).

    recsys ranker fit      (writes <workdir>/ranker/ranker.joblib and report.json)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys.config import Config
from recsys.eval.ranker import SOURCES, Histories, LambdaRanker, Sources, rank_batch, source_scores

FOLDER = "ranker"
BUNDLE = "ranker.joblib"
REPORT = "report.json"


@dataclass
class RankRequest:
    """One request's inputs (:meth:`ServedRanker.rank`)."""

    seq: np.ndarray
    seen: np.ndarray
    n: int
    at: float
    k: int
    block: np.ndarray | None = None


@dataclass
class ServedRanker:
    """The fitted sources and LambdaRank model over the catalog rows of ``item_ids``, with the fit's report."""

    item_ids: list[str]
    sources: Sources
    model: LambdaRanker
    report: dict = field(default_factory=dict)
    per_source: int = 50

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def chosen(self) -> bool:
        """Whether validation chose the ranker over the best single model (a source, or a rival such as the two-tower)."""
        return self.report.get("served") == "ranker"

    def rank(self, seq: np.ndarray, seen: np.ndarray, n: int, at: float, k: int,
             block: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """One request: the ``k`` best rows for a user whose latest rows in time order are ``seq`` and who had
        every row of ``seen`` (never returned), with ``n`` interactions in all, asked at ``at`` (unix seconds).

        Args:
            block: (n_items,) bool, rows the request excludes besides the seen ones.
        Returns:
            rows (<= k,) best first, their ranker scores, and the stage timings in ms.
        """
        [(rows, scores)], timings = self.rank_many([RankRequest(seq, seen, n, at, k, block)])
        return rows, scores, timings

    def rank_many(self, requests: list["RankRequest"]) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, float]]:
        """Several requests in one pass (a serving batch): one scoring call per source for all of them, one
        LambdaRank call for all their candidates. Returns each request's (rows, scores) and the batch's timings."""
        t0 = time.perf_counter()
        h = Histories.stack([Histories.one(np.asarray(r.seq, np.int64), np.asarray(r.seen, np.int64), r.n, r.at,
                                           self.n_items, self.sources.max_len) for r in requests])
        scores = source_scores(self.sources, h)
        t1 = time.perf_counter()
        block = None
        if any(r.block is not None for r in requests):
            block = np.stack([r.block if r.block is not None else np.zeros(self.n_items, bool) for r in requests])
        rows, x = rank_batch(self.sources, h, self.per_source, block, scores)
        t2 = time.perf_counter()
        valid = rows >= 0
        p = np.full(rows.shape, -np.inf)
        p[valid] = self.model.scores(x[valid], threads=1)
        out = []
        for r, req in enumerate(requests):
            order = np.argsort(-p[r], kind="stable")[: min(req.k, int(valid[r].sum()))]
            out.append((rows[r][order], p[r][order]))
        t3 = time.perf_counter()
        return out, {
            "ranker_sources_ms": (t1 - t0) * 1000,  # every source scores the whole catalog (candidate generation)
            "ranker_features_ms": (t2 - t1) * 1000,  # their top lists merged, the candidates' features
            "ranker_model_ms": (t3 - t2) * 1000,  # LambdaRank on the candidates, one thread
            "ranker_candidates": float(valid.sum() / len(requests))}

    def save(self, folder: Path) -> Path:
        """Write the bundle (one joblib file, replaced atomically) and a readable report.json. The sources are
        converted in place to their served form first (item-kNN sparse, EASE's dual in float32): this object then
        scores as the loaded bundle does (a copy of the n x n similarities would double the peak memory)."""
        import joblib
        from scipy import sparse

        folder.mkdir(parents=True, exist_ok=True)
        knn = self.sources.models.get("itemknn")
        S = sparse.csr_matrix(np.asarray(self.sources.knn, np.float32))  # <= 100 neighbours per item: sparse
        self.sources.knn = S
        if knn is not None:
            knn.S = S
        for m in self.sources.models.values():
            if hasattr(m, "_rows"):
                m._rows = None  # an eval set's cached matrix
            if getattr(m, "dual", None) is not None:  # EASE: float32 halves a request's (m, n) product
                Xt, KX, d = m.dual
                m.dual = (Xt.astype(np.float32), KX.astype(np.float32), d.astype(np.float32))
        tmp = folder / f".{BUNDLE}.{os.getpid()}.tmp"
        joblib.dump({"item_ids": self.item_ids, "sources": self.sources, "model": self.model, "report": self.report,
                     "per_source": self.per_source}, tmp)
        os.replace(tmp, folder / BUNDLE)
        (folder / REPORT).write_text(json.dumps(self.report, indent=1, default=str))
        return folder / BUNDLE

    @classmethod
    def load(cls, folder: Path) -> "ServedRanker":
        """Read a saved bundle; ValueError naming the file and the problem when it is not one."""
        import joblib

        path = folder / BUNDLE
        try:
            blob = joblib.load(path)
            r = cls(list(blob["item_ids"]), blob["sources"], blob["model"], dict(blob["report"]), int(blob["per_source"]))
        except FileNotFoundError:
            raise
        except Exception as exc:  # a truncated or foreign file: say which and why
            raise ValueError(f"ranker bundle {path} cannot be read: {type(exc).__name__}: {exc}") from exc
        if len(r.sources.index) != r.n_items or r.sources.knn.shape != (r.n_items, r.n_items):
            raise ValueError(f"ranker bundle {path}: its sources cover {len(r.sources.index)} items, its catalog {r.n_items}")
        return r


def folder_of(cfg: Config) -> Path:
    return cfg.workdir / FOLDER


def verdict(ndcg: dict[str, float], against: dict[str, dict]) -> tuple[str, str]:
    """What serves: the ranker where its validation NDCG@10 beats every source's (``ndcg``: name -> mean over
    users, the ranker's included) and it beats each rival that could be scored on that rival's questions
    (``against``: :func:`against_rival`'s results); otherwise the best source, or the first rival it lost to.

    Returns:
        (the best source on validation, what serves)."""
    best = max((s for s in ndcg if s != "ranker"), key=lambda s: ndcg[s])
    if not ndcg["ranker"] > ndcg[best]:
        return best, best
    lost = [name for name, r in against.items() if "error" not in r and not r["ranker_minus"]["NDCG@10"]["mean"] > 0]
    return best, lost[0] if lost else "ranker"


def against_rival(name: str, score, val, ranked: np.ndarray, n_items: int, n_boot: int, say=print) -> dict:
    """The ranker against a model outside its sources on the validation questions that model may be judged on.

    Args:
        score: ``score(val) -> (which, result)``: the indices of ``val``'s questions the rival did not learn from
            and its per-question EvalResult on ``val.subset(which)``.
        ranked: (Q, >=50) the ranker's rows for every validation question.
    Returns:
        the questions and users compared, both models' NDCG@10, HR@10 and Recall@50, and the ranker minus the
        rival (paired over users); ``{"error": ...}`` where the rival cannot score them (left out of the verdict,
        with a line saying why)."""
    from recsys.eval.evaluate import paired_differences
    from recsys.eval.ranker import by_user, score_ranking

    say(f"{name} on the validation questions it did not learn from")
    try:
        which, result = score(val)
    except Exception as exc:  # e.g. a kept model from an older catalog: say so, and the verdict goes without it
        say(f"{name} could not be scored ({type(exc).__name__}: {exc}): the verdict leaves it out")
        return {"error": f"{type(exc).__name__}: {exc}"}
    sub = val.subset(which)
    mine = score_ranking("ranker", ranked[which], sub.questions, sub.owner, n_items, "val", n_boot)
    theirs = by_user(result, sub.owner, n_boot)
    metrics = ("NDCG@10", "HR@10", "Recall@50")
    [diff] = paired_differences([mine, theirs], "ranker", metrics, n_boot).values()
    out = {"questions": len(which), "users": len(set(sub.owner)),
           "ranker": {m: mine.estimates[m].to_dict() for m in metrics},
           name: {m: theirs.estimates[m].to_dict() for m in metrics},
           "ranker_minus": {m: e.to_dict() for m, e in diff.items()}}
    say(f"NDCG@10 on those {len(which):,} questions: ranker {mine.estimates['NDCG@10']}, {name} {theirs.estimates['NDCG@10']}")
    return out


def fit(ds, cfg: Config, end: int = 0, sources: tuple[str, ...] = SOURCES, n_boot: int = 1000,
        say=print, sasrec=None, rivals: dict | None = None) -> tuple[ServedRanker, dict]:
    """Fit the sources and the ranker on ``ds`` (a Dataset: catalog.index/ids, interactions.frame) and decide
    on validation whether the ranker serves.

    Args:
        end: interactions per user left out at the end (a benchmark's test block); 0 for serving.
        sasrec: a SASRecConfig for the sequential source (default: the reference recipe).
        rivals: name -> a scorer of the validation :class:`~recsys.eval.splits.Rounds` (:func:`against_rival`):
            models outside the sources (the served two-tower) that the ranker must also beat to be chosen, each on
            the questions it did not learn from.
    Returns:
        the ranker (its ``report``: the sets, settings, candidate recall, validation figures and the verdict)
        and the validation results per model (``recsys.eval.evaluate.EvalResult`` by name, intervals over users).
    """
    from recsys.eval.evaluate import evaluate
    from recsys.eval.evaluate import paired_differences
    from recsys.eval.ranker import by_user, candidates, feature_names, score_ranking
    from recsys.eval.splits import rounds

    rc, idx = cfg.ranker, ds.catalog.index
    val = rounds(ds, end, end + rc.val_rounds, cfg.eval)
    train = rounds(ds, end + rc.val_rounds, end + rc.val_rounds + rc.train_rounds, cfg.eval)
    if not len(train.questions) or not len(val.questions):
        from recsys.errors import DataError

        raise DataError(f"too few interactions per user for the ranker's rounds ({rc.train_rounds} training and "
                         f"{rc.val_rounds} validation interactions after at least 2 of history)")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    say("ranker training questions: " + train.describe())
    inner = Sources.fit(idx, train.fit, train.questions, rc.ease_lambdas, sources=sources, sasrec=sasrec)
    c_train = candidates(inner, train.questions, rc.per_source, recent=cfg.features.recent_items)
    times["training_sources_and_candidates_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    say("validation questions: " + val.describe())
    outer = Sources.fit(idx, val.fit, val.questions, rc.ease_lambdas, sources=sources, sasrec=sasrec)
    c_val = candidates(outer, val.questions, rc.per_source, recent=cfg.features.recent_items)
    times["sources_and_candidates_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    model = LambdaRanker(seed=cfg.train.seed).fit(c_train, c_val)
    times["ranker_fit_s"] = round(time.perf_counter() - t0, 1)
    v = {name: by_user(evaluate(m, val.questions, idx, "loo-rounds", part="val", n_boot=1), val.owner, n_boot)
         for name, m in outer.models.items()}
    ranked = model.rank(c_val)
    v["ranker"] = score_ranking("ranker", ranked, val.questions, val.owner, len(idx), "val", n_boot)
    against = {name: against_rival(name, score, val, ranked, len(idx), n_boot, say) for name, score in (rivals or {}).items()}
    best, served = verdict({k: r.estimates["NDCG@10"].mean for k, r in v.items()}, against)
    [d] = paired_differences([v["ranker"], v[best]], "ranker", ("NDCG@10", "HR@10", "Recall@50"), n_boot).values()
    diff = {m: e.to_dict() for m, e in d.items()}
    names = feature_names(tuple(outer.models))
    gain = dict(zip(names, model.model.booster_.feature_importance("gain").tolist()))
    total = sum(gain.values()) or 1.0
    report = {
        "sets": {k: {"questions": len(r.questions), "users": len(set(r.owner)), "fit_interactions": r.fit.height}
                 for k, r in (("train", train), ("val", val))},
        "sources": list(outer.models), "rivals": against, "sequence_items": cfg.features.recent_items, "settings": {"served_sources": outer.settings, "ranker_training": inner.settings},
        "candidate_recall": {"train": round(c_train.recall, 4), "val": round(c_val.recall, 4), "slots": int(c_val.rows.shape[1])},
        "ranker": {"trees": model.trees, "curve_every_10_trees": model.curve[::10], "params": model.params, "features": names,
                   "gain_share": {k: round(g / total, 4) for k, g in sorted(gain.items(), key=lambda kv: -kv[1])}},
        "val": {k: {m: e.to_dict() for m, e in r.estimates.items()} for k, r in v.items()},
        "best_single_on_val": best, "served": served, "ranker_minus_best_single_val": diff, "times_s": times,
        "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    say("validation NDCG@10: " + ", ".join(f"{k} {r.estimates['NDCG@10']}" for k, r in v.items()) + f" -> serves: {served}")
    return ServedRanker(list(ds.catalog.ids), outer, model, report, rc.per_source), v
