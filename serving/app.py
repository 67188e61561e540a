"""The HTTP service (FastAPI). Bad requests get a 4xx with a reason; nothing a client sends yields a 500.

    GET  /recommend/{user_id}?k=10          top-k for a user (unknown users: popularity, flagged)
    POST /recommend                         {user_id, k, exclude, modalities, rerank, recent_item_ids}
    GET  /items/{item_id}/similar?k=&space= item-to-item, in the two-tower space or the embedder's (content)
    POST /search                            multipart: text and/or image / audio / video files -> items
    POST /interactions                      {user_id, item_id, event_id?, timestamp?, request_id?}: appended to the
                                            event log (durable before the 202; a repeated event_id or
                                            Idempotency-Key is stored once); the user's next request reads it
    GET  /healthz  /readyz  /metrics        process up; model + index + feature store answering; Prometheus
    POST /admin/reload   GET /admin/status  load the version an alias points to now (or a given one), swap

With ``[experiment]`` configured, each user is served by their arm (serving/experiments.py) and every
/recommend reply carries a request id, the experiment and the arm; replies are appended to the exposure log
(recsys/experiments/logs.py), and an interaction that quotes a request id is that reply's outcome (the event log).

Authentication: an API key in ``X-API-Key`` or ``Authorization: Bearer`` on everything but /healthz,
/readyz and /metrics; an admin key for /admin/*. Keys come from ``serve.api_keys`` / ``serve.admin_keys``
or RECSYS_API_KEYS / RECSYS_ADMIN_KEYS (comma-separated) and are compared in constant time.
"""

from __future__ import annotations

import gc
import hmac
import json
import os
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, StringConstraints
from starlette.formparsers import MultiPartParser

from recsys.config import Config
from recsys.embed.base import EmbeddingError
from recsys.events import Event
from serving.experiments import ExperimentRouter
from serving.metrics import Metrics
from serving.batching import Batcher
from serving.search import SearchPool
from serving.service import NoModelError, NotReadyError, Query as RecommendQuery, Recommender, UnknownItemError

ID = dict(min_length=1, max_length=256)
AnId = Annotated[str, StringConstraints(min_length=1, max_length=256)]  # one id inside a list
K_CAP = 10_000  # the schema's bound; serve.max_k is the one in force
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RETRY_LOAD_S = 10.0
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")  # never shed, never behind a key


class RecommendRequest(BaseModel):
    user_id: str = Field(**ID)
    k: int = Field(10, ge=1, le=K_CAP)
    exclude: list[AnId] = Field(default_factory=list, max_length=10_000)
    modalities: list[Literal["text", "image", "audio", "video"]] = Field(default_factory=list)
    rerank: bool | None = None
    ranker: bool | None = Field(None, description="the multi-source ranking stage for this request; default: serve.ranker")
    recent_item_ids: list[AnId] = Field(default_factory=list, max_length=200,
                                       description="newest first; used when the store does not know the user yet")
    at: datetime | None = Field(None, description="event time for the exposure log (replays); default: now")


class Item(BaseModel):
    item_id: str
    title: str
    score: float
    retrieval_score: float
    team: str | None = Field(None, description="the arm that contributed this item (experiments)")
    propensity: float | None = Field(None, description="P(this item in the list) under the logging policy")


class RecommendReply(BaseModel):
    request_id: str = Field(description="quote it in POST /interactions so the outcome joins this exposure")
    experiment: str | None = None
    arm: str = Field("control", description="the user's arm; 'interleaved' when two arms share the reply")
    user_id: str
    known_user: bool
    fallback: str | None = Field(None, description="popularity (unknown user) or request_history")
    model: str
    items: list[Item]
    timings_ms: dict[str, float]
    reranked: bool
    ranked_by: str = Field(description="two-tower (retrieval order), reranker, ranker (multi-source) or popularity")


class ItemsReply(BaseModel):
    model: str
    space: str
    items: list[Item]
    timings_ms: dict[str, float]


