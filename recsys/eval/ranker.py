"""The ranking stage over several candidate sources (the quality issue): candidates merged from EASE, SASRec,
item-kNN and popularity, then a LightGBM LambdaRank model that orders them.

Why several sources: each retriever sees the user differently (EASE the whole history as a set, SASRec its
order, item-kNN co-occurrence, popularity the crowd); a ranker that reads every source's score and rank, with
the item's popularity as of the question and its similarity to the user's latest items, can put the target
higher than any one of them. It is trained on many questions from the training window (each user's rounds
before the validation block, :func:`recsys.eval.splits.rounds`), with the sources fitted on the interactions
before those rounds, so that the scores it learns from look like the ones it will be given.

The sources are the evaluation's baselines (recsys.eval.baselines, recsys.eval.sasrec). :func:`rank_batch` is
the one path from histories to candidates and features: the evaluation calls it batch by batch
(:func:`candidates`), serving one request at a time (recsys/ranking.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import sparse

from recsys.eval.evaluate import EvalResult, history_matrix, score_topk
from recsys.eval.metrics import bootstrap
from recsys.eval.splits import EvalSet

SOURCES = ("ease", "sasrec", "itemknn", "popularity")
PER_SOURCE = ("score", "log_rank", "gap")  # each source's score, log(1 + rank), and its score minus the question's best
CONTEXT = ("log_pop_before", "log_pop_year", "log_age_days", "user_log_n", "knn_last3_max", "knn_last10_mean")
YEAR_S = 365 * 86400


def feature_names(sources: tuple[str, ...] = SOURCES) -> list[str]:
    return [f"{s}_{f}" for s in sources for f in PER_SOURCE] + list(CONTEXT)


@dataclass
class Sources:
    """The fitted candidate sources (each a Scorer: ``score(eval_set, users) -> (len(users), n_items)``) and what
    the context features read: the item-kNN similarity and the fit window's interactions by (item, time)."""

    index: dict[str, int]
    models: dict[str, object]
    knn: np.ndarray | sparse.csr_matrix  # (n_items, n_items) float32: item-kNN's similarities (recency features)
    keys: np.ndarray  # sorted int64 item * 2^34 + unix seconds of the fit window's interactions (as-of counts)
    settings: dict

    @property
    def max_len(self) -> int:
        """Positions of history the sequential source reads (1 without one)."""
        m = self.models.get("sasrec")
        return int(m.cfg.max_len) if m is not None else 1

    @classmethod
    def fit(cls, index: dict[str, int], fit: pl.DataFrame, val: EvalSet, lambdas: list[float],
            protocol: str = "loo", sources: tuple[str, ...] = SOURCES, sasrec=None) -> "Sources":
        """Fit every source on ``fit``; EASE's lambda and SASRec's epoch are chosen on ``val`` (its questions read
        their own histories). ``sasrec``: a SASRecConfig (default: the reference recipe)."""
        from recsys.eval.baselines import EASE, ItemKNN, Popularity
        from recsys.eval.sasrec import SASRec

        models: dict[str, object] = {}
        settings: dict = {}
        knn = ItemKNN(index).fit(fit)
        for name in sources:
            if name == "ease":
                models[name], _ = EASE.tuned(index, val, lambdas, protocol, train=fit)
                settings["ease_lambda"] = models[name].lam
            elif name == "sasrec":
                models[name] = (SASRec(index, sasrec, protocol) if sasrec else SASRec(index, protocol=protocol)).fit(val, train=fit)
                settings["sasrec"] = {"epochs": models[name].epochs, "curve": models[name].history}
            elif name == "itemknn":
                models[name] = knn
            elif name == "popularity":
                models[name] = Popularity(index).fit(fit)
            else:
                raise ValueError(f"unknown candidate source {name!r} (expected one of {SOURCES})")
        items = np.array([index[i] for i in fit["item_id"].to_list()], dtype=np.int64)
        keys = np.sort(items << 34 | fit["timestamp"].dt.epoch("s").to_numpy().astype(np.int64))
        return cls(index, models, knn.S.numpy(), keys, settings)


@dataclass
class CandidateSet:
    """Q questions, N candidate slots each: rows (Q, N) catalog rows (-1 = empty), x (Q, N, F) features,
    y (Q, N) whether the slot holds one of the question's targets."""

    rows: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @property
    def recall(self) -> float:
        """Share of questions with a target among their candidates (the ranker's ceiling)."""
        return float(self.y.any(1).mean()) if len(self.y) else 0.0


