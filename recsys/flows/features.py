"""The Feast stage of a run: a repository per protocol (training features, offline only) and the serving one
(all interactions, materialized to the online store)."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.store import FeatureRepo
from recsys.config import Config
from recsys.data import Dataset
from recsys.embed.catalog import ItemVectors
from recsys.eval.compare import ProtocolRun
from recsys.progress import console


def build_features(cfg: Config, ds: Dataset, vectors: np.ndarray, iv: ItemVectors, interactions: pl.DataFrame,
                   name: str, materialize: bool):
    """A Feast repository holding ``interactions``-derived features and the item vectors."""
    repo = FeatureRepo(cfg, iv.backend, iv.model_version, iv.dim, name=name)
    repo.write_item_embeddings(ds.catalog.ids, vectors)
    counts = repo.write_interaction_features(interactions, ds.catalog, vectors)
    repo.apply()
    if materialize:
        report = repo.materialize(progress=True)
        counts["materialized"] = sum(report.rows.values())
    console.print(f"feast[{name}]: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return repo


def serve_features(cfg: Config, ds: Dataset, candidates: dict[str, ItemVectors], registered: "ProtocolRun | None"):
    """The serving store (all interactions, materialized) in the item space the registered model reads (the
    fused one when nothing was registered)."""
    mode = registered.extra.get("item_input", {}).get("chosen") if registered is not None else None
    iv = candidates.get(mode) or candidates.get("fused") or next(iter(candidates.values()))
    return build_features(cfg, ds, iv.vectors, iv, ds.interactions.frame, name="serve", materialize=True)
