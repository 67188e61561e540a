"""Tower inputs, built the same way for training (Feast point-in-time rows), evaluation (features
computed from an eval set's history) and serving (Feast online rows), so the three never drift.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import polars as pl
import torch

from features.compute import item_stats, user_snapshots
from recsys.content import KINDS
from recsys.contract import ITEM_INPUTS, ITEM_STATS, USER_INPUTS, USER_STATS
from recsys.data.types import Catalog

DAY = 86400.0


@dataclass
class ItemInputs:
    """Item-tower inputs for N items. ``rows`` are catalog rows (the id table's index)."""

    content: np.ndarray  # (N, D) float32
    stats: np.ndarray  # (N, len(ITEM_STATS)) float32
    rows: np.ndarray  # (N,) int64
    known: np.ndarray  # (N,) bool: the item had interactions when the model was trained (its id is usable)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The item tower's inputs in contract order (recsys.contract.ITEM_INPUTS)."""
        named = {"content": self.content, "stats": self.stats, "ids": self.rows, "id_mask": self.known}
        return tuple(torch.from_numpy(named[k]) for k in ITEM_INPUTS)


@dataclass
class UserInputs:
    """User-tower inputs for N users."""

    history: np.ndarray  # (N, D)
    recent_rows: np.ndarray  # (N, L) int64, padding = n_items
    recent_mask: np.ndarray  # (N, L) bool
    stats: np.ndarray  # (N, len(USER_STATS))

    @classmethod
    def empty(cls, n: int, recent: int, dim: int, n_items: int) -> "UserInputs":
        """``n`` users with no history, no recent items and zero statistics (warm-up passes, examples)."""
        return cls(np.zeros((n, dim), np.float32), np.full((n, recent), n_items, np.int64), np.zeros((n, recent), bool),
                   np.zeros((n, len(USER_STATS)), np.float32))

    def tensors(self, item_content: np.ndarray, known: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The user tower's inputs in contract order (recsys.contract.USER_INPUTS), the recent items' vectors
        gathered from ``item_content`` (n_items + 1 rows, last = zeros) and their id mask from ``known``."""
        named = {"history": self.history, "recent_content": item_content[self.recent_rows], "recent_ids": self.recent_rows,
                 "recent_mask": self.recent_mask, "recent_id_mask": self.recent_mask & known[self.recent_rows],
                 "stats": self.stats}
        return tuple(torch.from_numpy(named[k]) for k in USER_INPUTS)


def item_stat_matrix(pop_all, pop_30d, first_seen_s, at_s, modalities) -> np.ndarray:
    """(N, len(ITEM_STATS)), columns by name (recsys.contract): log1p counts, log1p age in days (0 if never
    seen), modality flags."""
    first = np.asarray(first_seen_s, np.float64)
    age = np.where(first > 0, np.maximum(np.asarray(at_s, np.float64) - first, 0) / DAY, 0.0)
    mods = np.asarray(modalities, np.float64).reshape(len(first), -1)
    cols = {"log_pop_all": np.log1p(np.asarray(pop_all, np.float64)) / 5,
            "log_pop_30d": np.log1p(np.asarray(pop_30d, np.float64)) / 5, "log_age_days": np.log1p(age) / 8,
            **{f"has_{m}": mods[:, j] for j, m in enumerate(KINDS)}}
    return np.column_stack([cols[k] for k in ITEM_STATS]).astype(np.float32)


def user_stat_matrix(n, mean_value, first_seen_s, at_s) -> np.ndarray:
    """(N, len(USER_STATS)), columns by name (recsys.contract): log1p count, mean value / 5, log1p days since
    the first interaction."""
    first = np.asarray(first_seen_s, np.float64)
    days = np.where(first > 0, np.maximum(np.asarray(at_s, np.float64) - first, 0) / DAY, 0.0)
    cols = {"log_n_interactions": np.log1p(np.asarray(n, np.float64)) / 5,
            "mean_value": np.asarray(mean_value, np.float64) / 5, "log_days_since_first": np.log1p(days) / 8}
    return np.column_stack([cols[k] for k in USER_STATS]).astype(np.float32)


def recent_matrix(recent_ids: list, index: dict[str, int], length: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of item ids (newest first) -> (N, L) rows padded with n_items, and the presence mask."""
    rows = np.full((len(recent_ids), length), n_items, dtype=np.int64)
    for r, ids in enumerate(recent_ids):
        known = [index[i] for i in (ids or [])[:length] if i in index]
        rows[r, : len(known)] = known
    return rows, rows < n_items


def _seconds(col) -> np.ndarray:
    """A datetime column/list (None allowed) -> unix seconds (0 for None)."""
    if isinstance(col, pl.Series):
        return (col.dt.epoch("us").fill_null(0).to_numpy() / 1e6).astype(np.float64)
    return np.array([(t.timestamp() if isinstance(t, datetime) else float(t or 0)) for t in col], np.float64)


def _vectors(col: pl.Series, dim: int) -> np.ndarray:
    """A list column of ``dim``-long vectors -> (N, dim) float32, zeros where null (no history yet). Read
    through polars' fixed-width arrays, never as Python lists (84k history vectors: 9 s that way)."""
    out = np.zeros((len(col), dim), np.float32)
    present = col.is_not_null().to_numpy()
    if present.any():
        try:
            out[present] = col.filter(present).cast(pl.Array(pl.Float32, dim)).to_numpy()
        except pl.exceptions.ComputeError as exc:
            raise ValueError(f"{col.name or 'vector column'}: expected vectors of {dim} values ({exc})") from exc
    return out


@dataclass
class History:
    """(N, D) unit history vectors, held as float32 or, for large training sets, as int8 with a per-row scale: a
    quarter of the memory (10M rows x 256: 2.6 GB instead of 10 GB); the rounding error is at most half a step
    (scale / 2) per coordinate, which leaves a unit vector's cosine to its float original above 0.9999."""

    values: np.ndarray  # (N, D) float32, or int8 with ``scale``
    scale: np.ndarray | None = None  # (N,) float32: row r is values[r] * scale[r]

    @classmethod
    def empty(cls, n: int, dim: int, int8: bool) -> "History":
        return cls(np.zeros((n, dim), np.int8), np.zeros(n, np.float32)) if int8 else cls(np.zeros((n, dim), np.float32))

    def __len__(self) -> int:
        return len(self.values)

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def put(self, at: np.ndarray, x: np.ndarray) -> None:
        """Store (len(at), D) float vectors at rows ``at``."""
        if self.scale is None:
            self.values[at] = x
            return
        scale = np.abs(x).max(axis=1) / 127.0
        self.scale[at] = scale
        self.values[at] = np.rint(x / np.maximum(scale, 1e-30)[:, None]).astype(np.int8)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), D) float32."""
        if self.scale is None:
            return self.values[idx]
        return self.values[idx].astype(np.float32) * self.scale[idx, None]


@dataclass
class TrainingRows:
    """A point-in-time training set as compact arrays: who, what, when, and both towers' inputs per row.

    The positive's content is not stored per row: :meth:`items` gathers it from the item table the model is
    given, the same table its sampled negatives and serving's index read (so a positive is never told apart
    from the negatives by its vector's version); the memory is then bounded by the rows' small columns and the
    history vectors (:class:`History`)."""

    history: History  # (N, D)
    recent_rows: np.ndarray  # (N, L) int32 catalog rows, newest first; padding = n_items
    user_stats: np.ndarray  # (N, len(USER_STATS)) float32
    item_rows: np.ndarray  # (N,) int64 the positive's catalog row
    item_stats: np.ndarray  # (N, len(ITEM_STATS)) float32, as of just before the label
    item_known: np.ndarray  # (N,) bool: the positive's id is learnable (it has training interactions)
    times: np.ndarray  # (N,) float64 unix seconds of the labels
    user_codes: np.ndarray  # (N,) int64 dense user codes (a user's other positives are no negatives in a batch)
    n_items: int
    item_counts: np.ndarray | None = None  # (n_items,) positives per item over every shard (the logQ correction)
    shard: tuple[int, int] = (0, 1)  # (rank, world): these are rows rank, rank + world, ... of ``total``
    total: int = 0  # rows over every shard

    def __post_init__(self) -> None:
        if self.item_counts is None:
            self.item_counts = np.bincount(self.item_rows, minlength=self.n_items)
        self.total = self.total or len(self.times)

    def __len__(self) -> int:
        return len(self.times)

    def sharded(self, rank: int, world: int) -> "TrainingRows":
        """One DDP process's share: rows ``rank``, ``rank + world``, ... (the others leave its memory)."""
        if world <= 1:
            return self
        if self.shard[1] > 1:
            raise ValueError(f"rows already sharded {self.shard}")
        i = np.arange(rank, len(self), world)
        h = History(self.history.values[i], None if self.history.scale is None else self.history.scale[i])
        return TrainingRows(h, self.recent_rows[i], self.user_stats[i], self.item_rows[i], self.item_stats[i],
                            self.item_known[i], self.times[i], self.user_codes[i], self.n_items, self.item_counts,
                            (rank, world), len(self))

    def users(self, idx: np.ndarray | slice) -> UserInputs:
        recent = self.recent_rows[idx].astype(np.int64)
        return UserInputs(self.history.take(idx), recent, recent < self.n_items, self.user_stats[idx])

    def items(self, idx: np.ndarray | slice, item_content: np.ndarray) -> ItemInputs:
        rows = self.item_rows[idx]
        return ItemInputs(item_content[rows], self.item_stats[idx], rows, self.item_known[idx])

    def with_history(self, history: History) -> "TrainingRows":
        """The same rows reading other history vectors (the ID-only variant: zeros), never changed in place."""
        return replace(self, history=history)


