"""The Feast feature repository: entities, sources, feature views, feature services, push source.

Declarative, in the style of Feast's own template, inside one function because two things are only
known at run time: the data folder (under the run's work directory; absolute, as Feast's DuckDB
offline store reads paths relative to the process, not the repo) and the embedding space. Views whose content depends
on the embedder (item vectors, user-history vectors) are versioned by name with the embedder's model
version and dimension, so a new embedder or a new dim is a new view and vectors of different spaces
never mix. Nearest-neighbour search is not Feast's job here
(FAISS does it); Feast serves lookups by id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Int64, String, UnixTimestamp


# Each user row records the event-log position it includes (<view>_events_seq: one name per view, as a feature
# service's names must differ); serving folds the user's later events on top.
SEQ = "highest event-log sequence (recsys/events.py) folded into this row; 0: the dataset's rows only"


def version_tag(model_version: str, dim: int) -> str:
    """A name-safe suffix for views that hold one embedding space, e.g. ``local_fusion_ab12cd_d256``."""
    return f"{re.sub(r'[^A-Za-z0-9]+', '_', model_version).strip('_')}_d{dim}"


@dataclass(frozen=True)
class Repository:
    """Every Feast object of one repository and embedding space (backend + model version + dim)."""

    item: Entity
    user: Entity
    item_stats: FeatureView
    user_stats: FeatureView
    item_embedding: FeatureView
    user_history: FeatureView
    user_history_push: PushSource
    user_seen: FeatureView
    user_seen_push: PushSource
    training: FeatureService
    serving: FeatureService

    @property
    def objects(self) -> list:
        return [self.item, self.user, self.item_stats, self.user_stats, self.user_history_push,
                self.item_embedding, self.user_history, self.user_seen_push, self.user_seen, self.training, self.serving]


def repository(data: Path, backend: str, model_version: str, dim: int, recent_items: int = 20) -> Repository:
    """The whole feature repository, with parquet files under ``data``."""
    # Entities: the join keys every view hangs off.
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING, description="A catalog item")
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="A user")

    # Item statistics, one snapshot per item and day it was engaged with, so training joins see them as of then.
    item_stats_source = FileSource(name="item_stats_source", path=str(data / "item_stats.parquet"), timestamp_field="event_timestamp")
    item_stats = FeatureView(
        name="item_stats",
        entities=[item],
        ttl=timedelta(days=0),  # 0 = no expiry: the latest snapshot before the join time holds
        schema=[
            Field(name="pop_all", dtype=Int64, description="interactions up to the snapshot"),
            Field(name="pop_30d", dtype=Int64, description="interactions in the 30 days up to the snapshot"),
            Field(name="item_first_seen", dtype=UnixTimestamp, description="time of the item's first interaction"),
            Field(name="has_text", dtype=Int64),
            Field(name="has_image", dtype=Int64),
            Field(name="has_audio", dtype=Int64),
            Field(name="has_video", dtype=Int64),
        ],
        source=item_stats_source,
        tags={"stage": "features"},
    )

    # User statistics, one snapshot per user and interaction time.
    user_stats_source = FileSource(name="user_stats_source", path=str(data / "user_stats.parquet"), timestamp_field="event_timestamp")
    user_stats = FeatureView(
        name="user_stats",
        entities=[user],
        ttl=timedelta(days=0),
        schema=[
            Field(name="n_interactions", dtype=Int64),
            Field(name="mean_value", dtype=Float32, description="mean rating (0 when the data has none)"),
            Field(name="user_first_seen", dtype=UnixTimestamp),
            Field(name="stats_events_seq", dtype=Int64, description=SEQ),
        ],
        source=user_stats_source,
    )

    # Views of one embedding space are named with its version and dim: spaces never mix.
    tag = version_tag(f"{backend}_{model_version}", dim)
    tags = {"embedder": backend, "model_version": model_version, "dim": str(dim)}

    # The item's multimodal vector (written by the nightly embedding job).
    item_source = FileSource(name=f"item_embedding_source__{tag}", path=str(data / f"item_embedding__{tag}.parquet"),
                             timestamp_field="event_timestamp")
    item_embedding = FeatureView(
        name=f"item_embedding__{tag}",
        entities=[item],
        ttl=timedelta(days=0),
        schema=[Field(name="embedding", dtype=Array(Float32), vector_length=dim, description=f"L2-normalised, {dim}-d")],
        source=item_source,
        tags=tags,
    )

    # The user's history as of each interaction: an exponentially decayed sum of the items' vectors, the ids
    # of the most recent items, and the count. Online, serving folds the user's newer events from the event log on
    # top (features.store.fold_events); the push source stays for teams that push rows themselves.
    history_source = FileSource(name=f"user_history_source__{tag}", path=str(data / f"user_history__{tag}.parquet"),
                                timestamp_field="event_timestamp")
    history_push = PushSource(name=f"user_history_push__{tag}", batch_source=history_source)
    user_history = FeatureView(
        name=f"user_history__{tag}",
        entities=[user],
        ttl=timedelta(days=0),
        schema=[
            Field(name="history_vector", dtype=Array(Float32), vector_length=dim),
            Field(name="history_norm", dtype=Float32, description="length of the decayed sum before normalising"),
            Field(name="recent_item_ids", dtype=Array(String), description=f"up to {recent_items}, newest first"),
            Field(name="history_count", dtype=Int64),
            Field(name="history_events_seq", dtype=Int64, description=SEQ),
        ],
        source=history_push,
        tags=tags,
    )

    # Every item the user has interacted with, one row per user (serving's seen filter: a user never gets back
    # an item they already had, however long ago). Not a training input; serving adds the event log's newer events.
    seen_source = FileSource(name="user_seen_source", path=str(data / "user_seen.parquet"), timestamp_field="event_timestamp")
    seen_push = PushSource(name="user_seen_push", batch_source=seen_source)
    user_seen = FeatureView(
        name="user_seen",
        entities=[user],
        ttl=timedelta(days=0),
        schema=[Field(name="seen_item_ids", dtype=Array(String), description="every item interacted with, newest first"),
                Field(name="seen_events_seq", dtype=Int64, description=SEQ)],
        source=seen_push,
    )

    # What the two-tower trains on, and what serving reads: the same features, by construction. The positive's
    # content vector is not joined per label: training reads it from the item table it is given, as it does for
    # the sampled negatives and as serving's index does (features.inputs.TrainingRows).
    training = FeatureService(name=f"two_tower_training__{tag}",
                              features=[user_history, user_stats, item_stats], tags=tags)
    serving = FeatureService(name=f"two_tower_serving__{tag}", features=[user_history, user_stats, user_seen], tags=tags)
    return Repository(item, user, item_stats, user_stats, item_embedding, user_history, history_push, user_seen, seen_push,
                      training, serving)