@dataclass
class Histories:
    """b users' inputs as the sources read them.

    seen: (b, n_items) binary CSR of what each user had (EASE, item-kNN; never a candidate); seq: (b, L) their
    latest rows in time order, left-padded with n_items (SASRec); last: (b, 10) their 10 latest rows (-1 pad);
    n: (b,) history lengths; at: (b,) unix seconds the questions are asked at."""

    seen: sparse.csr_matrix
    seq: np.ndarray
    last: np.ndarray
    n: np.ndarray
    at: np.ndarray

    @classmethod
    def of(cls, questions: EvalSet, users: np.ndarray, index: dict[str, int], max_len: int,
           seen: sparse.csr_matrix, latest: dict, recent: int | None = None) -> "Histories":
        """The batch ``users`` of an eval set (``seen`` and ``latest`` computed once for the whole set); ``recent``:
        the sequence holds only that many latest items (what the online store keeps, features.recent_items)."""
        from recsys.eval.sasrec import sequences

        n_items = len(index)
        last = np.full((users.size, 10), -1, np.int64)
        n_hist = np.zeros(users.size)
        for r, u in enumerate(users):
            info = latest.get(questions.users[u])
            if info:
                items = [index[i] for i in info["item_id"]][-min(10, recent or 10):]  # online: from the recent ids
                last[r, 10 - len(items):] = items
                n_hist[r] = info["n"]
        keep = min(max_len, recent or max_len)
        seq = np.full((users.size, max_len), n_items, np.int64)
        seq[:, -keep:] = sequences(questions.history, [questions.users[u] for u in users], index, keep, n_items)
        at = pl.Series([questions.at[u] for u in users]).dt.epoch("s").to_numpy().astype(np.int64)
        return cls(seen[users], seq, last, n_hist, at)

    @classmethod
    def one(cls, seq: np.ndarray, seen: np.ndarray, n: int, at: float, n_items: int, max_len: int) -> "Histories":
        """One request: ``seq`` its user's latest rows in time order (any length), ``seen`` every row they had."""
        rows = np.unique(np.concatenate([seen, seq]).astype(np.int64))
        padded = np.full((1, max_len), n_items, np.int64)
        tail = seq[-max_len:]
        if tail.size:
            padded[0, -tail.size:] = tail
        last = np.full((1, 10), -1, np.int64)
        if seq.size:
            last[0, -min(10, seq.size):] = seq[-10:]
        seen_m = sparse.csr_matrix((np.ones(rows.size, np.float32), (np.zeros(rows.size, np.int64), rows)), shape=(1, n_items))
        return cls(seen_m, padded, last, np.array([float(n)]), np.array([int(at)], np.int64))

    @classmethod
    def stack(cls, parts: list["Histories"]) -> "Histories":
        """Several requests' histories as one batch (rows in order)."""
        return cls(sparse.vstack([p.seen for p in parts], format="csr"), np.vstack([p.seq for p in parts]),
                   np.vstack([p.last for p in parts]), np.concatenate([p.n for p in parts]),
                   np.concatenate([p.at for p in parts]))


def source_scores(src: Sources, h: Histories) -> dict[str, np.ndarray]:
    """Each source's (b, n_items) float32 scores for these histories, seen items at -inf."""
    out = {}
    ex = h.seen.nonzero()
    for name, m in src.models.items():
        s = np.array(m.score_seqs(h.seq) if name == "sasrec" else m.score_rows(h.seen), dtype=np.float32)
        s[ex] = -np.inf
        out[name] = s
    return out


