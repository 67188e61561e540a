"""Feature frames, computed with polars, each row stamped with the time it became true.

- item statistics: one snapshot per item and day with interactions (the day's last event time), plus a
  zero row per catalog item at the catalog time, so brand-new items have stats too;
- user history: one snapshot per user and distinct interaction time, holding the exponentially decayed
  sum of the item vectors up to and including that time (direction and norm), the newest item ids,
  and the count;
- user statistics: the same snapshots' counts and mean value.

Training joins ask for features strictly before each label's time, so a label never sees itself.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl

from recsys.data.types import Catalog

CATALOG_TIME = datetime(1970, 1, 2, tzinfo=timezone.utc)  # "always known": the time stamped on static rows


def history_decay(half_life: float) -> float:
    """Per-item decay of the history vector: an item ``half_life`` interactions old weighs half."""
    return 0.5 ** (1.0 / half_life)


def history_sums(item_rows: np.ndarray, item_vectors: np.ndarray, half_life: float) -> np.ndarray:
    """Running decayed sums over one user's sequence: H_k = decay * H_{k-1} + v_k (no window).

    Args:
        item_rows: (n,) catalog rows in time order.
        item_vectors: (n_items, d) L2-normalised item vectors.
    Returns:
        (n, d) float32, unnormalised (row k covers items 0..k); the feature is its direction and norm.
    """
    from scipy.signal import lfilter

    V = item_vectors[item_rows].astype(np.float64)
    return lfilter([1.0], [1.0, -history_decay(half_life)], V, axis=0).astype(np.float32)


def user_snapshots(interactions: pl.DataFrame, item_vectors: np.ndarray, index: dict[str, int], recent: int = 20,
                   half_life: float = 50.0, last_only: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(history, stats) snapshot frames, one row per user and distinct interaction time (``last_only``: only
    each user's last one, what evaluation reads: the same rows without building the ~100k earlier ones).

    Returns:
        history: user_id, event_timestamp, history_vector (list[f32], unit), history_norm (its length before
            normalising, so serving can continue the decayed sum exactly with newer events), recent_item_ids (list[str]), history_count
        stats: user_id, event_timestamp, n_interactions, mean_value, user_first_seen
        (with ``history_events_seq`` / ``stats_events_seq``: the highest event-log sequence folded in so far, 0 without a ``seq`` column)
    """
    f = interactions.sort(["user_id", "timestamp"], maintain_order=True)
    # the event-log sequence folded into each snapshot (its running max; 0 for the dataset's own rows): serving
    # folds a user's events above it (features.store.fold_events), so no event counts twice or is missed
    seqs = f.select(pl.col("seq").fill_null(0).cum_max().over("user_id")).to_series().to_numpy() \
        if "seq" in f.columns else np.zeros(f.height, np.int64)
    users = f["user_id"].to_numpy()
    items = f["item_id"].to_list()
    rows = np.fromiter((index[i] for i in items), dtype=np.int64, count=len(items))
    ts = f["timestamp"]
    values = f["value"].fill_null(0.0).to_numpy().astype(np.float64)
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    vecs, keep = np.zeros((len(rows), item_vectors.shape[1]), np.float32), np.zeros(len(rows), bool)
    norms = np.zeros(len(rows), np.float32)
    recent_ids: list[list[str]] = []
    counts = np.zeros(len(rows), np.int64)
    means = np.zeros(len(rows), np.float32)
    ts_np = ts.to_numpy()
    for s, e in zip(bounds[:-1], bounds[1:]):
        sums = history_sums(rows[s:e], item_vectors, half_life)
        norms[s:e] = np.linalg.norm(sums, axis=1)
        vecs[s:e] = sums / np.maximum(norms[s:e, None], 1e-12)
        counts[s:e] = np.arange(1, e - s + 1)
        means[s:e] = np.cumsum(values[s:e]) / counts[s:e]
        last_of_time = np.r_[ts_np[s + 1 : e] != ts_np[s : e - 1], True]  # one snapshot per distinct time
        if last_only:
            last_of_time[:-1] = False
        keep[s:e] = last_of_time
        for k in np.flatnonzero(last_of_time):
            lo = max(0, k + 1 - recent)
            recent_ids.append(items[s + lo : s + k + 1][::-1])
    first = f.group_by("user_id").agg(pl.col("timestamp").min().alias("user_first_seen"))
    base = pl.DataFrame({"user_id": users[keep], "event_timestamp": ts.filter(pl.Series(keep))})
    history = base.with_columns(
        pl.Series("history_vector", vecs[keep], dtype=pl.Array(pl.Float32, vecs.shape[1])).cast(pl.List(pl.Float32)),
        pl.Series("history_norm", norms[keep]),
        pl.Series("recent_item_ids", recent_ids, dtype=pl.List(pl.Utf8)),
        pl.Series("history_count", counts[keep]),
        pl.Series("history_events_seq", seqs[keep], dtype=pl.Int64),
    )
    stats = base.with_columns(pl.Series("n_interactions", counts[keep]), pl.Series("mean_value", means[keep])).join(
        first, on="user_id", how="left").with_columns(pl.Series("stats_events_seq", seqs[keep], dtype=pl.Int64))
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


def user_seen(interactions: pl.DataFrame) -> pl.DataFrame:
    """One row per user: every distinct item interacted with (newest first), stamped with the last time, and the
    highest event-log sequence among them (``seen_events_seq``; 0 without a ``seq`` column)."""
    seq = pl.col("seq").fill_null(0).max() if "seq" in interactions.columns else pl.lit(0)
    return (interactions.sort(["user_id", "timestamp"], descending=[False, True], maintain_order=True)
            .group_by("user_id", maintain_order=True)
            .agg(pl.col("timestamp").max().alias("event_timestamp"), pl.col("item_id").unique(maintain_order=True)
                 .alias("seen_item_ids"), seq.cast(pl.Int64).alias("seen_events_seq")))