class InteractionRequest(BaseModel):
    user_id: str = Field(**ID)
    item_id: str = Field(**ID)
    event_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$",
                                 description="idempotency key: a retry with the same id is stored once "
                                             "(default: the Idempotency-Key header, else a new id)")
    timestamp: datetime | None = None
    request_id: str | None = Field(None, max_length=64, description="the /recommend reply this follows, if any")
    event: str = Field("click", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")
    value: float | None = Field(None, allow_inf_nan=False)


class ReloadRequest(BaseModel):
    alias: str | None = Field(None, max_length=64)
    version: str | None = Field(None, max_length=32, pattern=r"^\d+$")


# Keys ----------------------------------------------------------------------------------------------------
def configured_keys(cfg: Config) -> tuple[list[str], list[str]]:
    """(api keys, admin keys) from the configuration and the environment."""
    env = lambda name: [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]  # noqa: E731
    return [*cfg.serve.api_keys, *env("RECSYS_API_KEYS")], [*cfg.serve.admin_keys, *env("RECSYS_ADMIN_KEYS")]


def check_host(cfg: Config, host: str | None = None) -> None:
    """Refuse to serve a non-loopback host (``host``, default serve.host) without an API key."""
    host = host or cfg.serve.host
    api, _ = configured_keys(cfg)
    if host not in LOOPBACK and not api:
        raise SystemExit(f"refusing to listen on {host} without an API key: set RECSYS_API_KEYS "
                         "(or serve.api_keys) or listen on 127.0.0.1")


def _presented(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def _matches(key: str | None, keys: list[str]) -> bool:
    ok = False
    for k in keys:  # every key compared, in constant time each
        ok |= key is not None and hmac.compare_digest(key.encode(), k.encode())
    return ok


# The reload request file: how /admin/reload reaches every worker process ------------------------------------
def reload_request_path(cfg: Config) -> Path:
    return cfg.workdir / "serve" / "reload.json"


def request_reload(cfg: Config, alias: str | None, version: str | None) -> dict:
    from recsys.index import atomic_write_text

    req = {"generation": time.time_ns(), "alias": alias, "version": version}
    path = reload_request_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(req))
    return req


class Loader:
    """Loads the model at start-up (in the background: /readyz is false until it is in) and applies reload
    requests as they appear, in this worker, off the request path."""

    def __init__(self, cfg: Config, rec: Recommender, metrics: Metrics | None):
        """``metrics``: None for an experiment arm's loader (the control's loader reports the model). An arm's
        recommender is pinned to its alias or version and reloads that, whatever a reload request names."""
        self.cfg, self.rec, self.metrics = cfg, rec, metrics
        self.pinned = rec.alias is not None or rec.version is not None
        self.generation = self._read().get("generation", 0)  # requests made before this worker started are done
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="recsys-loader", daemon=True)

    def _read(self) -> dict:
        try:
            return json.loads(reload_request_path(self.cfg).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _load(self, alias=None, version=None) -> None:
        try:
            first = self.rec.snapshot is None
            snap = self.rec.reload(alias=None if self.pinned else alias, version=None if self.pinned else version)
            self.rec.reload_error = None
            settle_heap()
            if self.metrics is not None:
                self.metrics.loaded(snap, reload=not first)
        except Exception as exc:  # keep serving the previous snapshot; the reason shows in /admin/status
            self.rec.reload_error = f"{type(exc).__name__}: {exc}"
            if self.metrics is not None and self.rec.snapshot is not None:
                self.metrics.reload_failures.inc()

    def _run(self) -> None:
        single_threaded()
        if self.rec.snapshot is None:
            self._load()
        else:
            settle_heap()
            if self.metrics is not None:
                self.metrics.loaded(self.rec.snapshot, reload=False)
        last_try = time.monotonic()
        while not self.stop.wait(self.cfg.serve.reload_poll_s):
            req = self._read()
            if req.get("generation", 0) > self.generation:
                self.generation = req["generation"]
                self._load(req.get("alias"), req.get("version"))
            elif self.rec.snapshot is None and time.monotonic() - last_try > RETRY_LOAD_S:
                last_try = time.monotonic()  # started before any model was registered: keep trying
                self._load()


def settle_heap() -> None:
    """Move everything alive now (the libraries' modules, the snapshot: about a million objects) out of the
    garbage collector's reach. A full collection walked them all and stalled every request for 300-450 ms
    every few seconds under load (BENCHMARKS.md); what requests allocate is still collected as usual."""
    gc.collect()
    gc.freeze()


def single_threaded() -> None:
    """One thread each for torch and FAISS (OpenMP) in the service: a request is a few small ops, concurrency
    comes from requests and workers, and several request threads each starting a team of OpenMP threads on
    2 cores made throughput fall as load rose (BENCHMARKS.md)."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


# The app ----------------------------------------------------------------------------------------------------
def create_app(cfg: Config, recommender: Recommender | None = None) -> FastAPI:
    from recsys.quiet import silence

    silence()
    check_host(cfg)  # here too, not only in the CLI: `uvicorn --factory` must not bypass it
    single_threaded()
    rec = recommender or Recommender(cfg)
    metrics = Metrics()
    loader = Loader(cfg, rec, metrics)
    router = ExperimentRouter(cfg, rec)
    loaders = [loader, *(Loader(cfg, r, None) for r in router.recommenders[1:])]
    api_keys, admin_keys = configured_keys(cfg)
    # /recommend: one model thread serving whatever has queued, in batches (serving/batching.py)
    batcher = Batcher(lambda items: router.recommend_many([q for q, _ in items], [at for _, at in items]),
                      max_batch=cfg.serve.max_batch, max_wait_s=cfg.serve.batch_wait_ms / 1000, init=single_threaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for ld in loaders:
            ld.thread.start()
        batcher.start()
        yield
        for ld in loaders:
            ld.stop.set()
        batcher.stop()
        searches.shutdown()
        router.close()  # the logs' last rows

    docs = {} if cfg.serve.open_docs or not (api_keys or admin_keys) else {"docs_url": None, "redoc_url": None,
                                                                         "openapi_url": None}
    app = FastAPI(title="recsys", version="0.2.0", description=__doc__, lifespan=lifespan, **docs)
    app.state.recommender, app.state.loader, app.state.router, app.state.batcher = rec, loader, router, batcher
    app.add_middleware(metrics.middleware, limits={"/search": cfg.serve.max_uploads * cfg.serve.max_upload_bytes + (64 << 10)},
                       default_limit=cfg.serve.max_body_bytes, max_in_flight=cfg.serve.max_in_flight, open_paths=OPEN_PATHS,
                       path_in_flight={"/search": cfg.serve.max_searches})
    searches = SearchPool(cfg, cfg.serve.search_workers)
    # uploads stay in memory while the form is parsed (at most serve.max_searches at once): spooled to disk past
    # 1 MiB, each 64 KiB chunk went through a thread-pool hop on the event loop
    MultiPartParser.spool_max_size = cfg.serve.max_upload_bytes + (1 << 20)

    async def require_key(request: Request) -> None:  # async: a few compares, no thread-pool hop
        if api_keys and not (_matches(_presented(request), api_keys) or _matches(_presented(request), admin_keys)):
            raise HTTPException(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})

    async def require_admin(request: Request) -> None:
        if (api_keys or admin_keys) and not _matches(_presented(request), admin_keys):
            raise HTTPException(403 if _presented(request) else 401, "this needs the admin key")

    if docs:  # the API description, behind the key like the API itself (serve.open_docs = true opens it)
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
        def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_key)])
        def swagger():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="recsys")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        """A bug, not the client's fault: a 500 with a short reason (the traceback goes to the log)."""
        import logging

        logging.getLogger("recsys.serving").exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500)

    @app.exception_handler(NotReadyError)
    async def not_ready(_: Request, exc: NotReadyError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(EmbeddingError)
    async def not_embeddable(_: Request, exc: EmbeddingError):
        """The query itself cannot be embedded (what the client sent): a 4xx with the embedder's reason."""
        return JSONResponse({"detail": f"the query could not be embedded: {exc}"}, status_code=422)

    @app.exception_handler(NoModelError)
    async def no_model(_: Request, exc: NoModelError):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(UnknownItemError)
    async def unknown_item(_: Request, exc: UnknownItemError):
        return JSONResponse({"detail": f"unknown item_id {exc.args[0]!r}"}, status_code=404)

    def reply(s) -> dict:
        """A Served (serving/experiments.py) as the RecommendReply's JSON object."""
        r = s.response
        metrics.stages({n: v for n, v in r.timings_ms.items() if n != "batch"})
        metrics.batch_size.observe(r.timings_ms.get("batch", 1))
        explored = s.pool is not None or s.arm == "interleaved"
        items = [{**vars(i), "team": t if s.experiment else None, "propensity": p if explored else None}
                 for i, t, p in zip(r.items, s.teams, s.propensities)]
        return {"request_id": s.request_id, "experiment": s.experiment, "arm": s.arm, "user_id": r.user_id,
                "known_user": r.known_user, "fallback": r.fallback, "model": r.model, "items": items,
                "timings_ms": r.timings_ms, "reranked": r.reranked, "ranked_by": r.ranked_by}

    def check_k(k: int) -> None:
        if k > cfg.serve.max_k:
            raise HTTPException(422, f"k={k} is over this service's limit of {cfg.serve.max_k} (serve.max_k)")
        n = rec.current().n_items
        if k > n:
            raise HTTPException(422, f"k={k} is more than the {n} items in the catalog")

    @app.get("/healthz")
    def healthz() -> dict:
        info = rec.index_info()
        snap = rec.snapshot
        return {"status": "ok", "model": f"{cfg.train.registered_model}/{snap.model}" if snap else None,
                "source": snap.bundle.source if snap else None, "items": snap.n_items if snap else 0,
                "index": info.to_dict() if info else None, "gpu": bool(info and info.on_gpu),
                "online_store": cfg.features.online_store, "reloads": rec.reloads,
                "ranker": snap.ranker_note if snap else None,
                "experiment": {"name": router.e.name, "mode": router.e.mode, "explore": router.e.explore,
                               "arms": {n: (r.snapshot.model if r.snapshot else None) for n, r in router.arms.items()}}
                if router.e.name else None}

    @app.get("/readyz")
    def readyz():
        for r in router.recommenders:  # every arm must be in before the experiment takes traffic
            ok, why = r.ready()
            if not ok:
                return JSONResponse({"ready": False, "reason": why}, status_code=503)
        return JSONResponse({"ready": True, "reason": "ready"}, status_code=200)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    async def serve_recommendation(query: RecommendQuery, at: datetime | None = None) -> Response:
        """One /recommend through the dynamic batcher (serving/batching.py), answered as JSON bytes built here:
        the reply is already typed (RecommendReply documents it), so FastAPI's re-validation is skipped."""
        check_k(query.k)
        try:
            served, queued_ms, size = await batcher.submit((query, at))
        except Exception as exc:  # the request's final outcome: an error row for its arm (a guardrail), then raised
            router.log_failure(query, at, exc)
            raise
        served.response.timings_ms["queue_ms"] = queued_ms
        served.response.timings_ms["batch"] = size
        return Response(json.dumps(reply(served), separators=(",", ":")).encode(), media_type="application/json")

    @app.get("/recommend/{user_id}", response_model=RecommendReply, dependencies=[Depends(require_key)])
    async def recommend_get(user_id: str = PathParam(**ID), k: int = Query(10, ge=1, le=K_CAP)):
        return await serve_recommendation(RecommendQuery(user_id, k))

    @app.post("/recommend", response_model=RecommendReply, dependencies=[Depends(require_key)])
    async def recommend_post(req: RecommendRequest):
        if req.ranker and rec.current().ranker is None:
            raise HTTPException(409, f"no ranking stage is served: {rec.current().ranker_note}")
        return await serve_recommendation(RecommendQuery(req.user_id, req.k, exclude=req.exclude,
                                                         modalities=req.modalities or None, rerank=req.rerank,
                                                         recent_item_ids=req.recent_item_ids or None,
                                                         ranker=req.ranker), req.at)

    @app.get("/items/{item_id}/similar", response_model=ItemsReply, dependencies=[Depends(require_key)])
    def similar(item_id: str = PathParam(**ID), k: int = Query(10, ge=1, le=K_CAP),
                space: Literal["two-tower", "content"] = "two-tower") -> ItemsReply:
        check_k(k)
        t0 = time.perf_counter()
        items, snap = rec.similar(item_id, k, space)
        return ItemsReply(model=snap.model, space=space, items=[Item(**vars(i)) for i in items],
                          timings_ms={"total_ms": (time.perf_counter() - t0) * 1000})

    @app.post("/search", response_model=ItemsReply, dependencies=[Depends(require_key)])
    async def search(text: str | None = Form(None, max_length=20_000), k: int = Form(10, ge=1, le=K_CAP),
                     files: list[UploadFile] = File(default_factory=list)) -> ItemsReply:
        check_k(k)  # at most serve.max_searches get here at once (the middleware sheds the rest unread)
        uploads = await read_uploads(text, files, cfg)
        t0 = time.perf_counter()
        mode, dim = rec.query_space()
        q = await searches.embed(text, uploads, mode, dim)  # decoded and embedded in the search process
        items, snap = rec.search_vector(q, k)
        return ItemsReply(model=snap.model, space="content", items=[Item(**vars(i)) for i in items],
                          timings_ms={"total_ms": (time.perf_counter() - t0) * 1000})

    @app.post("/interactions", status_code=202, dependencies=[Depends(require_key)])
    def interactions(req: InteractionRequest, request: Request) -> dict:
        key = req.event_id or request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= 128):
            raise HTTPException(422, "Idempotency-Key must be 1 to 128 characters")
        event = Event.new(req.user_id, req.item_id, req.timestamp, event_id=key, event=req.event, value=req.value,
                          request_id=req.request_id)
        done = rec.record_interaction(event)  # durable in the event log before the reply (an outcome too, by request_id)
        metrics.event(done.new)
        return {"status": "accepted" if done.new else "duplicate", "event_id": event.event_id, "seq": done.seq,
                "user_id": req.user_id, "item_id": req.item_id, "request_id": req.request_id}

    @app.post("/admin/reload", status_code=202, dependencies=[Depends(require_admin)])
    def admin_reload(req: ReloadRequest | None = None) -> dict:
        req = req or ReloadRequest()
        r = request_reload(cfg, req.alias, req.version)
        return {"status": "reloading", **r}

    @app.get("/admin/status", dependencies=[Depends(require_admin)])
    def admin_status() -> dict:
        snap = rec.snapshot
        return {"model": snap.model if snap else None, "source": snap.bundle.source if snap else None,
                "reloads": rec.reloads, "generation": loader.generation, "error": rec.reload_error,
                "fallback": rec.fallback, "events_until": rec.events.max_seq(), "last_load": rec.last_load,
                "loaded_at": snap.loaded_at if snap else None}

    return app


