"""Feature frames, computed with polars, each row stamped with the time it became true.

- item statistics: one snapshot per item and day with interactions (the day's last event time), plus a
  zero row per catalog item at the catalog time, so brand-new items have stats too;
- user history: one snapshot per user and distinct interaction time, holding the recency-weighted mean
  of the item vectors up to and including that time, the newest item ids, and the count;
- user statistics: the same snapshots' counts and mean value.

Training joins ask for features strictly before each label's time, so a label never sees itself.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl

from recsys.data.types import Catalog

CATALOG_TIME = datetime(1970, 1, 2, tzinfo=timezone.utc)  # "always known": the time stamped on static rows


def history_weights(length: int, half_life: float) -> np.ndarray:
    """(length,) weights of the newest .. oldest item in a history: 0.5 ** (age / half_life)."""
    return 0.5 ** (np.arange(length) / half_life)


def history_vectors(item_rows: np.ndarray, item_vectors: np.ndarray, length: int, half_life: float) -> np.ndarray:
    """Running history vector after each event of one user's sequence.

    Args:
        item_rows: (n,) catalog rows in time order.
        item_vectors: (n_items, d) L2-normalised item vectors.
    Returns:
        (n, d) float32: row k is the normalised weighted mean of items k, k-1, ..., k-length+1.
    """
    V = item_vectors[item_rows].astype(np.float32)
    H = np.zeros_like(V)
    for age, w in enumerate(history_weights(length, half_life)):
        if age >= len(V):
            break
        H[age:] += w * V[: len(V) - age]
    return H / np.maximum(np.linalg.norm(H, axis=1, keepdims=True), 1e-12)


def user_snapshots(interactions: pl.DataFrame, item_vectors: np.ndarray, index: dict[str, int], recent: int = 20,
                   length: int = 20, half_life: float = 10.0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(history, stats) snapshot frames, one row per user and distinct interaction time.

    Returns:
        history: user_id, event_timestamp, history_vector (list[f32]), recent_item_ids (list[str]), history_count
        stats: user_id, event_timestamp, n_interactions, mean_value, user_first_seen
    """
    f = interactions.sort(["user_id", "timestamp"], maintain_order=True)
    users = f["user_id"].to_numpy()
    items = f["item_id"].to_list()
    rows = np.fromiter((index[i] for i in items), dtype=np.int64, count=len(items))
    ts = f["timestamp"]
    values = f["value"].fill_null(0.0).to_numpy().astype(np.float64)
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    vecs, keep = np.zeros((len(rows), item_vectors.shape[1]), np.float32), np.zeros(len(rows), bool)
    recent_ids: list[list[str]] = []
    counts = np.zeros(len(rows), np.int64)
    means = np.zeros(len(rows), np.float32)
    ts_np = ts.to_numpy()
    for s, e in zip(bounds[:-1], bounds[1:]):
        vecs[s:e] = history_vectors(rows[s:e], item_vectors, length, half_life)
        counts[s:e] = np.arange(1, e - s + 1)
        means[s:e] = np.cumsum(values[s:e]) / counts[s:e]
        last_of_time = np.r_[ts_np[s + 1 : e] != ts_np[s : e - 1], True]  # one snapshot per distinct time
        keep[s:e] = last_of_time
        for k in np.flatnonzero(last_of_time):
            lo = max(0, k + 1 - recent)
            recent_ids.append(items[s + lo : s + k + 1][::-1])
    first = f.group_by("user_id").agg(pl.col("timestamp").min().alias("user_first_seen"))
    base = pl.DataFrame({"user_id": users[keep], "event_timestamp": ts.filter(pl.Series(keep))})
    history = base.with_columns(
        pl.Series("history_vector", vecs[keep], dtype=pl.Array(pl.Float32, vecs.shape[1])).cast(pl.List(pl.Float32)),
        pl.Series("recent_item_ids", recent_ids, dtype=pl.List(pl.Utf8)),
        pl.Series("history_count", counts[keep]),
    )
    stats = base.with_columns(pl.Series("n_interactions", counts[keep]), pl.Series("mean_value", means[keep])).join(
        first, on="user_id", how="left")
    return history, stats


def item_stats(interactions: pl.DataFrame, catalog: Catalog) -> pl.DataFrame:
    """Daily snapshots of each item's popularity, plus a zero row per catalog item at CATALOG_TIME."""
    m = catalog.modalities.astype(np.int64)
    flags = pl.DataFrame({"item_id": catalog.ids, "has_text": m[:, 0], "has_image": m[:, 1],
                          "has_audio": m[:, 2], "has_video": m[:, 3]})
    daily = (
        interactions.with_columns(pl.col("timestamp").dt.truncate("1d").alias("day"))
        .group_by("item_id", "day")
        .agg(pl.len().alias("n"), pl.col("timestamp").max().alias("event_timestamp"))
        .sort("item_id", "day")
    )
    daily = daily.with_columns(
        pl.col("n").cum_sum().over("item_id").alias("pop_all"),
        pl.col("n").rolling_sum_by("day", window_size="30d").over("item_id").alias("pop_30d"),
        pl.col("event_timestamp").min().over("item_id").alias("item_first_seen"),
    ).select("item_id", "event_timestamp", "pop_all", "pop_30d", "item_first_seen")
    zero = pl.DataFrame({"item_id": catalog.ids}).with_columns(
        pl.lit(CATALOG_TIME).cast(pl.Datetime("us", "UTC")).alias("event_timestamp"),
        pl.lit(0, dtype=pl.Int64).alias("pop_all"), pl.lit(0, dtype=pl.Int64).alias("pop_30d"),
        pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("item_first_seen"),
    )
    snapshots = pl.concat([zero, daily.with_columns(pl.col("pop_all").cast(pl.Int64), pl.col("pop_30d").cast(pl.Int64))])
    return snapshots.join(flags, on="item_id", how="left")