def rank_batch(src: Sources, h: Histories, per_source: int = 50, block: np.ndarray | None = None,
               scores: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The merged candidates of b questions and their features: each source's top ``per_source`` (seen items
    never; nor the ``block`` (b, n_items) bool items, a request's own exclusions, which leave every rank as it
    is), first seen first in source order. ``scores``: :func:`source_scores` of ``h``, where already computed.

    Returns:
        rows (b, N) catalog rows (-1: an empty slot, where the sources agree), x (b, N, F) features
        (:func:`feature_names`), N = sources x ``per_source``.
    """
    scores = source_scores(src, h) if scores is None else scores
    names = list(scores)
    b, n_items = h.seen.shape
    N = len(names) * per_source
    K = min(per_source, n_items)
    ranks, tops = {}, []
    for name in names:
        s = scores[name]
        ranks[name] = np.sort(s, axis=1)  # ascending: a candidate's rank is the number of items scored above it
        pick = s if block is None else np.where(block, -np.inf, s)
        part = np.argpartition(-pick, K - 1, axis=1)[:, :K] if K < n_items else np.broadcast_to(np.arange(n_items), (b, n_items))
        ps = np.take_along_axis(pick, part, 1)
        top = np.take_along_axis(part, np.lexsort((part, -ps), axis=1), 1)  # best first, ties by row
        tops.append(np.where(np.isfinite(np.take_along_axis(pick, top, 1)), top, -1))  # never a seen or blocked item
    merged = np.concatenate(tops, 1)
    rows = np.full((b, N), -1, np.int64)
    for r in range(b):
        row = merged[r][merged[r] >= 0]
        _, first = np.unique(row, return_index=True)
        rows[r, : first.size] = row[np.sort(first)]
    c = np.where(rows >= 0, rows, 0)
    cols = []
    for name in names:
        sc = np.take_along_axis(scores[name], c, 1)
        best = scores[name].max(1, keepdims=True)
        above = n_items - np.stack([np.searchsorted(ranks[name][r], sc[r], side="right") for r in range(b)])
        cols += [sc, np.log1p(above), sc - best]
    cols += _context(src, h, c)
    x = np.stack(cols, -1).astype(np.float32)
    x[rows < 0] = 0
    x[~np.isfinite(x)] = 0
    return rows, x


def candidates(src: Sources, questions: EvalSet, per_source: int = 50, batch: int = 256,
               recent: int | None = None) -> CandidateSet:
    """Each source's top ``per_source`` (seen items never), merged per question, with their features
    (:func:`rank_batch`, batch by batch). ``recent``: the sequential source reads only that many latest items,
    as it does online (:meth:`Histories.of`).

    Returns a :class:`CandidateSet` whose N is the number of sources times ``per_source``; where the sources agree
    a question fills fewer slots (the rest are -1 with zero features)."""
    names = list(src.models)
    n_items, Q, N = len(src.index), len(questions), len(names) * per_source
    seen = history_matrix(questions.history, questions.users, src.index, n_items)
    latest = dict(questions.history.group_by("user_id", maintain_order=True)
                  .agg(pl.col("item_id").tail(10), pl.len().alias("n")).select("user_id", pl.struct("item_id", "n")).iter_rows())
    rows = np.full((Q, N), -1, np.int64)
    x = np.zeros((Q, N, len(feature_names(tuple(names)))), np.float32)
    for start in range(0, Q, batch):
        users = np.arange(start, min(start + batch, Q))
        h = Histories.of(questions, users, src.index, src.max_len, seen, latest, recent)
        rows[users], x[users] = rank_batch(src, h, per_source)
    y = np.stack([np.isin(rows[q], questions.targets[q]) & (rows[q] >= 0) for q in range(Q)]) if Q else np.zeros((0, N), bool)
    return CandidateSet(rows, x, y)


def _context(src: Sources, h: Histories, c: np.ndarray) -> list[np.ndarray]:
    """The context features of candidates ``c`` (b, N): the item's interactions in the fit window before the
    question (all, and in the year before), its age then, the user's history length, and its item-kNN
    similarity to the user's latest items."""
    at, b = h.at, c.shape[0]
    base = c << 34
    now = np.searchsorted(src.keys, base | at[:, None])
    begin = np.searchsorted(src.keys, base)
    year = np.searchsorted(src.keys, base | np.maximum(at - YEAR_S, 0)[:, None])
    first = (src.keys[np.minimum(begin, src.keys.size - 1)] & ((1 << 34) - 1)) if src.keys.size else np.zeros_like(c)
    n_before = now - begin
    age = np.where(n_before > 0, np.log1p(np.maximum(at[:, None] - first, 0) / 86400), 0.0)
    last = h.last
    picked = src.knn[np.where(last >= 0, last, 0).ravel()]
    sims = (picked.toarray() if sparse.issparse(picked) else np.asarray(picked)).reshape(b, 10, -1)
    sims[last < 0] = np.nan
    at_c = np.take_along_axis(sims, np.broadcast_to(c[:, None, :], (b, 10, c.shape[1])), 2)  # (b, 10, N)
    with np.errstate(all="ignore"):
        last3 = np.nan_to_num(np.nanmax(at_c[:, -3:], 1))
        last10 = np.nan_to_num(np.nanmean(at_c, 1))
    return [np.log1p(n_before), np.log1p(now - year), age, np.broadcast_to(np.log1p(h.n)[:, None], c.shape),
            last3, last10]


