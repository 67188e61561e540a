"""/search queries are decoded and embedded in a child process (a spawned process pool, nice 19): a flood of
uploads then takes neither the GIL nor the cores /recommend needs, and a decoder that crashes or balloons on
a hostile file takes down only that child (the pool is replaced; the request gets 503). The parent checks
count, type and size (serving/app.py), the child checks duration and decodability, then embeds; the FAISS
search over the content vectors stays in the parent (Recommender.search_vector)."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import numpy as np
from fastapi import HTTPException

from recsys.config import Config

_CFG: Config | None = None
_EMBEDDERS: dict = {}
_MALLOC_TRIM = None  # glibc's malloc_trim, once looked up (False: not available)


class QueryRefused(Exception):
    """The query cannot be served (status, reason): raised in the child, answered as that 4xx by the parent."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def _init(cfg_json: str) -> None:
    global _CFG
    from recsys.quiet import silence

    silence()
    os.nice(19)
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    _CFG = Config.model_validate_json(cfg_json)


def _space(mode: str | None) -> str:
    return "fused" if mode in (None, "auto", "fused") else mode


def _embedder(mode: str):
    from recsys.embed import item_embedder

    mode = _space(mode)
    if mode not in _EMBEDDERS:  # no embedding cache for queries: every query would stay on disk, unbounded
        cfg = _CFG.model_copy(update={"embedder": _CFG.embedder.model_copy(update={"cache": False})})
        _EMBEDDERS[mode] = item_embedder(cfg, mode)
    return _EMBEDDERS[mode]


def _warm() -> bool:
    """(in the child, at start) Load the embedder and its text, image and audio paths with one tiny query, so
    the first real search does not pay for it."""
    import io
    import wave

    from PIL import Image

    from recsys.content import Content, Part

    png, wav = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32), (120, 80, 40)).save(png, format="PNG")
    with wave.open(wav, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((2000 * np.sin(np.arange(16000) / 8)).astype("<i2").tobytes())
    try:
        _embedder(_CFG.embedder.item_input).embed([Content.of(
            Part.of_text("warm-up"), Part("image", data=png.getvalue(), mime_type="image/png"),
            Part("audio", data=wav.getvalue(), mime_type="audio/wav"), item_id="warm-up")], task="query")
    except Exception:  # noqa: BLE001 - a warm-up only; a real query reports its own problem
        return False
    return True


def embed_query(text: str | None, uploads: list[tuple[str, str, str, bytes]], mode: str, dim: int) -> np.ndarray:
    """(in the child) The query's (1, dim) vector in the item space ``mode``."""
    from recsys.embed import EmbeddingError

    try:
        content = query_content(text, uploads, _CFG)
    except HTTPException as exc:
        raise QueryRefused(exc.status_code, exc.detail) from None
    try:
        return _embedder(mode).embed([content], task="query", dim=dim)
    except EmbeddingError as exc:
        raise QueryRefused(422, f"the query could not be embedded: {exc}") from None
    finally:
        _trim()


def _trim() -> None:
    """Give the decoded media's memory back to the system after each query (glibc keeps freed memory otherwise:
    the process grew by 230 MB during a flood of 170 s recordings)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


class SearchPool:
    """``workers`` spawned processes embedding /search queries, started at once in the background."""

    def __init__(self, cfg: Config, workers: int):
        self.cfg, self.workers = cfg, workers
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=_init,
                                   initargs=(self.cfg.model_dump_json(),))
        for _ in range(self.workers):
            pool.submit(_warm)  # start the children and load the embedder now, not on the first query
        return pool

    async def embed(self, text, uploads, mode: str, dim: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        pool = self.pool
        try:
            return await loop.run_in_executor(pool, embed_query, text, uploads, mode, dim)
        except QueryRefused as exc:
            raise HTTPException(exc.status, exc.detail) from None
        except BrokenProcessPool:
            if self.pool is pool:  # the child died on this query (or another in flight): a fresh one for the rest
                self.pool = self._start()
            raise HTTPException(503, "the search worker stopped while embedding this query; retry shortly",
                                headers={"Retry-After": "1"}) from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # joined: no semaphore left for the resource tracker


def query_content(text: str | None, uploads: list[tuple[str, str, str, bytes]], cfg: Config):
    """The query as one Content: text first, then each upload, checked for decodability and for the embedder's
    limits (a 3-hour recording is refused from its header, before anything is decoded). Runs in the search pool."""
    from recsys.content import Content, ContentError, Part
    from recsys.embed import Limits
    from recsys.media import decode_image, probe_duration

    limits = Limits()
    longest = {"audio": limits.max_audio_s, "video": limits.max_video_s}
    parts = [Part.of_text(text.strip())] if text and text.strip() else []
    for name, kind, mime, data in uploads:
        try:
            if kind == "image":
                decode_image(data)
            elif (seconds := probe_duration(data, kind)) > longest[kind]:
                raise HTTPException(413, f"{name!r} is {seconds:.0f} s of {kind}: at most {longest[kind]:.0f} s per query")
        except (ContentError, OSError, ValueError) as exc:
            raise HTTPException(422, f"{name!r} does not decode as {kind}: {getattr(exc, 'problem', exc)}")
        parts.append(Part(kind, data=data, mime_type=mime))
    content = Content.of(*parts, item_id="query")
    try:
        limits.check(content)
    except ContentError as exc:
        raise HTTPException(422, f"the query breaks the embedder's limits: {getattr(exc, 'problem', exc)}")
    return content