KIND_OF_MIME = {"image": ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"),
                "audio": ("audio/wav", "audio/x-wav", "audio/wave", "audio/mpeg", "audio/mp3", "audio/flac", "audio/ogg"),
                "video": ("video/mp4", "video/mpeg", "video/webm", "video/quicktime")}


async def read_uploads(text: str | None, files: list[UploadFile], cfg: Config) -> list[tuple[str, str, str, bytes]]:
    """The uploads as (filename, kind, mime, bytes), checked for count, type and size (on the event loop: no
    decoding here)."""
    files = [f for f in files if f.filename or f.size]
    if not (text and text.strip()) and not files:
        raise HTTPException(422, "a search needs text, an uploaded file, or both")
    if len(files) > cfg.serve.max_uploads:
        raise HTTPException(413, f"{len(files)} files: at most {cfg.serve.max_uploads} per query")
    out = []
    for f in files:
        mime = (f.content_type or "").split(";")[0].strip().lower()
        kind = next((k for k, mimes in KIND_OF_MIME.items() if mime in mimes), None)
        if kind is None:
            raise HTTPException(415, f"{f.filename!r}: unsupported media type {mime or 'none'!r} "
                                     f"(use one of {sorted(m for ms in KIND_OF_MIME.values() for m in ms)})")
        data = await f.read(cfg.serve.max_upload_bytes + 1)
        if len(data) > cfg.serve.max_upload_bytes:
            raise HTTPException(413, f"{f.filename!r} is over the {cfg.serve.max_upload_bytes >> 20} MiB upload limit")
        if not data:
            raise HTTPException(422, f"{f.filename!r} is empty")
        out.append((f.filename, kind, mime, data))
    return out


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` with several workers: the configuration comes from RECSYS_SERVE_CONFIG."""
    return create_app(Config.model_validate_json(os.environ["RECSYS_SERVE_CONFIG"]))
