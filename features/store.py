"""The feature store in use: write offline parquet (polars), apply the definitions, materialize to the
online store (SQLite or Redis, same code), build point-in-time training sets, read online (plus the event
log's newer events: ``online_users_now``).

``FeatureRepo`` wraps one Feast repository under ``<workdir>/feast`` and one embedding space (backend,
model version, dim). Validation happens before anything is written: NaN, infinite or wrong-length
vectors reject the whole batch, naming the ids, so what is stored is never damaged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from features.compute import CATALOG_TIME, item_stats, user_seen, user_snapshot_chunks
from features.definitions import Repository, repository
from features.parquet import ParquetSink, write_parquet
from recsys.config import Config
from recsys.data.types import Catalog
from recsys.errors import FeatureValidationError

TEMPLATE = Path(__file__).resolve().parent / "feature_store.yaml"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def validate_vectors(ids: list[str], vectors: list | np.ndarray, dim: int, what: str) -> np.ndarray:
    """(n, dim) float32 or FeatureValidationError naming ids with NaN / inf / wrong-length / missing vectors."""
    if isinstance(vectors, np.ndarray) and vectors.shape == (len(ids), dim):  # the common case, checked at once
        arr = vectors.astype(np.float32, copy=False)
        if np.isfinite(arr).all():
            return arr
    problems: dict[str, list[str]] = {}
    rows = []
    for i, v in zip(ids, vectors):
        arr = None if v is None else np.asarray(v, dtype=np.float32).ravel()
        if arr is None:
            problems.setdefault("missing vector", []).append(str(i))
        elif arr.size != dim:
            problems.setdefault(f"length != {dim}", []).append(f"{i} ({arr.size})")
        elif np.isnan(arr).any():
            problems.setdefault("NaN values", []).append(str(i))
        elif np.isinf(arr).any():
            problems.setdefault("infinite values", []).append(str(i))
        else:
            rows.append(arr)
            continue
        rows.append(np.zeros(dim, np.float32))
    if len(ids) != len(vectors):
        problems["ids and vectors differ in count"] = [f"{len(ids)} ids, {len(vectors)} vectors"]
    if problems:
        raise FeatureValidationError(what, problems)
    return np.stack(rows) if rows else np.zeros((0, dim), np.float32)


@dataclass
class MaterializeReport:
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    start: dict[str, datetime] = field(default_factory=dict)
    end: datetime | None = None


@dataclass
class OnlineUsers:
    """Online user features, aligned with the asked ids. ``found`` is False for unknown users."""

    user_ids: list[str]
    found: np.ndarray  # (n,) bool
    history_vector: np.ndarray  # (n, dim); zeros where not found
    history_norm: np.ndarray  # (n,) length of the decayed sum behind history_vector
    recent_item_ids: list[list[str]]
    history_count: np.ndarray
    n_interactions: np.ndarray
    mean_value: np.ndarray
    first_seen: np.ndarray  # unix seconds, 0 = unknown
    seen_item_ids: list[list[str]] = field(default_factory=list)  # every item each user had (empty: unknown)
    # the event-log sequence each stored row already includes (history, stats, seen rows are written separately)
    events_seq: dict[str, np.ndarray] = field(default_factory=dict)
    events_folded: np.ndarray | None = None  # (n,) events from the log folded on top of the stored rows


def fold_events(users: OnlineUsers, events: dict, item_vector, half_life: float, recent: int) -> OnlineUsers:
    """The users' stored rows plus their newer events from the event log, as one feature set (in place).

    Each stored row says up to which event-log sequence it is built (``events_seq``); the events above it are
    folded on, in the order they happened: the decayed history sum continues exactly as the nightly computes it
    (H = decay * H + v), the item goes first in the recent ids and the seen set, the count and mean move on.
    An event older than the row's newest one is folded as the newest (online); the nightly rebuilds the row
    in time order.

    Args:
        events: user id -> [(seq, Event)] in time order (recsys.events ``user_events``).
        item_vector: item id -> (dim,) unit vector, or None for an item this space does not know (skipped for
            the history; still seen).
    """
    from features.compute import history_decay

    decay = history_decay(half_life)
    folded = np.zeros(len(users.user_ids), np.int64)
    for r, u in enumerate(users.user_ids):
        evs = events.get(u)
        if not evs:
            continue
        hist_after, stats_after, seen_after = (int(users.events_seq[k][r]) for k in ("history", "stats", "seen"))
        total = users.history_norm[r] * users.history_vector[r].astype(np.float64)
        recent_ids, seen = list(users.recent_item_ids[r]), list(users.seen_item_ids[r])
        n, mean = int(users.n_interactions[r]), float(users.mean_value[r])
        for seq, e in evs:
            if seq > hist_after:
                v = item_vector(e.item_id)
                if v is not None:
                    total = decay * total + v
                    recent_ids = [e.item_id, *recent_ids][:recent]
                    users.history_count[r] += 1
            if seq > stats_after:
                mean = (mean * n + float(e.value or 0.0)) / (n + 1)
                n += 1
                t = e.timestamp.timestamp()
                users.first_seen[r] = min(users.first_seen[r], t) if users.first_seen[r] > 0 else t
            if seq > seen_after:
                seen = [e.item_id, *(i for i in seen if i != e.item_id)]
            folded[r] += 1
        norm = float(np.linalg.norm(total))
        if norm > 0:
            users.history_vector[r] = (total / norm).astype(np.float32)
            users.history_norm[r] = norm
            users.found[r] = True
        users.recent_item_ids[r], users.seen_item_ids[r] = recent_ids, seen
        users.n_interactions[r], users.mean_value[r] = n, mean
    users.events_folded = folded
    return users


@dataclass
class OnlineItems:
    item_ids: list[str]
    found: np.ndarray
    embedding: np.ndarray  # (n, dim)
    pop_all: np.ndarray
    pop_30d: np.ndarray
    first_seen: np.ndarray  # unix seconds, 0 = never seen
    modalities: np.ndarray  # (n, 4)


class FeatureRepo:
    """One Feast repository and one embedding space."""

    def __init__(self, cfg: Config, backend: str, model_version: str, dim: int, name: str = "serve"):
        """``name`` picks the repository: "serve" holds everything known (what the online service reads);
        evaluation protocols get their own ("loo", "cold", ...) built from their training data only."""
        self.cfg, self.name = cfg, name
        self.dir = cfg.feast_dir / name
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.views: Repository = repository(self.data_dir.resolve(), backend, model_version, dim, cfg.features.recent_items)
        self._registered: dict = {}  # view name -> registered FeatureView (see _view)
        self._write_config()

    # Set-up -----------------------------------------------------------------------------------
    def _write_config(self) -> None:
        conf = yaml.safe_load(TEMPLATE.read_text())
        f = self.cfg.features
        conf["project"] = f"{f.project}_{self.name}"
        if f.registry:
            conf["registry"] = f.registry
        if f.online_store == "redis":
            conf["online_store"] = {"type": "features.online.BulkRedisOnlineStore", "connection_string": f.redis_connection}
        if not f.bulk_writes:  # Feast's own store types: same tables and keys, materialized row by row
            conf["online_store"]["type"] = f.online_store
        text = yaml.safe_dump(conf, sort_keys=False)
        path = self.dir / "feature_store.yaml"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)

    @cached_property
    def store(self):
        os.environ.setdefault("FEAST_USAGE", "False")
        from feast import FeatureStore

        return FeatureStore(repo_path=str(self.dir))

    def close(self) -> None:
        """Close the online store's connections (SQLite: every thread's; Redis: the client's pool)."""
        if "store" not in self.__dict__:
            return
        online = self.store._get_provider().online_store
        if hasattr(online, "close_all"):
            online.close_all()
        elif getattr(online, "_client", None) is not None:
            online._client.close()

    def apply(self) -> None:
        """Register entities, views and services (idempotent)."""
        self.store.apply(self.views.objects)
        self._registered.clear()

    def _view(self, name: str):
        """The registered FeatureView, looked up once (online reads are per request)."""
        if name not in self._registered:
            self._registered[name] = self.store.get_feature_view(name, allow_registry_cache=True)
        return self._registered[name]

    def item_stats_snapshots(self) -> pl.DataFrame:
        """Every item-statistics snapshot of the offline store (what features.inputs.ItemStatsAsOf reads)."""
        return pl.read_parquet(self._path(self.views.item_stats))

    def _path(self, view) -> Path:
        return Path(view.batch_source.path)

    # Offline writes (polars -> parquet) ---------------------------------------------------------
    def write_item_embeddings(self, item_ids: list[str], vectors: np.ndarray, at: datetime | None = None) -> int:
        """Validate, then append the vectors that are new or changed. Returns rows written.

        An item's first vector in this embedding space is stamped CATALOG_TIME (content is known from the
        start, so point-in-time joins find it for any past label); a changed vector is stamped ``at``
        (default now); unchanged vectors are not written again, so the nightly job is incremental.
        """
        clean = validate_vectors(item_ids, vectors, self.dim, "item embeddings")
        at = at or datetime.now(timezone.utc)
        path = self._path(self.views.item_embedding)
        old = pl.read_parquet(path) if path.exists() else None
        keep, seen = np.ones(len(item_ids), bool), np.zeros(len(item_ids), bool)
        if old is not None and old.height:  # compared as arrays: a 100k catalog as Python lists took ~1 GB
            latest = old.sort("event_timestamp").group_by("item_id").last()
            asked = pl.DataFrame({"item_id": pl.Series(item_ids, dtype=pl.Utf8), "_row": np.arange(len(item_ids))})
            hit = asked.join(latest.select("item_id", "embedding"), on="item_id", how="inner")
            rows = hit["_row"].to_numpy()
            prev = hit["embedding"].cast(pl.Array(pl.Float32, self.dim)).to_numpy().reshape(len(rows), self.dim)
            seen[rows] = True
            keep[rows] = ~np.isclose(prev, clean[rows], rtol=1e-5, atol=1e-6).all(axis=1)  # np.allclose, per row
        frame = pl.DataFrame({
            "item_id": pl.Series(item_ids, dtype=pl.Utf8).filter(pl.Series(keep)),
            "event_timestamp": pl.Series(np.where(seen, np.datetime64(at.replace(tzinfo=None), "us"),
                                                  np.datetime64(CATALOG_TIME.replace(tzinfo=None), "us"))[keep]
                                         ).dt.replace_time_zone("UTC"),
            "embedding": pl.Series(clean[keep], dtype=pl.Array(pl.Float32, self.dim)).cast(pl.List(pl.Float32)),
        })
        if frame.height:
            write_parquet(pl.concat([old, frame]) if old is not None else frame, path)
        return frame.height

    def write_interaction_features(self, interactions: pl.DataFrame, catalog: Catalog, item_vectors: np.ndarray,
                                   users: set[str] | None = None) -> dict[str, int]:
        """User-history, user-stats, user-seen and item-stats snapshots from ``interactions``.

        ``users`` None rebuilds every user's files; a set rebuilds only those users' snapshots (from their
        whole history, as the decayed sums need it) and keeps every other user's rows as they are: the nightly
        job passes the users with new interactions or with items whose vectors changed."""
        validate_vectors(catalog.ids, item_vectors, self.dim, "item vectors for user histories")
        e = self.cfg.embedder
        mine = interactions if users is None else interactions.filter(pl.col("user_id").is_in(list(users)))
        out = {}
        if mine.height or users is None:
            # every other user's rows carried over from the files as they are, streamed (never read whole)
            keep = None if users is None else ("user_id", sorted(users))
            views = (self.views.user_history, self.views.user_stats, self.views.user_seen)
            with ParquetSink(self._path(views[0]), keep) as hist, ParquetSink(self._path(views[1]), keep) as stats, \
                    ParquetSink(self._path(views[2]), keep) as seen:
                for h, st in user_snapshot_chunks(mine, item_vectors, catalog.index, self.cfg.features.recent_items,
                                                  e.history_half_life):
                    hist.write(h)
                    stats.write(st)
                seen.write(user_seen(mine))
            for sink, view in zip((hist, stats, seen), views):
                out[view.name.split("__")[0]] = sink.rows
        items = item_stats(interactions, catalog)
        write_parquet(items, self._path(self.views.item_stats))
        out["item_stats"] = items.height
        out["users_refreshed"] = mine["user_id"].n_unique()
        return out

    # Materialization -------------------------------------------------------------------------------
    def materialize(self, end: datetime | None = None, incremental: bool = True, progress: bool = False,
                    full: tuple[str, ...] = (), only: set[str] | None = None) -> MaterializeReport:
        """Write the latest row per entity in (last run, end] of every view to the online store; views named
        in ``full`` take (epoch, end] (snapshots rebuilt with past timestamps, e.g. a user's history after
        their items' vectors changed, are then written too), and with ``only`` just those entities' rows: the
        nightly rewrites the users it refreshed, not every user.

        Streams each parquet file (see features.online.stream_rows), so memory stays bounded by a chunk
        of ``features.write_chunk_rows``; the registry records the interval as Feast's materialize does.
        """
        from features.online import stream_rows

        t0 = time.time()
        end = end or datetime.now(timezone.utc)
        report = MaterializeReport(end=end)
        registry = self.store.registry
        project = self.store.project
        for view in (self.views.item_embedding, self.views.user_history, self.views.item_stats, self.views.user_stats,
                     self.views.user_seen):
            fv = self.store.get_feature_view(view.name)
            start = (fv.most_recent_end_time if incremental and fv.most_recent_end_time and view.name not in full else EPOCH)
            start = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
            path = self._path(view)
            if not path.exists():
                continue
            keys = only if (only is not None and view.name in full) else None
            report.rows[view.name] = stream_rows(self.store, fv, path, start, end, self.cfg.features.write_chunk_rows,
                                                 progress, keys=keys)
            report.start[view.name] = start
            registry.apply_materialization(fv, project, start, end, commit=True)
        report.seconds = time.time() - t0
        return report

    # Training sets ----------------------------------------------------------------------------------
    def _training_job(self, labels: pl.DataFrame, features=None):
        """Feast's point-in-time join for ``labels`` (with their ``label_row``, their position in the caller's frame)
        of ``features`` (default: the training service)."""
        import pandas as pd
        import pyarrow as pa

        if "label_row" not in labels.columns:
            labels = labels.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("label_row"))
        entity = labels.select(
            "user_id", "item_id", "timestamp",
            (pl.col("timestamp") - timedelta(microseconds=1)).alias("event_timestamp"), "label_row",
        ).to_pandas()
        for key in ("user_id", "item_id"):  # Arrow-backed strings: 10M Python str objects would take ~1 GB
            entity[key] = entity[key].astype(pd.ArrowDtype(pa.string()))
        return self.store.get_historical_features(entity_df=entity, features=self.views.training if features is None else features,
                                                  full_feature_names=False)

    def training_set(self, labels: pl.DataFrame) -> pl.DataFrame:
        """Point-in-time join: features as they were strictly before each label's time.

        Args:
            labels: user_id, item_id, timestamp (the interaction to predict).
        Returns:
            labels (in their order: the join itself does not keep it, and training batches depend on it)
            plus every feature of the training service, from snapshots older than ``timestamp``.
        """
        job = self._training_job(labels)
        return pl.from_pandas(job.to_df()).sort("label_row").drop("label_row")

    def training_batches(self, labels: pl.DataFrame, rows: int = 100_000, chunk_labels: int = 250_000):
        """The same join as :meth:`training_set`, streamed: frames of at most ``rows`` rows in no order, each row
        naming its label by ``label_row`` (features.inputs.TrainingRowsBuilder places them). Past ``chunk_labels``
        labels the join runs per chunk of whole users (consecutive user ids), each reading only its users' part of
        the user-sorted snapshot files (features.offline_store.asof_join's key ranges): one join over 8M labels
        spilled 33 GB to disk and held 14 GB; 200k-label chunks at 1M labels held 3.0 GB instead of 4.3. Another offline store than ours gives one frame per chunk.

        The training service's user views only: the item statistics are read as of each label from the snapshots
        (features.inputs.TrainingRowsBuilder), the same values; joined per chunk, each chunk read the whole
        item-stats file (3.2M snapshots at 10M interactions, about 0.36 s a chunk)."""
        user_refs = [f"{p.name_to_use()}:{f.name}" for p in self.views.training.feature_view_projections
                     if p.name != self.views.item_stats.name for f in p.features]
        labels = labels.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("label_row"))
        chunks = [labels]
        if labels.height > chunk_labels:
            by_user = labels.sort("user_id", maintain_order=True)
            users = by_user["user_id"]
            starts = np.flatnonzero(np.r_[True, (users.head(-1) != users.tail(-1)).to_numpy()])
            at = np.minimum(np.searchsorted(starts, np.arange(0, labels.height, chunk_labels)), len(starts) - 1)
            cuts = np.unique(np.r_[starts[at], labels.height])  # chunk starts moved to the next user's first label
            chunks = [by_user.slice(int(a), int(b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
        for chunk in chunks:
            job = self._training_job(chunk, user_refs)
            if not hasattr(job, "to_arrow_batches"):
                yield pl.from_pandas(job.to_df())
                continue
            for batch in job.to_arrow_batches(rows):
                if batch.num_rows:
                    yield pl.from_arrow(batch)

    # Online reads -----------------------------------------------------------------------------------
    def online_users(self, user_ids: list[str]) -> OnlineUsers:
        from features.online import read_rows

        hist = read_rows(self.store, self._view(self.views.user_history.name), "user_id", user_ids,
                         ["history_vector", "history_norm", "recent_item_ids", "history_count", "history_events_seq"])
        stats = read_rows(self.store, self._view(self.views.user_stats.name), "user_id", user_ids,
                          ["n_interactions", "mean_value", "user_first_seen", "stats_events_seq"])
        seen = read_rows(self.store, self._view(self.views.user_seen.name), "user_id", user_ids,
                         ["seen_item_ids", "seen_events_seq"])
        seqs = {k: np.array([s or 0 for s in f[f"{k}_events_seq"]], np.int64) for k, f in
                (("history", hist), ("stats", stats), ("seen", seen))}
        vec = np.zeros((len(user_ids), self.dim), np.float32)
        for i, v in enumerate(hist["history_vector"]):
            if v is not None:
                vec[i] = v
        return OnlineUsers(
            user_ids, np.array([v is not None for v in hist["history_vector"]]), vec,
            np.array([n or 0.0 for n in hist["history_norm"]], np.float32),
            [list(r) if r is not None else [] for r in hist["recent_item_ids"]],
            np.array([c or 0 for c in hist["history_count"]]),
            np.array([c or 0 for c in stats["n_interactions"]]),
            np.array([m or 0.0 for m in stats["mean_value"]], np.float32),
            np.array([t.timestamp() if isinstance(t, datetime) else 0.0 for t in stats["user_first_seen"]]),
            [list(r) if r is not None else [] for r in seen["seen_item_ids"]],
            seqs,
        )

    def online_users_now(self, user_ids: list[str], log, item_vector) -> OnlineUsers:
        """The users' online rows plus their events in ``log`` (recsys.events) that the rows do not include yet:
        what serving reads. ``item_vector``: item id -> (dim,) unit vector or None (see fold_events)."""
        users = self.online_users(user_ids)
        after = {u: int(min(users.events_seq[k][r] for k in users.events_seq)) for r, u in enumerate(user_ids)}
        events = log.user_events(user_ids, after)
        if not events:
            users.events_folded = np.zeros(len(user_ids), np.int64)
            return users
        return fold_events(users, events, item_vector, self.cfg.embedder.history_half_life, self.cfg.features.recent_items)

    def online_items(self, item_ids: list[str]) -> OnlineItems:
        from features.online import read_rows

        emb = read_rows(self.store, self._view(self.views.item_embedding.name), "item_id", item_ids, ["embedding"])
        st = read_rows(self.store, self._view(self.views.item_stats.name), "item_id", item_ids,
                       ["pop_all", "pop_30d", "item_first_seen", "has_text", "has_image", "has_audio", "has_video"])
        vec = np.zeros((len(item_ids), self.dim), np.float32)
        for i, v in enumerate(emb["embedding"]):
            if v is not None:
                vec[i] = v
        return OnlineItems(
            item_ids, np.array([v is not None for v in emb["embedding"]]), vec,
            np.array([c or 0 for c in st["pop_all"]]), np.array([c or 0 for c in st["pop_30d"]]),
            np.array([(t.timestamp() if isinstance(t, datetime) else (t or 0)) for t in st["item_first_seen"]], np.float64),
            np.array([[x or 0 for x in st[k]] for k in ("has_text", "has_image", "has_audio", "has_video")]).T,
        )


__all__ = ["CATALOG_TIME", "FeatureRepo", "FeatureValidationError", "MaterializeReport", "OnlineItems", "OnlineUsers",
           "fold_events", "validate_vectors"]