def recent_rows(col: pl.Series, index: dict[str, int], length: int, n_items: int) -> np.ndarray:
    """A list column of item ids (newest first, null = none) -> (N, L) int32 catalog rows, ids outside the
    catalog skipped, padded with ``n_items``: :func:`recent_matrix`, vectorised (10M rows of lists)."""
    rows = col.list.eval(pl.element().replace_strict(index, default=None, return_dtype=pl.Int32)).list.drop_nulls() \
        .list.head(length)
    sizes = rows.list.len().fill_null(0).cast(pl.Int64).to_numpy()
    out = np.full((len(col), length), n_items, np.int32)
    flat = rows.explode().drop_nulls().cast(pl.Int32).to_numpy()
    r = np.repeat(np.arange(len(col)), sizes)
    j = np.arange(len(flat)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    out[r, j] = flat
    return out


class TrainingRowsBuilder:
    """Fills :class:`TrainingRows` from Feast's point-in-time join of the user views a batch at a time (any order:
    each batch names its rows by ``label_row``), so the join's output is never held whole.

    The positive's statistics come from ``asof`` (the item-stats view's snapshots, the latest strictly before each
    label, exactly what Feast's join gives: tests/test_features.py checks it), as its sampled negatives' do: a
    positive is never told apart from the negatives by how its stats were read, and the join per chunk of users
    no longer reads the whole item-stats file each time (32 times at 10M interactions, docs/scale.md).

    Args:
        labels: user_id, item_id, timestamp: the rows to fill, in order.
        known: (n_items,) bool: items with training interactions.
        int8: hold the history vectors as int8 (see :class:`History`).
        asof: every item's statistics as of any time.
    """

    def __init__(self, labels: pl.DataFrame, catalog: Catalog, dim: int, recent: int, known: np.ndarray, int8: bool,
                 asof: "ItemStatsAsOf"):
        n = labels.height
        self.catalog, self.dim, self.recent = catalog, dim, recent
        self.times = _seconds(labels["timestamp"])
        try:
            item_rows = labels["item_id"].replace_strict(catalog.index, return_dtype=pl.Int64).to_numpy()
        except pl.exceptions.InvalidOperationError as exc:
            raise KeyError(f"training labels name items outside the catalog: {exc}") from exc
        stats = np.empty((n, len(ITEM_STATS)), np.float32)
        for a in range(0, n, 1_000_000):  # bounded temporaries (a few float64 columns per row)
            stats[a:a + 1_000_000] = asof.at(item_rows[a:a + 1_000_000], self.times[a:a + 1_000_000])
        self.rows = TrainingRows(
            History.empty(n, dim, int8), np.full((n, recent), len(catalog), np.int32),
            np.zeros((n, len(USER_STATS)), np.float32), item_rows, stats,
            known[item_rows], self.times, labels["user_id"].rank("dense").to_numpy().astype(np.int64) - 1, len(catalog))
        self.filled = np.zeros(n, bool)

    def add(self, frame: pl.DataFrame) -> None:
        """One batch of the join's output (with ``label_row``)."""
        at = frame["label_row"].to_numpy()
        t = self.times[at]
        r = self.rows
        r.history.put(at, _vectors(frame["history_vector"], self.dim))
        r.recent_rows[at] = recent_rows(frame["recent_item_ids"], self.catalog.index, self.recent, len(self.catalog))
        r.user_stats[at] = user_stat_matrix(frame["n_interactions"].fill_null(0).to_numpy(),
                                            frame["mean_value"].fill_null(0).to_numpy(), _seconds(frame["user_first_seen"]), t)
        self.filled[at] = True

    def done(self) -> TrainingRows:
        if not self.filled.all():
            raise RuntimeError(f"the point-in-time join returned no row for {int((~self.filled).sum())} training labels")
        return self.rows


class ItemStatsAsOf:
    """Every item's statistics as of any time, from the item-stats snapshots (for sampled negatives
    and for evaluation): the latest snapshot strictly before the time. Vectorised: one sorted key per
    snapshot (item row, time), one binary search per asked item."""

    def __init__(self, snapshots: pl.DataFrame, catalog: Catalog):
        s = snapshots.sort(["item_id", "event_timestamp"])
        self.n = len(catalog)
        self.mods = catalog.modalities.astype(np.float32)
        rows = s["item_id"].replace_strict(catalog.index, return_dtype=pl.Int64).to_numpy()  # millions of snapshots
        ts = _seconds(s["event_timestamp"])
        order = np.lexsort((ts, rows))
        self.rows, self.ts = rows[order], ts[order]
        self.pop_all = s["pop_all"].to_numpy()[order]
        self.pop_30d = s["pop_30d"].to_numpy()[order]
        self.first = _seconds(s["item_first_seen"])[order]
        self.t0 = float(self.ts.min()) - 1.0 if len(self.ts) else 0.0
        self.span = float(self.ts.max() - self.t0 + 10 * DAY) if len(self.ts) else 1.0
        self.keys = self.rows * self.span + (self.ts - self.t0)
        self.starts = np.searchsorted(self.rows, np.arange(self.n + 1))

    def at(self, items: np.ndarray, t) -> np.ndarray:
        """(len(items), len(ITEM_STATS)) stats of ``items`` (catalog rows) as of time ``t`` (unix seconds: one time,
        or one per item): each item's latest snapshot strictly before it, as Feast's point-in-time join takes it."""
        items = np.asarray(items, np.int64)
        t = np.asarray(t, np.float64)
        q = items * self.span + np.clip(t - self.t0, 0.0, self.span - 1)
        j = np.searchsorted(self.keys, q, side="left") - 1
        starts = self.starts[items]
        if len(self.ts):  # the combined key rounds (to ~10 ms at 100k items): settle the neighbours on exact times
            tt = np.broadcast_to(t, items.shape)
            back = (j >= starts) & (self.ts[np.clip(j, 0, None)] >= tt)  # taken but not strictly before
            j = np.where(back, j - 1, j)
            nxt = np.minimum(j + 1, len(self.ts) - 1)
            ahead = (j + 1 < self.starts[items + 1]) & (self.ts[nxt] < tt)  # strictly before but left out
            j = np.where(ahead, j + 1, j)
        ok = j >= starts
        j = np.where(ok, j, 0)
        pa = np.where(ok, self.pop_all[j], 0)
        p30 = np.where(ok, self.pop_30d[j], 0)
        first = np.where(ok, self.first[j], 0.0)
        return item_stat_matrix(pa, p30, first, t, self.mods[items])

    def all_at(self, t: float) -> np.ndarray:
        return self.at(np.arange(self.n), t)


def eval_inputs(history: pl.DataFrame, users: list[str], catalog: Catalog, item_vectors: np.ndarray,
                recent: int, half_life: float, at: list | None = None) -> tuple[UserInputs, ItemInputs, ItemStatsAsOf]:
    """Inputs as serving would have seen them when each user was asked, given ``history``: each user's
    last snapshot, every item's statistics as of the end of the history (and, for per-time evaluation,
    the item-stats snapshots to take them as of any earlier time)."""
    theirs = history.filter(pl.col("user_id").is_in(pl.Series(users, dtype=pl.Utf8).implode()))  # the others never matter
    last_h, last_s = user_snapshots(theirs, item_vectors, catalog.index, recent, half_life, last_only=True)
    order = pl.DataFrame({"user_id": users})
    h = order.join(last_h, on="user_id", how="left")
    s = order.join(last_s, on="user_id", how="left")
    end = _seconds(history["timestamp"]).max() + 1
    asked = _seconds(at) if at is not None and all(t is not None for t in at) else np.full(len(users), end)
    rows, mask = recent_matrix(h["recent_item_ids"].to_list(), catalog.index, recent, len(catalog))
    dim = item_vectors.shape[1]
    u = UserInputs(_vectors(h["history_vector"], dim), rows, mask,
                   user_stat_matrix(s["n_interactions"].fill_null(0).to_numpy(), s["mean_value"].fill_null(0).to_numpy(),
                                    _seconds(s["user_first_seen"]), asked))
    asof = ItemStatsAsOf(item_stats(history, catalog), catalog)
    known = np.zeros(len(catalog), bool)
    known[[catalog.index[i] for i in history["item_id"].unique().to_list()]] = True
    items = ItemInputs(item_vectors.astype(np.float32), asof.all_at(end), np.arange(len(catalog), dtype=np.int64), known)
    return u, items, asof
