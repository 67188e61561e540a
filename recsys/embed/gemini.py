"""The ``gemini`` backend: Gemini Embedding 2 through the real google-genai client.

One Content per item (its text, image, audio and video parts interleaved -> one vector), at most 100
items per batchEmbedContents call (and under the inline payload cap), a bounded number of calls in
flight, retries with exponential backoff and jitter on 429, 5xx, timeouts and malformed answers
(honouring Retry-After), ``output_dimensionality`` for Matryoshka dims, task instructions as text
prefixes, the API key from the environment. A batch the API rejects as a bad request is split until
the offending items are isolated: they fail with the API's reason; every other item is embedded.
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from recsys.content import Content, ContentError
from recsys.embed.base import EmbedResult, Embedder, ItemError, Limits, Task, apply_task, truncate_normalize
from recsys.embed.cache import VectorCache, embedding_key

GEMINI_LIMITS = Limits(
    image_mimes=frozenset({"image/png", "image/jpeg"}),
    video_mimes=frozenset({"video/mp4", "video/mpeg"}),
    audio_mimes=frozenset({"audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/wave"}),
    max_item_bytes=3 * 2**20,  # inline bytes per item; base64 makes it ~4 MB on the wire (the reported cap)
)
TASK_TYPES_001 = {"query": "RETRIEVAL_QUERY", "document": "RETRIEVAL_DOCUMENT", "similarity": "SEMANTIC_SIMILARITY",
                  "classification": "CLASSIFICATION", "clustering": "CLUSTERING"}
RETRYABLE = {408, 429, 500, 502, 503, 504}


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Timeouts and connection errors of the HTTP stack the SDK uses (httpx, or its httpx2 fork)."""
    found: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for name in ("httpx", "httpx2"):
        try:
            mod = __import__(name)
            found += [mod.TimeoutException, mod.TransportError]
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


class BatchFailed(Exception):
    """A batch that exhausted its retries (or was rejected); ``reason`` is what to report per item."""

    def __init__(self, reason: str, bad_request: bool = False):
        super().__init__(reason)
        self.reason, self.bad_request = reason, bad_request


@dataclass
class RetryPolicy:
    max_retries: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; a server's Retry-After is a floor."""
        backoff = random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        return max(backoff, retry_after or 0.0)


