"""The reranker: a learned ranking model over the FAISS candidates.

For each (user, candidate) it reads the retrieval score and rank, the item's popularity and age, the
cosine between the item's multimodal vector and the user's history vector, and the user's activity;
a gradient-boosted classifier (scikit-learn) trained on the validation round's candidates predicts
which candidate the user engages with next. Falls back to the retrieval order when untrained.

Whether it helps is itself decided on validation: ``Reranker.check`` cross-fits it over folds of the
validation users (no user is scored by a model that saw it) and compares NDCG@10 with the retrieval order;
a reranker that does not beat retrieval is kept for inspection but not used by default in serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.contract import ITEM_STATS, user_stat

FEATURES = ("retrieval_score", "retrieval_rank", "log_pop_all", "log_pop_30d", "log_age", "content_sim",
            "user_log_n", "has_image", "has_audio", "has_video")


@dataclass
class Candidates:
    """Candidates for U users, N each.

    rows/scores: (U, N) catalog rows (-1 = empty slot) and retrieval scores, best first.
    user_history: (U, D) history vectors in the embedder's space; user_stats: (U, len(USER_STATS)).
    item_stats: (U, N, len(ITEM_STATS)) the candidates' statistics (columns: recsys.contract) as of query time; item_content: (U, N, D) their vectors.
    """

    rows: np.ndarray
    scores: np.ndarray
    user_history: np.ndarray
    user_stats: np.ndarray
    item_stats: np.ndarray
    item_content: np.ndarray

    @classmethod
    def gather(cls, rows, scores, user_history, user_stats, stats_table: np.ndarray, content_table: np.ndarray) -> "Candidates":
        """Build from catalog-wide tables (n_items, len(ITEM_STATS)) and (n_items, D)."""
        r = np.where(rows >= 0, rows, 0)
        return cls(rows, scores, user_history, user_stats, stats_table[r], content_table[r])

    def subset(self, users: np.ndarray) -> "Candidates":
        return Candidates(self.rows[users], self.scores[users], self.user_history[users], self.user_stats[users],
                          self.item_stats[users], self.item_content[users])

    def features(self) -> np.ndarray:
        """(U * N, len(FEATURES)) float32; rows for empty slots are zeros."""
        U, N = self.rows.shape
        st = self.item_stats
        sim = np.einsum("und,ud->un", self.item_content, self.user_history)
        col = {name: st[..., j] for j, name in enumerate(ITEM_STATS)}
        user_n = self.user_stats[:, user_stat("log_n_interactions")][:, None]
        cols = [self.scores, np.broadcast_to(np.arange(N) / N, (U, N)), col["log_pop_all"], col["log_pop_30d"],
                col["log_age_days"], sim, np.broadcast_to(user_n, (U, N)), col["has_image"], col["has_audio"],
                col["has_video"]]
        x = np.stack(cols, -1).astype(np.float32)
        x[self.rows < 0] = 0
        x[~np.isfinite(x)] = 0
        return x.reshape(U * N, -1)


@dataclass(frozen=True)
class RerankCheck:
    """Validation NDCG@10 of the retrieval order and of the cross-fitted reranker over the same users."""

    retrieval_ndcg10: float
    reranked_ndcg10: float
    users: int
    folds: int

    @property
    def helps(self) -> bool:
        return self.reranked_ndcg10 > self.retrieval_ndcg10

    def to_dict(self) -> dict:
        return {"retrieval_ndcg10": round(self.retrieval_ndcg10, 4), "reranked_ndcg10": round(self.reranked_ndcg10, 4),
                "users": self.users, "folds": self.folds, "helps": self.helps}


MIN_USERS = 5  # validation users with a target among their candidates, below which no reranker is fitted


class Reranker:
    def __init__(self, max_iter: int = 200, seed: int = 0):
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.max_iter, self.seed = max_iter, seed
        self.model = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=0.05, max_leaf_nodes=31,
                                                    l2_regularization=1.0, random_state=seed)
        self.fitted = False
        self.validation: RerankCheck | None = None

    @property
    def helps(self) -> bool:
        """Use by default only where validation showed a gain (unchecked: trust it, as before checks)."""
        return self.fitted and (self.validation is None or self.validation.helps)

    def check(self, cands: Candidates, targets: list[np.ndarray], folds: int = 2) -> RerankCheck:
        """Cross-fit over ``folds`` random folds of these users: fit on the others, rerank the fold; record
        NDCG@10 against the retrieval order on the same users in ``self.validation``."""
        from recsys.eval.metrics import ndcg

        U = cands.rows.shape[0]
        fold = np.random.default_rng(self.seed).integers(folds, size=U)
        reranked = cands.rows[:, :10].copy()
        for f in range(folds):
            inside, outside = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            other = Reranker(self.max_iter, self.seed).fit(cands.subset(outside), [targets[u] for u in outside])
            if len(inside):
                reranked[inside] = other.rerank(cands.subset(inside), 10)[0]
        self.validation = RerankCheck(float(ndcg(cands.rows[:, :10], targets, 10).mean()) if U else 0.0,
                                      float(ndcg(reranked, targets, 10).mean()) if U else 0.0, U, folds)
        return self.validation

    def fit(self, cands: Candidates, targets: list[np.ndarray]) -> "Reranker":
        """Label = the candidate is one of the user's targets (only users with a target among candidates).
        Fewer than 5 such users (small or sparse data, an empty cross-fitting fold) leave it unfitted: the
        retrieval order stands."""
        if not len(targets):
            return self
        y = np.stack([np.isin(cands.rows[u], t) for u, t in enumerate(targets)])
        has = y.any(1)
        if has.sum() < MIN_USERS:
            return self
        self.model.fit(cands.subset(np.flatnonzero(has)).features(), y[has].ravel())
        self.fitted = True
        return self

    def rerank(self, cands: Candidates, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(U, k) rows and scores, reordered by the model (retrieval order when unfitted)."""
        if not self.fitted:
            return cands.rows[:, :k], cands.scores[:, :k]
        U, N = cands.rows.shape
        p = self.model.predict_proba(cands.features())[:, 1].reshape(U, N)
        p[cands.rows < 0] = -np.inf
        order = np.argsort(-p, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cands.rows, order, 1), np.take_along_axis(p, order, 1)

    def save(self, path: str | Path) -> None:
        import joblib

        joblib.dump({"model": self.model, "fitted": self.fitted, "features": FEATURES,
                     "validation": self.validation.to_dict() if self.validation else None}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Reranker":
        import joblib

        blob = joblib.load(path)
        r = cls.__new__(cls)
        r.model, r.fitted = blob["model"], blob["fitted"]
        v = blob.get("validation")
        r.validation = RerankCheck(v["retrieval_ndcg10"], v["reranked_ndcg10"], v["users"], v["folds"]) if v else None
        return r
