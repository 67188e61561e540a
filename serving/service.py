"""The online path: request(user) -> Feast online -> user tower -> FAISS top-N -> filters -> reranker -> top-k.

:class:`Recommender` loads a registered two-tower by alias from MLflow (the user tower, the item
vectors it was logged with, the reranker) and reads features from the "serve" Feast repository.
The HTTP app (serving/app.py), the demo and the notebooks all call it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from features.store import FeatureRepo
from recsys.config import Config
from serving.candidates import CandidateIndex
from serving.reranker import Candidates, Reranker
from training.inputs import item_stat_matrix, recent_matrix, user_stat_matrix

MODALITY_NAMES = ("text", "image", "audio", "video")


class UnknownItemError(KeyError):
    pass


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float
    retrieval_score: float


@dataclass
class RecommendResponse:
    user_id: str
    items: list[Recommendation]
    known_user: bool
    model: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    reranked: bool = False  # whether the reranker ordered these (else: the retrieval order)


@dataclass
class ModelBundle:
    """What one registered two-tower version needs online."""

    version: str
    run_id: str
    user_tower: torch.nn.Module
    item_ids: list[str]
    titles: list[str]
    item_vectors: np.ndarray  # (n, vector_dim) item-tower outputs
    content: np.ndarray  # (n, D) embedder vectors
    known: np.ndarray  # (n,) ids the model was trained on
    config: dict
    reranker: Reranker | None

    @classmethod
    def from_mlflow(cls, cfg: Config, alias: str | None = None, version: str | None = None) -> "ModelBundle":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
        client = mlflow.tracking.MlflowClient()
        name = cfg.train.registered_model
        mv = client.get_model_version(name, version) if version else \
            client.get_model_version_by_alias(name, alias or cfg.serve.model_alias)
        tower = mlflow.pytorch.load_model(f"models:/{name}/{mv.version}", map_location="cpu").eval()
        folder = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="two_tower"))
        arrays = np.load(folder / "item_vectors.npz", allow_pickle=False)
        reranker = Reranker.load(folder / "reranker.joblib") if (folder / "reranker.joblib").exists() else None
        bundle = cls(str(mv.version), mv.run_id, tower, arrays["ids"].tolist(), arrays["titles"].tolist(),
                     arrays["vectors"], arrays["content"], arrays["known"],
                     json.loads((folder / "two_tower.json").read_text()), reranker)
        refreshed = cfg.workdir / "index" / "item_vectors.npz"  # written by `recsys nightly` for this version
        if refreshed.exists():
            fresh = np.load(refreshed, allow_pickle=False)
            if str(fresh["model_version"]) == bundle.version:
                bundle.item_ids, bundle.titles = fresh["ids"].tolist(), fresh["titles"].tolist()
                bundle.item_vectors, bundle.content, bundle.known = fresh["vectors"], fresh["content"], fresh["known"]
        return bundle


class Recommender:
    """Online recommendations for one model version and one feature repository."""

    def __init__(self, cfg: Config, bundle: ModelBundle, repo: FeatureRepo):
        self.cfg, self.bundle, self.repo = cfg, bundle, repo
        self.index_of = {i: r for r, i in enumerate(bundle.item_ids)}
        self.n_items = len(bundle.item_ids)
        self.faiss = CandidateIndex(bundle.item_vectors, kind=cfg.serve.faiss_index, use_gpu=cfg.serve.use_gpu)
        self.content_table = np.vstack([bundle.content, np.zeros((1, bundle.content.shape[1]), np.float32)])
        self.known = np.append(bundle.known, False)
        self.recent = int(bundle.config["tower"]["recent"])

    @classmethod
    def load(cls, cfg: Config, alias: str | None = None) -> "Recommender":
        bundle = ModelBundle.from_mlflow(cfg, alias=alias)
        e = bundle.config
        repo = FeatureRepo(cfg, e["embedder"], e["embedder_version"], int(e["dim"]), name="serve")
        return cls(cfg, bundle, repo)

    @torch.inference_mode()
    def recommend(self, user_id: str, k: int | None = None, exclude: list[str] | None = None,
                  modalities: list[str] | None = None, rerank: bool | None = None) -> RecommendResponse:
        """Top-k items for ``user_id``; an unknown user gets the model's answer for an empty history.

        Args:
            exclude: item ids never to return (the user's recent items are always excluded).
            modalities: keep only items that have all of these parts (e.g. ["video"]).
        """
        k = k or self.cfg.serve.k
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        users = self.repo.online_users([user_id])
        timings["features_user_ms"] = (time.perf_counter() - t0) * 1000
        recent_ids = users.recent_item_ids[0]
        rows, mask = recent_matrix([recent_ids], self.index_of, self.recent, self.n_items)
        now = datetime.now(timezone.utc).timestamp()
        stats = user_stat_matrix(users.n_interactions, users.mean_value, users.first_seen, now)
        t1 = time.perf_counter()
        vec = self.bundle.user_tower(
            torch.from_numpy(users.history_vector), torch.from_numpy(self.content_table[rows]), torch.from_numpy(rows),
            torch.from_numpy(mask), torch.from_numpy(mask & self.known[rows]), torch.from_numpy(stats),
        ).numpy()
        timings["user_tower_ms"] = (time.perf_counter() - t1) * 1000
        skip = {self.index_of[i] for i in [*recent_ids, *(exclude or [])] if i in self.index_of}
        t2 = time.perf_counter()
        scores, cand = self.faiss.search(vec, self.cfg.serve.candidates, exclude=[skip])
        timings["faiss_ms"] = (time.perf_counter() - t2) * 1000
        keep = cand[0] >= 0
        if modalities:
            want = [MODALITY_NAMES.index(m) for m in modalities]
            items = self.repo.online_items([self.bundle.item_ids[r] for r in cand[0][keep]])
            ok = items.modalities[:, want].all(1)
            idx = np.flatnonzero(keep)
            keep[idx[~ok]] = False
        cand, scores = cand[:, keep], scores[:, keep]
        t3 = time.perf_counter()
        items = self.repo.online_items([self.bundle.item_ids[r] for r in cand[0]])
        timings["features_items_ms"] = (time.perf_counter() - t3) * 1000
        item_stats = item_stat_matrix(items.pop_all, items.pop_30d, items.first_seen, now, items.modalities)
        # by default only a reranker that beat retrieval on validation; an explicit rerank=true forces it
        reranker = self.bundle.reranker
        use_reranker = (reranker is not None and reranker.fitted and cand.shape[1] > 0
                        and (rerank if rerank is not None else self.cfg.serve.rerank and reranker.helps))
        if use_reranker:
            c = Candidates(cand, scores, users.history_vector, stats, item_stats[None], self.bundle.content[cand[0]][None])
            t4 = time.perf_counter()
            top, top_scores = self.bundle.reranker.rerank(c, k)
            timings["rerank_ms"] = (time.perf_counter() - t4) * 1000
        else:
            top, top_scores = cand[:, :k], scores[:, :k]
        retrieval = dict(zip(cand[0].tolist(), scores[0].tolist()))
        out = [Recommendation(self.bundle.item_ids[r], self.bundle.titles[r], float(s), float(retrieval.get(int(r), s)))
               for r, s in zip(top[0], top_scores[0]) if r >= 0]
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        return RecommendResponse(user_id, out, bool(users.found[0]), f"{self.cfg.train.registered_model}/v{self.bundle.version}",
                                 timings, reranked=bool(use_reranker))

    def record_interaction(self, user_id: str, item_id: str, at: datetime | None = None) -> None:
        """Fold a new interaction into the user's online features (Feast push), no materialization."""
        if item_id not in self.index_of:
            raise UnknownItemError(item_id)
        at = at or datetime.now(timezone.utc)
        self.repo.push_interaction(user_id, item_id, at, self.bundle.content[self.index_of[item_id]])
