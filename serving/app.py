"""The HTTP service (FastAPI). Bad requests get a 4xx with a reason; nothing a client sends yields a 500.

    GET  /health                         model version, items indexed
    GET  /recommend/{user_id}?k=10       top-k for a user (unknown users get the empty-history answer)
    POST /recommend                      {user_id, k, exclude, modalities, rerank}; rerank left out: the
                                         reranker only if it beat retrieval on validation (reply: reranked)
    POST /interactions                   {user_id, item_id, timestamp?}: updates the user's online features
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from recsys.config import Config
from serving.service import Recommender, UnknownItemError


class RecommendRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    k: int = Field(10, ge=1, le=500)
    exclude: list[str] = Field(default_factory=list, max_length=10_000)
    modalities: list[Literal["text", "image", "audio", "video"]] = Field(default_factory=list)
    rerank: bool | None = None


class Item(BaseModel):
    item_id: str
    title: str
    score: float
    retrieval_score: float


class RecommendReply(BaseModel):
    user_id: str
    known_user: bool
    model: str
    items: list[Item]
    timings_ms: dict[str, float]
    reranked: bool


class InteractionRequest(BaseModel):
    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    timestamp: datetime | None = None


def create_app(cfg: Config, recommender: Recommender | None = None) -> FastAPI:
    app = FastAPI(title="recsys", version="0.1.0", description=__doc__)
    state: dict[str, Recommender] = {}

    def rec() -> Recommender:
        if "r" not in state:
            state["r"] = recommender or Recommender.load(cfg)
        return state["r"]

    def reply(r) -> RecommendReply:
        return RecommendReply(user_id=r.user_id, known_user=r.known_user, model=r.model, timings_ms=r.timings_ms,
                              reranked=r.reranked, items=[Item(**vars(i)) for i in r.items])

    @app.get("/health")
    def health() -> dict:
        r = rec()
        return {"status": "ok", "model": f"{cfg.train.registered_model}/v{r.bundle.version}", "items": r.n_items,
                "faiss": r.faiss.kind, "gpu": r.faiss.on_gpu, "online_store": cfg.features.online_store}

    @app.get("/recommend/{user_id}", response_model=RecommendReply)
    def recommend_get(user_id: str, k: int = Query(10, ge=1, le=500)) -> RecommendReply:
        return reply(rec().recommend(user_id, k=k))

    @app.post("/recommend", response_model=RecommendReply)
    def recommend_post(req: RecommendRequest) -> RecommendReply:
        return reply(rec().recommend(req.user_id, k=req.k, exclude=req.exclude, modalities=req.modalities or None,
                                     rerank=req.rerank))

    @app.post("/interactions", status_code=202)
    def interactions(req: InteractionRequest) -> dict:
        try:
            rec().record_interaction(req.user_id, req.item_id, req.timestamp)
        except UnknownItemError:
            raise HTTPException(404, f"unknown item_id {req.item_id!r}")
        return {"status": "accepted", "user_id": req.user_id, "item_id": req.item_id}

    return app
