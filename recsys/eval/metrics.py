"""Ranking metrics over full rankings, with bootstrap confidence intervals over users.

All functions take ``topk`` (n_users, K) item indices in rank order and ``targets`` (a list of
arrays of relevant item indices per user); they return one value per user so results can be
resampled, compared per user (A/B) and segmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _hits(topk: np.ndarray, targets: list[np.ndarray], k: int) -> np.ndarray:
    """(n_users, k) bool: is the item at each rank relevant."""
    out = np.zeros((topk.shape[0], k), dtype=bool)  # rankings shorter than k count as misses beyond their end
    width = min(k, topk.shape[1])
    for u, t in enumerate(targets):
        out[u, :width] = np.isin(topk[u, :width], t)
    return out


def hit_rate(topk: np.ndarray, targets: list[np.ndarray], k: int) -> np.ndarray:
    """1 if any relevant item is in the top k (HR@k; equals Recall@k with one target)."""
    return _hits(topk, targets, k).any(axis=1).astype(np.float64)


def recall(topk: np.ndarray, targets: list[np.ndarray], k: int) -> np.ndarray:
    """Share of the user's relevant items found in the top k."""
    n_rel = np.array([len(t) for t in targets], dtype=np.float64)
    return _hits(topk, targets, k).sum(axis=1) / np.maximum(n_rel, 1)


def ndcg(topk: np.ndarray, targets: list[np.ndarray], k: int) -> np.ndarray:
    """Binary-relevance NDCG@k: DCG of the ranking over the DCG of a perfect one."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (_hits(topk, targets, k) * discounts).sum(axis=1)
    ideal = np.array([discounts[: min(len(t), k)].sum() for t in targets])
    return dcg / np.maximum(ideal, 1e-12)


def coverage(topk: np.ndarray, k: int, n_candidates: int) -> float:
    """Share of the rankable items that appear in at least one user's top k (-1 = an empty slot)."""
    shown = np.unique(topk[:, :k])
    return float((shown >= 0).sum() / max(n_candidates, 1))


@dataclass(frozen=True)
class Estimate:
    """A mean over users with a bootstrap (percentile) confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict:
        """What records keep: {"mean", "low", "high"}."""
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-user values and its percentile bootstrap interval (users resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 100):  # in blocks, to bound memory for large user counts
        stop = min(start + 100, n_boot)
        means[start:stop] = values[rng.integers(0, n, (stop - start, n))].mean(axis=1)
    alpha = (1 - level) / 2
    return Estimate(float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), n)


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Mean of per-user differences a - b (same users, same order) with a bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same users: {a.shape} vs {b.shape}")
    return bootstrap(a - b, n_boot=n_boot, seed=seed)


def item_bootstrap_diff(topk_a: np.ndarray, topk_b: np.ndarray, targets: list[np.ndarray], metric: str = "Recall@50",
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean over users of ``metric`` of rankings a minus rankings b, with an interval from resampling the
    *target items* (with replacement) instead of the users: how much the difference depends on which items
    happened to be the targets. COLD holds out a few hundred items and a handful of popular ones carry most
    users' targets, so two models can swap places between two draws of items while the user-resampled interval
    looks tight. In a resample an item drawn c times counts c times in each of its users' targets; users left
    without a target drop out.

    Args:
        topk_a, topk_b: (n_users, >=K) ranked catalog rows of the two models, same users in the same order.
        targets: each user's target rows.
        metric: "Recall@K" or "HR@K".
    """
    from scipy import sparse

    name, k = metric.split("@")
    k = int(k)
    if name not in ("Recall", "HR"):
        raise ValueError(f"item-resampled intervals support Recall@K and HR@K, not {metric}")
    rows = np.concatenate([np.asarray(t, np.int64) for t in targets] or [np.zeros(0, np.int64)])
    items, codes = np.unique(rows, return_inverse=True)
    n_users = len(targets)
    user_of = np.repeat(np.arange(n_users), [len(t) for t in targets])

    def hit_matrix(topk: np.ndarray) -> "sparse.csr_matrix":
        hit = np.array([r in topk[u, :k] for u, r in zip(user_of, rows)], dtype=np.float64)
        return sparse.csr_matrix((hit, (user_of, codes)), shape=(n_users, items.size))

    has = sparse.csr_matrix((np.ones(rows.size), (user_of, codes)), shape=(n_users, items.size))
    ha, hb = hit_matrix(topk_a), hit_matrix(topk_b)

    def diff(weights: np.ndarray) -> np.ndarray:
        """(n_items, B) item counts -> (B,) mean difference over the users who keep a target."""
        denom, na, nb = has @ weights, ha @ weights, hb @ weights
        keep = denom > 0
        if name == "Recall":
            per = (na - nb) / np.where(keep, denom, 1)
        else:
            per = (na > 0).astype(np.float64) - (nb > 0)
        return (per * keep).sum(0) / np.maximum(keep.sum(0), 1)

    point = float(diff(np.ones((items.size, 1)))[0])
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for start in range(0, n_boot, 100):
        b = min(100, n_boot - start)
        counts = np.stack([np.bincount(rng.integers(0, items.size, items.size), minlength=items.size) for _ in range(b)], 1)
        draws[start:start + b] = diff(counts.astype(np.float64))
    alpha = (1 - level) / 2
    return Estimate(point, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)), n_users)
