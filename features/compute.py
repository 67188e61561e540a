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


SNAPSHOT_CHUNK_ROWS = 200_000  # interactions per chunk of whole users: what one chunk's arrays hold in memory


def user_snapshots(interactions: pl.DataFrame, item_vectors: np.ndarray, index: dict[str, int], recent: int = 20,
                   half_life: float = 50.0, last_only: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(history, stats) snapshot frames, one row per user and distinct interaction time (``last_only``: only
    each user's last one, what evaluation reads: the same rows without building the ~100k earlier ones).

    Returns:
        history: user_id, event_timestamp, history_vector (list[f32], unit), history_norm (its length before
            normalising, so serving can continue the decayed sum exactly with newer events), recent_item_ids (list[str]), history_count
        stats: user_id, event_timestamp, n_interactions, mean_value, user_first_seen
        (with ``history_events_seq`` / ``stats_events_seq``: the highest event-log sequence folded in so far, 0 without a ``seq`` column)
    The frames of :func:`user_snapshot_chunks`, concatenated (a writer that streams them never holds them all).
    """
    chunks = list(user_snapshot_chunks(interactions, item_vectors, index, recent, half_life, last_only))
    return pl.concat([h for h, _ in chunks]), pl.concat([s for _, s in chunks])


def _user_bounds(f: pl.DataFrame) -> np.ndarray:
    """Start of each user's run in a user-sorted frame, plus the end: (n_users + 1,), with no Python string per
    interaction."""
    new_user = f.select((pl.col("user_id") != pl.col("user_id").shift()).fill_null(True)).to_series().to_numpy()
    return np.r_[np.flatnonzero(new_user), f.height].astype(np.int64)


def user_snapshot_chunks(interactions: pl.DataFrame, item_vectors: np.ndarray, index: dict[str, int], recent: int = 20,
                         half_life: float = 50.0, last_only: bool = False, chunk_rows: int = SNAPSHOT_CHUNK_ROWS):
    """:func:`user_snapshots` computed over chunks of about ``chunk_rows`` interactions (whole users each), so
    memory is bounded by a chunk, never by the dataset: 10M interactions make 10M snapshots of a 256-d vector
    (10 GB), which the offline writes stream to parquet chunk by chunk.

    Yields:
        (history, stats) frames per chunk (an empty input yields one pair of empty frames, with their columns).
    """
    f = interactions.sort(["user_id", "timestamp"], maintain_order=True)
    if f.is_empty():
        yield _snapshots(f, item_vectors, index, recent, half_life, last_only)
        return
    bounds = _user_bounds(f)
    cuts = [0]
    for b in bounds[1:]:  # whole users per chunk
        if b - cuts[-1] >= chunk_rows or b == bounds[-1]:
            cuts.append(int(b))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        yield _snapshots(f.slice(lo, hi - lo), item_vectors, index, recent, half_life, last_only)


def _snapshots(f: pl.DataFrame, item_vectors: np.ndarray, index: dict[str, int], recent: int, half_life: float,
               last_only: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The snapshots of whole users' time-sorted interactions, vectorised across users: the decayed sums advance
    one sequence position at a time for every user that long (H_k = decay * H_(k-1) + v_k, the same float64
    operations as :func:`history_sums`, so the values are bit for bit the per-user ones)."""
    import pyarrow as pa

    n = f.height
    # the event-log sequence folded into each snapshot (its running max; 0 for the dataset's own rows): serving
    # folds a user's events above it (features.store.fold_events), so no event counts twice or is missed
    seqs = f.select(pl.col("seq").fill_null(0).cum_max().over("user_id")).to_series().to_numpy() \
        if "seq" in f.columns else np.zeros(n, np.int64)
    try:
        rows = f["item_id"].replace_strict(index, return_dtype=pl.Int64).to_numpy()
    except pl.exceptions.InvalidOperationError as exc:
        raise KeyError(f"interactions name items outside the catalog: {exc}") from exc
    ts = f["timestamp"]
    ts_np = ts.to_numpy()
    bounds = _user_bounds(f)
    lengths = np.diff(bounds)
    start = np.repeat(bounds[:-1], lengths)  # each row's user start
    pos = np.arange(n) - start  # position in the user's sequence
    decay = history_decay(half_life)
    sums = item_vectors[rows].astype(np.float64)
    longest = np.argsort(-lengths, kind="stable")
    first_rows, by_length = bounds[:-1][longest], lengths[longest]
    for p in range(1, int(by_length[0]) if n else 0):
        m = int(np.searchsorted(-by_length, -p, side="left"))  # users longer than p: a prefix of ``longest``
        at_p = first_rows[:m] + p
        sums[at_p] = sums[at_p] + decay * sums[at_p - 1]
    sums = sums.astype(np.float32)  # what history_sums returns
    norms = np.linalg.norm(sums, axis=1)
    vecs = sums / np.maximum(norms[:, None], 1e-12)
    counts = pos + 1
    values = f.select(pl.col("value").fill_null(0.0).cast(pl.Float64).cum_sum().over("user_id")).to_series().to_numpy()
    means = (values / counts).astype(np.float32)
    user_end = np.repeat(bounds[1:], lengths) - 1
    keep = np.r_[ts_np[1:] != ts_np[:-1], True][:n] | (np.arange(n) == user_end)  # one snapshot per distinct time
    if last_only:
        keep = np.arange(n) == user_end
    at = np.flatnonzero(keep)
    # each kept snapshot's newest ``recent`` items, newest first, gathered as one flat list column
    size = np.minimum(recent, pos[at] + 1)
    offsets = np.r_[0, np.cumsum(size)].astype(np.int32)
    take = np.repeat(at, size) - (np.arange(offsets[-1]) - np.repeat(offsets[:-1], size))
    ids = f["item_id"].gather(take).to_arrow().cast(pa.string())
    recent_ids = pl.from_arrow(pa.ListArray.from_arrays(pa.array(offsets), ids)).alias("recent_item_ids")
    first = ts.gather(start[at]).alias("user_first_seen")
    base = pl.DataFrame([f["user_id"].gather(at), ts.gather(at).alias("event_timestamp")])
    history = base.with_columns(
        pl.Series("history_vector", vecs[at], dtype=pl.Array(pl.Float32, vecs.shape[1])).cast(pl.List(pl.Float32)),
        pl.Series("history_norm", norms[at]),
        recent_ids.cast(pl.List(pl.Utf8)),
        pl.Series("history_count", counts[at].astype(np.int64)),
        pl.Series("history_events_seq", seqs[at], dtype=pl.Int64),
    )
    stats = base.with_columns(pl.Series("n_interactions", counts[at].astype(np.int64)), pl.Series("mean_value", means[at]),
                              first, pl.Series("stats_events_seq", seqs[at], dtype=pl.Int64))
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
