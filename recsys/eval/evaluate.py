"""Full-ranking evaluation: score every candidate item, drop what the user has seen, take the top k.

A model is anything with ``name`` and ``score(eval_set, users) -> (len(users), n_items) float`` (see
:class:`Scorer`); the same function evaluates the baselines, the two-tower and the served pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import polars as pl
from scipy import sparse

from recsys.eval.metrics import Estimate, bootstrap, coverage, hit_rate, ndcg, recall
from recsys.eval.splits import EvalSet

METRICS = ("HR@10", "Recall@10", "Recall@50", "NDCG@10")


class Scorer(Protocol):
    name: str

    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        """Scores for ``eval_set.users[users]`` over the whole catalog: (len(users), n_items)."""
        ...


def history_matrix(history: pl.DataFrame, users: list[str], index: dict[str, int], n_items: int) -> sparse.csr_matrix:
    """(n_users, n_items) binary CSR of who interacted with what in ``history`` (rows in ``users`` order)."""
    row_of = {u: r for r, u in enumerate(users)}
    pairs = history.select("user_id", "item_id").filter(pl.col("user_id").is_in(list(row_of))).unique()
    rows = np.fromiter((row_of[u] for u in pairs["user_id"].to_list()), dtype=np.int64, count=pairs.height)
    cols = np.fromiter((index[i] for i in pairs["item_id"].to_list()), dtype=np.int64, count=pairs.height)
    data = np.ones(rows.size, dtype=np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(users), n_items))


def top_k(scores: np.ndarray, exclude: sparse.csr_matrix, candidates: np.ndarray | None, k: int,
          rng: np.random.Generator) -> np.ndarray:
    """Top-k item indices per row, seen items excluded, ties broken at random.

    Args:
        scores: (n_users, n_items) float.
        exclude: (n_users, n_items) CSR; nonzero = already seen, never recommended.
        candidates: item indices allowed in the ranking (None = all).
    Returns:
        (n_users, k) int64 item indices, best first.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    if candidates is not None:
        allowed = np.full(scores.shape[1], -np.inf)
        allowed[candidates] = 0.0
        scores += allowed
    rows, cols = exclude.nonzero()
    scores[rows, cols] = -np.inf
    # A random permutation of the columns breaks ties fairly (argpartition would favour low indices).
    perm = rng.permutation(scores.shape[1])
    shuffled = scores[:, perm]
    k = min(k, shuffled.shape[1])
    part = np.argpartition(-shuffled, k - 1, axis=1)[:, :k]
    # Which of several values equal to the k-th argpartition keeps depends on the CPU's sort routine (numpy's
    # AVX-512 and AVX2 builds differ): rows where such ties straddle the cut take the first ones in the seeded
    # order, and ties inside the top k keep that order too, so the ranking is the same on every machine.
    kth = np.take_along_axis(shuffled, part, axis=1).min(axis=1, keepdims=True)
    straddle = np.flatnonzero((shuffled >= kth).sum(axis=1) > k)
    if straddle.size:
        part[straddle] = np.argsort(-shuffled[straddle], axis=1, kind="stable")[:, :k]
    part = np.sort(part, axis=1)
    order = np.argsort(-np.take_along_axis(shuffled, part, axis=1), axis=1, kind="stable")
    return perm[np.take_along_axis(part, order, axis=1)]


@dataclass
class EvalResult:
    """Per-user metrics and their bootstrap estimates for one model on one eval set."""

    model: str
    protocol: str
    part: str  # "val" or "test"
    per_user: pl.DataFrame  # user_id + one column per metric
    coverage10: float
    estimates: dict[str, Estimate] = field(default_factory=dict)
    topk: np.ndarray | None = None

    def row(self) -> dict[str, object]:
        return {"model": self.model, "protocol": self.protocol, "users": self.per_user.height,
                **{m: self.estimates[m] for m in METRICS}, "Coverage@10": self.coverage10}


def evaluate(model: Scorer, eval_set: EvalSet, index: dict[str, int], protocol: str, part: str = "test",
             n_boot: int = 1000, seed: int = 0, batch_users: int = 1024, keep_topk: bool = False,
             exclude=None) -> EvalResult:
    """Rank the whole catalog (or ``eval_set.candidates``) for every user and score the top 50.

    Args:
        exclude: (n_users, n_items) sparse, the items never to rank (default: each user's ``eval_set.history``;
            a probe that hides part of the history from the model passes the full one)."""
    n_items = len(index)
    rng = np.random.default_rng(seed)
    if exclude is None:
        exclude = history_matrix(eval_set.history, eval_set.users, index, n_items)
    tops = []
    for start in range(0, len(eval_set), batch_users):
        users = np.arange(start, min(start + batch_users, len(eval_set)))
        scores = model.score(eval_set, users)
        if scores.shape != (users.size, n_items):
            raise ValueError(f"{model.name}: scores of shape {scores.shape}, expected {(users.size, n_items)}")
        tops.append(top_k(scores, exclude[users], eval_set.candidates, 50, rng))
    topk = np.concatenate(tops) if tops else np.zeros((0, 50), dtype=np.int64)
    n_cand = n_items if eval_set.candidates is None else eval_set.candidates.size
    return score_topk(model.name, topk, eval_set, n_cand, protocol, part, n_boot, seed, keep_topk)


def score_topk(name: str, topk: np.ndarray, eval_set: EvalSet, n_candidates: int, protocol: str, part: str = "test",
               n_boot: int = 1000, seed: int = 0, keep_topk: bool = False) -> EvalResult:
    """Metrics of given rankings (e.g. from a FAISS search): ``topk`` (n_users, >=50) catalog rows, -1 = none."""
    t = eval_set.targets
    values = {
        "HR@10": hit_rate(topk, t, 10),
        "Recall@10": recall(topk, t, 10),
        "Recall@50": recall(topk, t, 50),
        "NDCG@10": ndcg(topk, t, 10),
    }
    per_user = pl.DataFrame({"user_id": eval_set.users, **values})
    estimates = {m: bootstrap(v, n_boot=n_boot, seed=seed) for m, v in values.items()}
    return EvalResult(name, protocol, part, per_user, coverage(topk, 10, n_candidates), estimates,
                      topk if keep_topk else None)


def paired_differences(results: list[EvalResult], reference: str = "two-tower",
                       metrics: tuple[str, ...] = ("HR@10", "NDCG@10"), n_boot: int = 1000) -> dict[str, dict[str, Estimate]]:
    """``reference`` minus every other model, per metric: the mean of per-user differences over the same users
    with a paired bootstrap interval (tighter than comparing two marginal intervals). {model: {metric: Estimate}}."""
    from recsys.eval.metrics import paired_bootstrap_diff

    ref = next((r for r in results if r.model == reference), None)
    if ref is None:
        return {}
    out: dict[str, dict[str, Estimate]] = {}
    for other in results:
        if other is ref or other.part != ref.part:
            continue
        joined = ref.per_user.join(other.per_user, on="user_id", suffix="_other")
        out[other.model] = {m: paired_bootstrap_diff(joined[m].to_numpy(), joined[f"{m}_other"].to_numpy(), n_boot)
                            for m in metrics}
    return out
