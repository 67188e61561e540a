"""The train-to-serve contract: what a registered two-tower model is, written down once.

Training writes it (``training/train.py`` logs the artifacts below and records :func:`record` in
``two_tower.json``); serving, evaluation and the nightly read it (:func:`check`, :class:`VectorLayout`,
the statistics columns by name). A change on one side only fails ``tests/test_contract.py``:

- the registered run's artifacts (``ARTIFACT_PATH``/...): the exported user tower, the item vectors and
  the arrays in them, the towers' configuration, the optional reranker; the item tower as an MLflow model;
- the user tower's inputs in order (:data:`USER_INPUTS`) and the item tower's (:data:`ITEM_INPUTS`);
- the statistics columns by name (:data:`ITEM_STATS`, :data:`USER_STATS`);
- the layout of both towers' output vectors (:class:`VectorLayout`): the unit part, the content-match block,
  the bias coordinate.

No torch here: serving's HTTP layer, the nightly and notebooks import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

VERSION = 1  # bump on any change below that a model registered before it would not satisfy

# The registered run's files ---------------------------------------------------------------------------
ARTIFACT_PATH = "two_tower"  # folder of the run's artifacts
USER_TOWER_FILE = "user_tower.pt2"  # torch.export program of the user tower (what serving runs)
ITEM_VECTORS_FILE = "item_vectors.npz"  # the arrays below
CONFIG_FILE = "two_tower.json"  # towers' config, embedder space, item input, the contract record
RERANKER_FILE = "reranker.joblib"  # optional second stage
ITEM_TOWER_MODEL = "item_tower"  # MLflow pytorch model (the nightly re-encodes a changed catalog with it)
USER_TOWER_MODEL = "user_tower"  # MLflow pytorch model (what the registry version points at)
ITEM_VECTOR_ARRAYS = ("ids", "titles", "vectors", "content", "known", "temperature", "queries")

# The towers' inputs, in the order their forward() takes them -----------------------------------------
USER_INPUTS = ("history", "recent_content", "recent_ids", "recent_mask", "recent_id_mask", "stats")
ITEM_INPUTS = ("content", "stats", "ids", "id_mask")

# Statistics columns ---------------------------------------------------------------------------------
ITEM_STATS = ("log_pop_all", "log_pop_30d", "log_age_days", "has_text", "has_image", "has_audio", "has_video")
USER_STATS = ("log_n_interactions", "mean_value", "log_days_since_first")
ITEM_INTERACTION_STATS = ITEM_STATS[:3]  # derived from interactions: hidden for cold items, zero for new ones


def item_stat(name: str) -> int:
    """Column of ``name`` in an item statistics matrix (N, len(ITEM_STATS))."""
    return ITEM_STATS.index(name)


def user_stat(name: str) -> int:
    """Column of ``name`` in a user statistics matrix (N, len(USER_STATS))."""
    return USER_STATS.index(name)


class ContractError(ValueError):
    """A registered model was written under another contract than this code reads."""


@dataclass(frozen=True)
class VectorLayout:
    """Both towers' output vectors, (N, width) = [unit part | content block | bias].

    unit part: (out_dim,) L2-normalised; content block: (content_dim,) only with ``content_match`` (the item's
    unit content vector; the user's unit history vector times the learned weight); bias: one coordinate with
    ``item_bias`` (the item's prior; 1 on the user side), always last. Score = <user, item>."""

    out_dim: int
    content_dim: int
    content_match: bool = False
    item_bias: bool = True

    @classmethod
    def from_tower(cls, tower: dict) -> "VectorLayout":
        """From a TowerConfig's dict (``two_tower.json``'s ``tower``)."""
        return cls(int(tower["out_dim"]), int(tower["content_dim"]), bool(tower.get("content_match", False)),
                   bool(tower.get("item_bias", True)))

    @property
    def width(self) -> int:
        return self.out_dim + (self.content_dim if self.content_match else 0) + (1 if self.item_bias else 0)

    @property
    def unit(self) -> slice:
        return slice(0, self.out_dim)

    @property
    def content(self) -> slice | None:
        return slice(self.out_dim, self.out_dim + self.content_dim) if self.content_match else None

    @property
    def bias(self) -> int | None:
        return self.width - 1 if self.item_bias else None

    def item_as_query(self, item_vectors: np.ndarray, content_match_weight: float = 1.0) -> np.ndarray:
        """Item vectors (N, width) turned into queries for items like them: the bias coordinate becomes 1 (as a
        user's) and the content block weighs as a user's history block does.

        Returns:
            (N, width) float32, a copy."""
        q = np.array(item_vectors, np.float32, copy=True)
        if q.ndim != 2 or q.shape[1] != self.width:
            raise ContractError(f"item vectors of shape {q.shape} do not have the layout's width {self.width}")
        if self.bias is not None:
            q[:, self.bias] = 1.0
        if self.content is not None:
            q[:, self.content] *= content_match_weight
        return q


def record(layout: VectorLayout) -> dict:
    """What training writes into ``two_tower.json`` under ``contract``."""
    return {"version": VERSION, "user_inputs": list(USER_INPUTS), "item_inputs": list(ITEM_INPUTS),
            "item_stats": list(ITEM_STATS), "user_stats": list(USER_STATS), "layout": asdict(layout)}


def check(config: dict, where: str = "the registered model") -> VectorLayout:
    """The layout of a registered model's ``two_tower.json`` (``config``), once its contract record matches
    this code's; a model from before the record existed is read as version 1 from its ``tower``.

    Raises:
        ContractError: naming what differs (retrain, or serve with the code it was trained with)."""
    layout = VectorLayout.from_tower(config["tower"])
    got = config.get("contract")
    if got is None:
        return layout
    want = record(layout)
    diffs = [f"{k}: model {got.get(k)!r}, code {v!r}" for k, v in want.items() if got.get(k) != v]
    if diffs:
        raise ContractError(f"{where} was trained under another train-to-serve contract (recsys.contract): "
                            + "; ".join(diffs) + ". Retrain it, or serve it with the code it was trained with")
    return layout
