"""The ``gemini`` backend: Gemini Embedding 2 through the real google-genai client.

One Content per item (its text, image, audio and video parts interleaved -> one vector), at most 100
items per batchEmbedContents call (and under the inline payload cap: a media part over
``upload_above`` bytes goes through the Files API, uploaded once per process, waited on until ACTIVE,
and referenced by URI), a bounded number of calls in
flight, retries with exponential backoff and jitter on 429, 5xx, timeouts and malformed answers
(honouring Retry-After), ``output_dimensionality`` for Matryoshka dims, task instructions as text
prefixes, the API key from the environment. A batch the API rejects as a bad request is split until
the offending items are isolated: they fail with the API's reason; every other item is embedded.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
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
from recsys.embed.budget import LocalBudget
from recsys.embed.base import EmbedResult, Embedder, ItemError, Limits, Task, apply_task, truncate_normalize
from recsys.embed.cache import VectorCache, embedding_key

GEMINI_LIMITS = Limits(
    image_mimes=frozenset({"image/png", "image/jpeg"}),
    video_mimes=frozenset({"video/mp4", "video/mpeg"}),
    audio_mimes=frozenset({"audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/wave"}),
    max_item_bytes=2 * 2**30,  # the Files API's cap per file; larger parts are uploaded, not inlined
)
INLINE_BUDGET = 3 * 2**20  # inline bytes per request; base64 makes it ~4 MB on the wire (the reported cap)
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
                 timeout_s: float = 60.0, cache_dir: str | Path | None = None, default_dim: int = 768,
                 upload_above: int = 2**20, file_wait_s: float = 300.0, file_poll_s: float = 2.0,
                 items_per_minute: int | None = None, budget=None):
        """Args: upload_above: media parts larger than this many bytes go through the Files API;
        file_wait_s / file_poll_s: how long to wait for an uploaded file to become ACTIVE, and how often to ask;
        items_per_minute: the quota (contents per minute) requests are paced to; budget: a shared
        ``recsys.embed.budget`` budget (several processes or Ray actors spending one quota) instead of this
        process's own ``LocalBudget(concurrency, items_per_minute)``."""
        from google import genai
        from google.genai import types

        api_key = api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        if not api_key:
            raise ValueError("the gemini backend needs an API key: set GEMINI_API_KEY (or GOOGLE_API_KEY)")
        if not 1 <= batch_size <= 100:
            raise ValueError(f"batch_size {batch_size}: the API takes 1..100 contents per request")
        self.model, self.batch_size, self.concurrency, self.retry = model, batch_size, concurrency, retry
        self.default_dim = default_dim
        self.upload_above, self.file_wait_s, self.file_poll_s = upload_above, file_wait_s, file_poll_s
        self._files: dict[str, str] = {}  # sha256 of an uploaded part's bytes -> its file URI (this process)
        self._file_locks: dict[str, threading.Lock] = {}
        self.types = types
        # The SDK's own retries are off: ours honour Retry-After and split bad batches.
        opts = types.HttpOptions(base_url=base_url, timeout=int(timeout_s * 1000),
                                 retry_options=types.HttpRetryOptions(attempts=1))
        self.client = genai.Client(api_key=api_key, http_options=opts)
        self.cache = VectorCache(Path(cache_dir) / "embeddings.sqlite") if cache_dir else None
        self.stats = {"requests": 0, "retries": 0, "splits": 0, "uploads": 0}
        self._lock = threading.Lock()
        self.budget = budget if budget is not None else LocalBudget(concurrency, items_per_minute)

    @classmethod
    def from_config(cls, e, cache_dir=None, budget=None) -> "GeminiEmbedder":
        return cls(e.gemini_model, base_url=e.gemini_base_url, batch_size=e.gemini_batch_size,
                   concurrency=e.gemini_concurrency, retry=RetryPolicy(max_retries=e.gemini_max_retries),
                   timeout_s=e.gemini_timeout_s, cache_dir=cache_dir if e.cache else None, default_dim=e.dim,
                   upload_above=e.gemini_upload_above_bytes, file_wait_s=e.gemini_file_wait_s,
                   items_per_minute=e.gemini_items_per_minute, budget=budget)

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
                data = p.read_bytes()
                uri = self._files.get(hashlib.sha256(data).hexdigest()) if len(data) > self.upload_above else None
                parts.append(t.Part(file_data=t.FileData(file_uri=uri, mime_type=p.mime_type)) if uri else
                             t.Part(inline_data=t.Blob(mime_type=p.mime_type, data=data)))
        return t.Content(parts=parts)

    def _upload(self, data: bytes, mime: str) -> str:
        """The Files API: upload one large part, wait until the service has processed it; returns its URI.
        Once per process for the same bytes (the service keeps files 48 h, so the map is not persisted).
        Raises BatchFailed with the reason."""
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            once = self._file_locks.setdefault(key, threading.Lock())
        with once:  # the same bytes in two items at once: one upload
            if key not in self._files:
                self._files[key] = self._upload_now(data, mime)
        return self._files[key]

    def _upload_now(self, data: bytes, mime: str) -> str:
        f = self._retrying(lambda: self.client.files.upload(
            file=io.BytesIO(data), config=self.types.UploadFileConfig(mime_type=mime)))
        with self._lock:
            self.stats["uploads"] += 1
        deadline = time.monotonic() + self.file_wait_s
        state = self.types.FileState
        while f.state == state.PROCESSING:
            if time.monotonic() > deadline:
                raise BatchFailed(f"uploaded {mime} file {f.name} still PROCESSING after {self.file_wait_s:.0f} s")
            time.sleep(self.file_poll_s)
            f = self._retrying(lambda: self.client.files.get(name=f.name))
        if f.state == state.FAILED or not f.uri:
            why = getattr(f.error, "message", None) or "no URI"
            raise BatchFailed(f"the Files API could not process the {mime} part ({len(data) / 1e6:.1f} MB): {why}")
        return f.uri

    def _prepare_uploads(self, index: int, content: Content) -> tuple[int, Content, int, str | None]:
        """Upload an item's large parts; returns (index, content, inline bytes left, error or None)."""
        inline = 0
        try:
            for p in content.parts:
                if p.kind == "text":
                    continue
                data = p.read_bytes()
                if len(data) > self.upload_above:
                    self._upload(data, p.mime_type)
                else:
                    inline += len(data)
        except BatchFailed as exc:
            return index, content, 0, exc.reason
        return index, content, inline, None

    def _call(self, contents: list[Content], task: Task, dim: int) -> np.ndarray:
        """One batchEmbedContents call with retries. Returns (n, dim) raw values."""
        cfg = {"output_dimensionality": dim}
        if self.model.startswith("gemini-embedding-001") and task in TASK_TYPES_001:
            cfg["task_type"] = TASK_TYPES_001[task]
        payload = [self._to_sdk(c) for c in contents]

        def once() -> np.ndarray:
            with self._lock:
                self.stats["requests"] += 1
            with self.budget.slot(len(contents)):
                resp = self.client.models.embed_content(model=self.model, contents=payload,
                                                        config=self.types.EmbedContentConfig(**cfg))
            values = [e.values for e in (resp.embeddings or [])]
            if len(values) != len(contents) or any(v is None or len(v) < dim for v in values):
                raise ValueError(f"malformed answer: {len(values)} embeddings for {len(contents)} contents")
            arr = np.asarray([v[:dim] for v in values], dtype=np.float32)
            if not np.isfinite(arr).all():
                raise ValueError("malformed answer: non-finite values")
            return arr

        return self._retrying(once)

    def _retrying(self, fn):
        """``fn()`` with retries (exponential backoff with jitter, Retry-After honoured) on 429, 5xx, timeouts
        and malformed answers; a 4xx or exhausted retries raise BatchFailed with the reason."""
        from google.genai import errors

        last = "no attempt"
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                return fn()
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
                delay = self.retry.delay(attempt, retry_after)
                if last.startswith("HTTP 429"):  # the quota is shared: every caller of the budget waits
                    self.budget.pause(delay)
                time.sleep(delay)
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
        budget = INLINE_BUDGET
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
            except ContentError as exc:
                errors.append(ItemError(i, c.item_id, exc.problem))
                continue
            if self.cache is not None:
                keys[i] = embedding_key(prepared, task, self.name, self.model_version, dim)
            todo.append((i, prepared))
        hits = self.cache.get_many(list(keys.values())) if self.cache is not None else {}
        for i, key in keys.items():
            if key in hits:
                vectors[i] = hits[key]
        todo = [t for t in todo if keys.get(t[0]) not in hits]
        bar = tqdm(total=len(todo), desc=f"embed[{self.model}]", unit="item", disable=not progress)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            ready = []  # large parts uploaded first (Files API); an item whose upload fails fails alone
            for i, c, inline, err in pool.map(lambda t: self._prepare_uploads(*t), todo):
                if err is None:
                    ready.append((i, c, inline))
                else:
                    errors.append(ItemError(i, contents[i].item_id, err))
                    bar.update(1)
            batches = self._batches(ready)
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
