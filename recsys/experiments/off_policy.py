"""Off-policy evaluation from logs with exploration: what another ranking policy would have earned on the
requests a softmax-exploring arm served (IPS, self-normalised IPS, doubly robust), with intervals that resample
users. The logging policy's propensities are in the exposure log (recsys.experiments.policy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.experiments.analysis import ExperimentData, per_request
from recsys.experiments.policy import inclusion_probs, request_rng


@dataclass
class OPEResult:
    estimator: str
    value: float
    low: float
    high: float


def ope_terms(d: ExperimentData, target_temperature: float | None, k: int | None = None) -> pl.DataFrame:
    """Per logged request: the IPS term sum_i r_i w_i, the weight sum sum_i w_i, and the doubly robust term,
    for a target policy over the same candidate pool (greedy top-k when ``target_temperature`` is None,
    else softmax at that temperature). w_i = P_target(i in list) / P_logging(i in list), item-level: unbiased
    when engagement with an item does not depend on the rest of the list (no position bias).

    The reward model of the doubly robust estimator is a logistic regression of engagement on the item's
    pool score and pool rank, fitted on the logged exposures."""
    from sklearn.linear_model import LogisticRegression

    e = d.exposures.filter(pl.col("pool_items").is_not_null())
    if e.is_empty():
        raise ValueError("no exploration in these logs (run the service with experiment.explore = 'softmax')")
    clicked = set(zip(d.outcomes["request_id"].to_list(), d.outcomes["item_id"].to_list()))
    # the reward model: features of shown items
    xs, ys = [], []
    for row in e.iter_rows(named=True):
        rank = {i: j for j, i in enumerate(row["pool_items"])}
        sc = dict(zip(row["pool_items"], row["pool_scores"]))
        for i in row["items"]:
            xs.append(_features(sc[i], rank[i]))
            ys.append(float((row["request_id"], i) in clicked))
    ys = np.array(ys)
    model = LogisticRegression(max_iter=1000).fit(np.array(xs), ys) if 0 < ys.sum() < len(ys) else None
    out = []
    for row in e.iter_rows(named=True):
        pool, scores = row["pool_items"], np.array(row["pool_scores"])
        kk = k or len(row["items"])
        p_target = inclusion_probs(scores, kk, target_temperature, request_rng(row["request_id"] + "/target"))
        feats = np.array([_features(s, j) for j, s in enumerate(scores)])
        r_hat = model.predict_proba(feats)[:, 1] if model is not None else np.full(len(pool), ys.mean() if len(ys) else 0.0)
        at = {i: j for j, i in enumerate(pool)}
        ips = wsum = dr_corr = 0.0
        for i, p0 in zip(row["items"], row["propensities"]):
            j = at[i]
            w = p_target[j] / p0
            r = float((row["request_id"], i) in clicked)
            ips += w * r
            wsum += w
            dr_corr += w * (r - r_hat[j])
        out.append({"request_id": row["request_id"], "user_id": row["user_id"], "ips": ips, "wsum": wsum, "k": kk,
                    "dm": float((p_target * r_hat).sum()), "dr": float((p_target * r_hat).sum() + dr_corr)})
    return pl.DataFrame(out)


def _features(score: float, rank: int) -> list[float]:
    return [score, np.log1p(rank)]


def ope_estimates(terms: pl.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> list[OPEResult]:
    """IPS, SNIPS and DR values per request (mean engaged items per reply) with bootstrap intervals that resample
    users, not requests: a returning user's requests are not independent, and an interval over requests would
    be too narrow."""
    ips, w, dr, k = (terms[c].to_numpy() for c in ("ips", "wsum", "dr", "k"))
    users = terms["user_id"].to_numpy() if "user_id" in terms.columns else np.arange(len(ips))
    _, inverse = np.unique(users, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == u) for u in range(inverse.max() + 1)] if len(ips) else []

    def values(idx):
        ws = w[idx].sum()  # a resample whose weights are all 0 leaves SNIPS undefined (nan, skipped below)
        return {"IPS": ips[idx].mean(), "SNIPS": ips[idx].sum() / ws * k[idx].mean() if ws > 0 else np.nan,
                "DR": dr[idx].mean()}

    point = values(np.arange(len(ips)))
    rng = np.random.default_rng(seed)
    boots = [values(np.concatenate([rows_of[u] for u in rng.integers(0, len(rows_of), len(rows_of))]))
             for _ in range(n_boot)]
    out = []
    for name, v in point.items():
        b = np.array([x[name] for x in boots])
        out.append(OPEResult(name, float(v), float(np.nanquantile(b, alpha / 2)), float(np.nanquantile(b, 1 - alpha / 2))))
    return out


def policy_value(d: ExperimentData) -> tuple[float, float, float]:
    """The simulated ground truth of a run: mean engaged items per reply, with a normal 95% interval."""
    c = per_request(d)["clicks"].to_numpy().astype(float)
    se = c.std(ddof=1) / np.sqrt(len(c)) if len(c) > 1 else 0.0
    return float(c.mean()), float(c.mean() - 1.96 * se), float(c.mean() + 1.96 * se)
