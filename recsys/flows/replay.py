"""Offline A/B analysis of registered model versions: replay a protocol's held-out round through each
model exactly as serving would run it (the registered user tower, its logged item vectors, FAISS),
then compare per user with paired bootstrap intervals and by segment. Used by notebooks/ab_analysis.ipynb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from recsys.config import Config
from recsys.data import Dataset
from recsys.eval.evaluate import METRICS, EvalResult, score_topk
from recsys.eval.metrics import paired_bootstrap_diff
from recsys.eval.splits import make_split


@dataclass
class Replay:
    label: str
    version: str
    result: EvalResult


class _RegisteredTowers:
    """The two towers of a registered version, with the encode_* interface evaluation ranks through."""

    def __init__(self, user_tower, item_tower, known: np.ndarray):
        self.user_tower, self.item_tower, self.known = user_tower, item_tower, np.append(known, False)

    @torch.inference_mode()
    def encode_users(self, users, item_content: np.ndarray) -> np.ndarray:
        return self.user_tower(*users.tensors(item_content, self.known)).numpy()

    def item_encoder(self, content: np.ndarray, rows: np.ndarray, known: np.ndarray):
        """As TwoTowerModule.item_encoder: stats (N, len(ITEM_STATS)) -> (N, vector_dim) for the same items."""
        from training.towers import stats_encoder

        return stats_encoder(self.item_tower, content, rows, known & self.known[rows])


def replay(cfg: Config, ds: Dataset, alias: str | None = None, version: str | None = None, protocol: str = "loo",
           n_boot: int = 1000) -> Replay:
    """Rank the protocol's test users with one registered model version (its logged towers, FAISS,
    item statistics as of when each user was asked); per-user metrics."""
    from features.inputs import eval_inputs
    from recsys.registry import read_registered
    from training.datamodule import ValidationData
    from training.module import rank_by_time

    reg = read_registered(cfg, alias=alias, version=version)
    a = reg.arrays()
    if a["ids"].tolist() != ds.catalog.ids:
        raise ValueError(f"model v{reg.version} was trained on another catalog ({len(a['ids'])} items)")
    es = make_split(protocol, ds, cfg.eval).test
    users, items, asof = eval_inputs(es.history, es.users, ds.catalog, a["content"],
                                     int(reg.config["tower"]["recent"]), cfg.embedder.history_half_life, at=es.at)
    content = np.vstack([a["content"], np.zeros((1, a["content"].shape[1]), np.float32)])
    towers = _RegisteredTowers(reg.user_tower(), reg.item_tower(), a["known"])
    topk = np.full((len(es), 50), -1, np.int64)
    for idx, _, rows, _ in rank_by_time(towers, ValidationData(es, users, items, asof), content, ds.catalog.index, 50,
                                        cfg.serve.faiss_index):
        topk[idx] = rows
    label = alias or f"v{reg.version}"
    return Replay(label, reg.version, score_topk(f"{label} (v{reg.version})", topk, es, len(ds.catalog), protocol,
                                                  n_boot=n_boot, keep_topk=True))


def compare(a: Replay, b: Replay, n_boot: int = 1000) -> pl.DataFrame:
    """B minus A per metric: the mean over the same users with a paired bootstrap 95% interval."""
    x, y = a.result.per_user, b.result.per_user
    if x["user_id"].to_list() != y["user_id"].to_list():
        raise ValueError("the two replays cover different users")
    rows = []
    for m in METRICS:
        d = paired_bootstrap_diff(y[m].to_numpy(), x[m].to_numpy(), n_boot=n_boot)
        rows.append({"metric": m, a.label: x[m].mean(), b.label: y[m].mean(), "difference": d.mean,
                     "low": d.low, "high": d.high, "significant": not (d.low <= 0 <= d.high)})
    return pl.DataFrame(rows)


def segments(r: Replay, history: pl.DataFrame, bins: tuple[int, ...] = (50, 200)) -> pl.DataFrame:
    """Mean metrics by user activity (training interactions): light / medium / heavy."""
    counts = history.group_by("user_id").len()
    labels = [f"<{bins[0]}", *[f"{lo}-{hi - 1}" for lo, hi in zip(bins, bins[1:])], f">={bins[-1]}"]
    f = r.result.per_user.join(counts, on="user_id", how="left").with_columns(
        pl.col("len").cut(list(np.array(bins) - 0.5), labels=labels).alias("segment"))
    return f.group_by("segment").agg(pl.len().alias("users"), *[pl.col(m).mean() for m in METRICS]).sort("segment")


def item_segments(r: Replay, split, catalog) -> pl.DataFrame:
    """Mean metrics by the held-out item's segment: popularity in the training interactions (cold = none,
    tail, torso = top 20%, head = top 1%) and modalities (e.g. text+image). A regression that hides in the
    tail or on image items shows here before it shows in the overall mean.

    Args:
        split: the protocol's Split (its test targets, one per user in LOO, and the history they follow).
    Returns: one row per (segment, value): users and the mean of each metric.
    """
    from recsys.content import KINDS

    counts = dict(split.test.history.group_by("item_id").len().iter_rows())
    pop = np.array([counts.get(i, 0) for i in catalog.ids], np.float64)
    pct = pop.argsort(kind="stable").argsort() / max(1, len(pop) - 1)
    bucket = np.where(pop == 0, "cold", np.where(pct >= 0.99, "head", np.where(pct >= 0.8, "torso", "tail")))
    modality = np.array(["+".join(k for k, m in zip(KINDS, row) if m) for row in catalog.modalities])
    target = {u: int(t[0]) for u, t in zip(split.test.users, split.test.targets) if len(t)}
    f = r.result.per_user.filter(pl.col("user_id").is_in(list(target)))
    rows = [target[u] for u in f["user_id"].to_list()]
    f = f.with_columns(pl.Series("popularity", bucket[rows]), pl.Series("modality", modality[rows]))
    out = [f.group_by(seg).agg(pl.len().alias("users"), *[pl.col(m).mean() for m in METRICS])
           .rename({seg: "value"}).with_columns(pl.lit(seg).alias("segment")) for seg in ("popularity", "modality")]
    return pl.concat(out).select("segment", "value", "users", *METRICS).sort("segment", "value")