def retry_after_seconds(headers) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class GeminiEmbedder(Embedder):
    """Gemini Embedding 2 (or -001) over the google-genai SDK."""

    name = "gemini"
    dims = (128, 256, 512, 768, 1536, 3072)
    limits = GEMINI_LIMITS

    def __init__(self, model: str = "gemini-embedding-2", api_key: str | None = None, base_url: str | None = None,
                 batch_size: int = 100, concurrency: int = 4, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 60.0, cache_dir: str | Path | None = None, default_dim: int = 768):
        from google import genai
        from google.genai import types

        api_key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not api_key:
            raise ValueError("the gemini backend needs an API key: set GEMINI_API_KEY (or GOOGLE_API_KEY)")
        if not 1 <= batch_size <= 100:
            raise ValueError(f"batch_size {batch_size}: the API takes 1..100 contents per request")
        self.model, self.batch_size, self.concurrency, self.retry = model, batch_size, concurrency, retry
        self.default_dim = default_dim
        self.types = types
        # The SDK's own retries are off: ours honour Retry-After and split bad batches.
        opts = types.HttpOptions(base_url=base_url, timeout=int(timeout_s * 1000),
                                 retry_options=types.HttpRetryOptions(attempts=1))
        self.client = genai.Client(api_key=api_key, http_options=opts)
        self.cache = VectorCache(Path(cache_dir) / "embeddings.sqlite") if cache_dir else None
        self.stats = {"requests": 0, "retries": 0, "splits": 0}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, e, cache_dir=None) -> "GeminiEmbedder":
        return cls(e.gemini_model, base_url=e.gemini_base_url, batch_size=e.gemini_batch_size,
                   concurrency=e.gemini_concurrency, retry=RetryPolicy(max_retries=e.gemini_max_retries),
                   timeout_s=e.gemini_timeout_s, cache_dir=cache_dir if e.cache else None, default_dim=e.dim)

    @property
    def model_version(self) -> str:
        return self.model

    # Request building --------------------------------------------------------------------------------
    def _to_sdk(self, content: Content):
        t = self.types
        parts = []
        for p in content.parts:
            if p.kind == "text":
                parts.append(t.Part(text=p.text))
            else:
                parts.append(t.Part(inline_data=t.Blob(mime_type=p.mime_type, data=p.read_bytes())))
        return t.Content(parts=parts)

    def _call(self, contents: list[Content], task: Task, dim: int) -> np.ndarray:
        """One batchEmbedContents call with retries. Returns (n, dim) raw values."""
        from google.genai import errors

        cfg = {"output_dimensionality": dim}
        if self.model.startswith("gemini-embedding-001") and task in TASK_TYPES_001:
            cfg["task_type"] = TASK_TYPES_001[task]
        payload = [self._to_sdk(c) for c in contents]
        last = "no attempt"
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                with self._lock:
                    self.stats["requests"] += 1
                resp = self.client.models.embed_content(model=self.model, contents=payload,
                                                        config=self.types.EmbedContentConfig(**cfg))
                values = [e.values for e in (resp.embeddings or [])]
                if len(values) != len(contents) or any(v is None or len(v) < dim for v in values):
                    raise ValueError(f"malformed answer: {len(values)} embeddings for {len(contents)} contents")
                arr = np.asarray([v[:dim] for v in values], dtype=np.float32)
                if not np.isfinite(arr).all():
                    raise ValueError("malformed answer: non-finite values")
                return arr
            except errors.APIError as exc:
                code = exc.code or 0
                last = f"HTTP {code} {exc.status or ''}: {exc.message or exc}".strip()
                if code not in RETRYABLE:
                    raise BatchFailed(last, bad_request=400 <= code < 500) from exc
                retry_after = retry_after_seconds(getattr(exc.response, "headers", None))
            except _TRANSPORT_ERRORS as exc:
                last = f"{type(exc).__name__}: {exc}"
            except (ValueError, TypeError, KeyError) as exc:  # bodies that do not parse or do not fit
                last = str(exc)
            if attempt < self.retry.max_retries:
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(self.retry.delay(attempt, retry_after))
        raise BatchFailed(f"gave up after {self.retry.max_retries + 1} attempts; last error: {last}")

    def _embed_batch(self, items: list[tuple[int, Content]], task: Task, dim: int
                     ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Embed one batch; a bad request is split in halves until the bad items are alone."""
        try:
            vecs = self._call([c for _, c in items], task, dim)
            return {i: v for (i, _), v in zip(items, vecs)}, {}
        except BatchFailed as exc:
            if exc.bad_request and len(items) > 1:
                with self._lock:
                    self.stats["splits"] += 1
                mid = len(items) // 2
                a_ok, a_err = self._embed_batch(items[:mid], task, dim)
                b_ok, b_err = self._embed_batch(items[mid:], task, dim)
                return {**a_ok, **b_ok}, {**a_err, **b_err}
            return {}, {i: exc.reason for i, _ in items}

    def _batches(self, items: list[tuple[int, Content, int]]) -> list[list[tuple[int, Content]]]:
        """At most ``batch_size`` items and about 3 MB of inline media per request."""
        out, cur, size = [], [], 0
        budget = self.limits.max_item_bytes or 3 * 2**20
        for i, c, nbytes in items:
            if cur and (len(cur) >= self.batch_size or size + nbytes > budget):
                out.append(cur)
                cur, size = [], 0
            cur.append((i, c))
            size += nbytes
        if cur:
            out.append(cur)
        return out

    def embed_many(self, contents: Sequence[Content], task: Task = "document", dim: int | None = None,
                   progress: bool = False) -> EmbedResult:
        dim = self.check_dim(dim)
        n = len(contents)
        vectors = np.zeros((n, dim), np.float32)
        errors: list[ItemError] = []
        todo, keys = [], {}
        for i, c in enumerate(contents):
            try:
                self.limits.check(c)
                prepared = apply_task(c, task) if not self.model.startswith("gemini-embedding-001") else c
                nbytes = sum(len(p.read_bytes()) for p in prepared.parts if p.kind != "text")
            except ContentError as exc:
                errors.append(ItemError(i, c.item_id, exc.problem))
                continue
            if self.cache is not None:
                keys[i] = embedding_key(prepared, task, self.name, self.model_version, dim)
            todo.append((i, prepared, nbytes))
        hits = self.cache.get_many(list(keys.values())) if self.cache is not None else {}
        for i, key in keys.items():
            if key in hits:
                vectors[i] = hits[key]
        todo = [t for t in todo if keys.get(t[0]) not in hits]
        batches = self._batches(todo)
        bar = tqdm(total=len(todo), desc=f"embed[{self.model}]", unit="item", disable=not progress)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for ok, failed in pool.map(lambda b: self._embed_batch(b, task, dim), batches):
                new = {}
                for i, v in ok.items():
                    vectors[i] = truncate_normalize(v[None], dim)[0]
                    if i in keys:
                        new[keys[i]] = vectors[i]
                for i, reason in failed.items():
                    errors.append(ItemError(i, contents[i].item_id, reason))
                if self.cache is not None and new:
                    self.cache.put_many(new)
                bar.update(len(ok) + len(failed))
        bar.close()
        errors.sort(key=lambda e: e.index)
        return EmbedResult(vectors, errors, cache_hits=len(hits))
