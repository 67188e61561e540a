"""What the local embedder's weights learned from, and the check that no evaluation scores them on it.

``recsys train-embedder`` records in the weights' manifest (``training_data``) the dataset's content hash,
the split settings, the items it held out (the COLD protocol's validation and test items) and the rule for
the interactions its co-engagement pairs came from. Before a protocol is evaluated, :func:`check_overlap`
refuses (DataError) when the current split would test on what the weights trained on: a different seed or
cold fraction on the same data, say, would otherwise evaluate COLD on items the embedder saw.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from recsys.config import EvalConfig
from recsys.data.types import Dataset
from recsys.errors import DataError


def dataset_hash(ds: Dataset) -> str:
    """SHA-256 (first 16 hex digits) of the catalog's ids and every (user, item, timestamp) interaction, in a
    canonical order: the same data gives the same hash whatever the file order or the media attached."""
    h = hashlib.sha256()
    h.update("\n".join(sorted(ds.catalog.ids)).encode())
    rows = ds.interactions.frame.select("user_id", "item_id", pl.col("timestamp").dt.epoch("s")).sort(
        "user_id", "item_id", "timestamp")
    for col in rows.columns:
        h.update(rows[col].cast(pl.Utf8).str.join("\n").item().encode())
    return h.hexdigest()[:16]


def trained_cold_items(training_data: dict, ds: Dataset, split) -> list[str]:
    """The items a COLD ``split`` hides from training that weights trained on ``training_data`` (a manifest's
    record, on this dataset) learned from: none when the split's settings are the ones the weights record, most
    of them under another ``eval.seed`` (another draw of the cold items)."""
    held = set(training_data.get("held_out_items", []))
    return sorted(set(np.array(ds.catalog.ids)[split.cold_items].tolist()) - held)


def trained_test_interactions(training_data: dict, ds: Dataset, split) -> pl.DataFrame:
    """The (user_id, item_id) test interactions of a warm ``split`` (LOO, TEMPORAL) that weights trained on
    ``training_data`` (a manifest's record, on this dataset) learned from: empty when the split's settings are
    the ones the weights record."""
    from recsys.eval.splits import shared_training_interactions

    s = training_data.get("split", {})
    rule = EvalConfig(seed=s.get("seed", 0), cold_fraction=s.get("cold_fraction", 0.2),
                      cold_pool=s.get("cold_pool", "auto"), temporal_quantile=s.get("temporal_quantile", 0.9))
    trained = shared_training_interactions(ds, rule)
    ids = np.array(ds.catalog.ids)
    targets = pl.DataFrame({"user_id": [u for u, t in zip(split.test.users, split.test.targets) for _ in t],
                            "item_id": [ids[i] for t in split.test.targets for i in t],
                            "at": [a for a, t in zip(split.test.at, split.test.targets) for _ in t]},
                           schema_overrides={"at": trained.schema["timestamp"]})
    return targets.join(trained, on=["user_id", "item_id"]).filter(pl.col("timestamp") >= pl.col("at"))


def check_overlap(training_data: dict | None, ds: Dataset, split, dataset_digest: str | None = None) -> str:
    """Raise DataError when ``split`` (a recsys.eval.splits.Split) tests on items or interactions the weights
    trained on; otherwise return a one-line statement of what was checked.

    Args:
        training_data: the manifest's ``training_data`` (None: weights that do not record it; not checked).
        dataset_digest: ``dataset_hash(ds)`` when the caller has it already.
    """
    if not training_data:
        return "embedder weights do not record their training data: overlap not checked"
    digest = dataset_digest or dataset_hash(ds)
    if training_data.get("dataset_hash") != digest:
        return f"embedder trained on other data ({training_data.get('dataset')}): no overlap with {ds.name}"
    if split.name == "cold":
        seen = trained_cold_items(training_data, ds, split)
        if seen:
            raise DataError(
                f"the embedder's weights trained on {len(seen)} of this COLD split's {split.cold_items.size} held-out "
                f"items (e.g. {seen[:5]}): the split settings differ from those the weights record "
                f"({training_data.get('split')}); use those settings or retrain with `recsys train-embedder`")
        return f"COLD: none of the {split.cold_items.size} held-out items was in the embedder's training data"
    s = training_data.get("split", {})
    overlap = trained_test_interactions(training_data, ds, split)
    if overlap.height:
        ex = overlap.select("user_id", "item_id").head(5).rows()
        raise DataError(
            f"the embedder's weights trained on {overlap.height} of this {split.name.upper()} split's test interactions "
            f"(e.g. {ex}): the split settings differ from those the weights record ({s}); use those settings "
            "or retrain with `recsys train-embedder`")
    return f"{split.name.upper()}: no test interaction was in the embedder's training data"