class LambdaRanker:
    """LightGBM LambdaRank over a :class:`CandidateSet` (one group per question that has a target among its
    candidates); the number of trees is chosen by early stopping on a validation set's NDCG@10."""

    def __init__(self, seed: int = 0, n_estimators: int = 2000, learning_rate: float = 0.03, num_leaves: int = 31,
                 min_child_samples: int = 100, stopping: int = 100):
        self.params = dict(objective="lambdarank", n_estimators=n_estimators, learning_rate=learning_rate,
                           num_leaves=num_leaves, min_child_samples=min_child_samples, subsample=0.8, subsample_freq=1,
                           colsample_bytree=0.8, reg_lambda=1.0, random_state=seed, verbose=-1)
        self.stopping = stopping
        self.model = None
        self.curve: list[float] = []  # validation NDCG@10 (within candidates) per tree

    @staticmethod
    def _flat(cs: CandidateSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = np.flatnonzero(cs.y.any(1))
        valid = cs.rows[keep] >= 0
        return cs.x[keep][valid], cs.y[keep][valid].astype(np.int32), valid.sum(1)

    def fit(self, train: CandidateSet, val: CandidateSet) -> "LambdaRanker":
        import lightgbm

        X, y, g = self._flat(train)
        if not len(g):
            raise ValueError("no training question has its target among the candidates")
        Xv, yv, gv = self._flat(val)
        log: dict = {}
        self.model = lightgbm.LGBMRanker(**self.params)
        self.model.fit(X, y, group=g, eval_X=(Xv,), eval_y=(yv,), eval_group=[gv], eval_at=[10],
                       callbacks=[lightgbm.early_stopping(self.stopping, verbose=False), lightgbm.record_evaluation(log)])
        self.curve = [round(v, 5) for v in log["valid_0"]["ndcg@10"]]
        return self

    @property
    def trees(self) -> int:
        return int(self.model.best_iteration_ or self.params["n_estimators"])

    def scores(self, x: np.ndarray, threads: int = 0) -> np.ndarray:
        """(n, F) features -> (n,) scores, higher first. ``threads=1`` for one request's candidates (a thread pool
        costs more than it saves on 200 rows); 0: LightGBM's default, for offline batches."""
        return self.model.booster_.predict(x, num_iteration=self.trees, num_threads=threads)

    def rank(self, cs: CandidateSet, k: int = 50) -> np.ndarray:
        """(Q, k) catalog rows in the model's order (-1 where fewer candidates)."""
        Q, N, F = cs.x.shape
        p = self.scores(cs.x.reshape(Q * N, F)).reshape(Q, N)
        p[cs.rows < 0] = -np.inf
        order = np.argsort(-p, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cs.rows, order, 1)


def by_user(result: EvalResult, owner: list[str], n_boot: int = 1000, seed: int = 0) -> EvalResult:
    """Per-question metrics averaged per real user, with the bootstrap over users (questions of one user are
    not independent draws)."""
    per_user = result.per_user.with_columns(pl.Series("user_id", owner)).group_by("user_id", maintain_order=True).mean()
    estimates = {m: bootstrap(per_user[m].to_numpy(), n_boot=n_boot, seed=seed) for m in result.estimates}
    return EvalResult(result.model, result.protocol, result.part, per_user, result.coverage10, estimates, result.topk)


def score_ranking(name: str, rows: np.ndarray, questions: EvalSet, owner: list[str], n_items: int, part: str,
                  n_boot: int = 1000) -> EvalResult:
    """A ranking's metrics per user (``rows`` (Q, >=50) catalog rows, -1 = none)."""
    if rows.shape[1] < 50:
        rows = np.concatenate([rows, np.full((len(rows), 50 - rows.shape[1]), -1, rows.dtype)], 1)
    return by_user(score_topk(name, rows, questions, n_items, "loo-rounds", part, n_boot=1), owner, n_boot)
