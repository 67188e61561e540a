"""Baselines reported beside every model: popularity, ItemKNN, EASE, content kNN, random (SASRec: sasrec.py).

Each has ``fit(history)`` (interactions it may learn from) and ``score(eval_set, users)``; the user
side always comes from ``eval_set.history``, so refitting on train+validation before the test round
is one call.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from scipy import sparse

from recsys.eval.evaluate import evaluate, history_matrix
from recsys.eval.splits import EvalSet


class _MatrixModel:
    """Shared plumbing: the catalog index, and the user x item matrix of an eval set (cached)."""

    name = "base"

    def __init__(self, index: dict[str, int]):
        self.index = index
        self.n_items = len(index)
        self._rows: tuple[int, sparse.csr_matrix] | None = None

    def user_rows(self, eval_set: EvalSet, users: np.ndarray) -> sparse.csr_matrix:
        if self._rows is None or self._rows[0] != id(eval_set):
            self._rows = (id(eval_set), history_matrix(eval_set.history, eval_set.users, self.index, self.n_items))
        return self._rows[1][users]

    def item_matrix(self, history: pl.DataFrame) -> sparse.csr_matrix:
        users = history["user_id"].unique().sort().to_list()
        return history_matrix(history, users, self.index, self.n_items)


class Popularity(_MatrixModel):
    """Items ranked by how many users interacted with them."""

    name = "popularity"

    def fit(self, history: pl.DataFrame) -> "Popularity":
        counts = history.group_by("item_id").agg(pl.col("user_id").n_unique().alias("n"))
        self.counts = np.zeros(self.n_items, dtype=np.float32)
        self.counts[[self.index[i] for i in counts["item_id"].to_list()]] = counts["n"].to_numpy()
        return self

    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (users.size, self.n_items))

    def score_rows(self, rows: sparse.csr_matrix) -> np.ndarray:
        """(b, n_items) binary histories -> (b, n_items) scores (serving's path: no eval set)."""
        return np.broadcast_to(self.counts, (rows.shape[0], self.n_items))


class ItemKNN(_MatrixModel):
    """Cosine item-item similarity over who interacted with what; a user's score sums over their items."""

    name = "itemknn"

    def __init__(self, index: dict[str, int], neighbours: int = 100):
        super().__init__(index)
        self.neighbours = neighbours

    def fit(self, history: pl.DataFrame) -> "ItemKNN":
        X = self.item_matrix(history)
        norms = np.sqrt(np.asarray(X.sum(axis=0)).ravel()) + 1e-9
        Xn = X.multiply(1 / norms).tocsc()
        S = torch.from_numpy((Xn.T @ Xn).toarray().astype(np.float32))
        S.fill_diagonal_(0)
        if self.neighbours < S.shape[0]:  # keep each item's strongest neighbours
            thresh = S.topk(self.neighbours, dim=0).values[-1:]
            S = torch.where(S >= thresh, S, torch.zeros_like(S))
        self.S = S
        return self

    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        return self.score_rows(self.user_rows(eval_set, users))

    def score_rows(self, rows: sparse.csr_matrix) -> np.ndarray:
        """(b, n_items) binary histories -> (b, n_items) scores (serving's path: no eval set). ``S`` is dense
        after ``fit``, sparse once saved for serving (recsys/ranking.py: at most ``neighbours`` per item)."""
        if sparse.issparse(self.S):
            return (rows @ self.S).toarray().astype(np.float32)
        return (torch.from_numpy(rows.toarray()) @ self.S).numpy()


class EASE(_MatrixModel):
    """EASE (Steck 2019): closed-form item-item weights B = I - P / diag(P), P = (X'X + lambda I)^-1.

    With fewer users m than items n (ml-latest-small: 610 users, 9k items) the same P comes from the m x m
    dual (Woodbury): P = (I - X' K X) / lambda with K = (lambda I + X X')^-1, and a user's scores
    r B = r - r P / diag(P) never need the n x n matrix. ``solver``: "auto" (the smaller side), "primal" or
    "dual"; both give the same scores (a test checks it)."""

    name = "ease"

    def __init__(self, index: dict[str, int], lam: float = 500.0, solver: str = "auto"):
        super().__init__(index)
        if solver not in ("auto", "primal", "dual"):
            raise ValueError(f"EASE solver must be 'auto', 'primal' or 'dual', got {solver!r}")
        self.lam, self.solver = lam, solver

    def fit(self, history: pl.DataFrame) -> "EASE":
        X = self.item_matrix(history)
        active = np.flatnonzero(np.asarray(X.sum(axis=0)).ravel() > 0)  # items nobody touched get no weights
        Xa = X[:, active].tocsr()
        self.active, self.B, self.dual = active, None, None
        m, n = Xa.shape
        if self.solver == "dual" or (self.solver == "auto" and m < n):
            Xa = Xa.astype(np.float64)
            K = np.linalg.inv(self.lam * np.eye(m) + (Xa @ Xa.T).toarray())  # (m, m)
            KX = np.asarray(Xa.T @ K).T  # (m, n): K X
            d = 1.0 - np.asarray(Xa.multiply(KX).sum(axis=0)).ravel()  # lambda * diag(P), > 0
            self.dual = (Xa.T.tocsr(), KX, d)
            return self
        G = torch.from_numpy((Xa.T @ Xa).toarray().astype(np.float32))
        G.diagonal().add_(self.lam)
        P = torch.cholesky_inverse(torch.linalg.cholesky(G))
        B = -P / P.diagonal()
        B.fill_diagonal_(0)
        self.B = B
        return self

    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        return self.score_rows(self.user_rows(eval_set, users))

    def score_rows(self, rows: sparse.csr_matrix) -> np.ndarray:
        """(b, n_items) binary histories -> (b, n_items) scores (serving's path: no eval set). The dual's
        arithmetic is float64 after ``fit``; a served copy may hold it in float32 (recsys/ranking.py: half the
        time of the (m, n) product that dominates one request)."""
        rows = rows[:, self.active]
        out = np.zeros((rows.shape[0], self.n_items), dtype=np.float32)
        if self.dual is not None:
            Xt, KX, d = self.dual
            r = rows.astype(KX.dtype)
            dense = r.toarray()
            out[:, self.active] = dense - (dense - (r @ Xt).toarray() @ KX) / d  # r - r P / diag(P), both scaled by lambda
            return out
        out[:, self.active] = (torch.from_numpy(rows.toarray()) @ self.B).numpy()
        return out

    @classmethod
    def tuned(cls, index: dict[str, int], val: EvalSet, lambdas: list[float],
              protocol: str, train: pl.DataFrame | None = None) -> tuple["EASE", dict[float, float]]:
        """Pick lambda by validation NDCG@10 (fit on ``train``, default ``val.history``); returns the best model and the score of
        every lambda tried. Validation NDCG is unimodal in lambda, so a ternary search over the sorted grid
        finds its best value with about two thirds of the fits (each is a matrix inversion)."""
        grid = sorted(lambdas)
        scores: dict[float, float] = {}
        models: dict[float, EASE] = {}

        def score(i: int) -> float:
            lam = grid[i]
            if lam not in scores:
                models[lam] = cls(index, lam).fit(val.history if train is None else train)
                scores[lam] = evaluate(models[lam], val, index, protocol, part="val", n_boot=1).estimates["NDCG@10"].mean
            return scores[lam]

        lo, hi = 0, len(grid) - 1
        while hi - lo > 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if score(m1) < score(m2):
                lo = m1 + 1
            else:
                hi = m2 - 1 if score(m1) > score(m2) else m2
        best = max(range(lo, hi + 1), key=lambda i: (score(i), -i))
        return models[grid[best]], scores


class ContentKNN(_MatrixModel):
    """Cosine between each item's vector and the mean vector of the user's history items (item-kNN on content).

    ``has`` (optional, (n_items,) bool) marks the items that have a vector of this kind (image vectors exist for
    items with an image only): the others never rank above one that has it, and do not enter the profile."""

    name = "content-knn"

    def __init__(self, index: dict[str, int], item_vectors: np.ndarray, name: str | None = None,
                 has: np.ndarray | None = None):
        super().__init__(index)
        v = np.asarray(item_vectors, dtype=np.float32)
        self.has = np.ones(len(v), bool) if has is None else np.asarray(has, bool)
        self.V = np.where(self.has[:, None], v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12), 0.0).astype(np.float32)
        if name:
            self.name = name

    def fit(self, history: pl.DataFrame) -> "ContentKNN":
        return self

    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        rows = self.user_rows(eval_set, users)
        profile = rows @ self.V
        profile /= np.linalg.norm(profile, axis=1, keepdims=True) + 1e-12
        scores = profile @ self.V.T
        scores[:, ~self.has] = -2.0  # below every cosine: ranked after the items that have this kind of vector
        return scores


class Random(_MatrixModel):
    """A random ranking per user (seeded by the user's position in the eval set, so it does not depend on how
    users are batched). What popularity, EASE and id-based sequential models reduce to on items nobody has
    interacted with (the COLD protocol). Not one shared tie-break: with every score equal, the evaluation's
    tie-break would give every user of a batch the same ten items, and the row would measure their luck."""

    name = "random"

    def __init__(self, index: dict[str, int], name: str | None = None, seed: int = 0):
        super().__init__(index)
        self.seed = seed
        if name:
            self.name = name

    def fit(self, history: pl.DataFrame) -> "Random":
        return self

    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, int(u)]).random(self.n_items, dtype=np.float32)
                         for u in users]) if users.size else np.zeros((0, self.n_items), np.float32)
