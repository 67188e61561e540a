"""Dynamic batching for /recommend, in the manner of Triton's dynamic batcher: requests wait in one queue, and
one model thread takes everything that has arrived (up to ``max_batch``) and serves it in one pass: one
online-store read, one user-tower forward and one FAISS call per batch instead of one per request.

Why: one request is a few small operations (about 1.4 ms at 100k items), so per-call overheads dominate;
serving them one per thread from a thread pool made throughput *fall* as concurrency rose (threads queueing
for the GIL and for OpenMP teams on 2 cores, BENCHMARKS.md). With one model thread, a busy service simply
forms larger batches: throughput rises with concurrency and then stays flat, and the event loop never
waits on model work. With no added wait (``max_wait_s`` 0, the default) a lone request is served at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Serve ``submit``-ted items in batches through ``fn`` on one thread.

    Args:
        fn: a batch of items -> one result (or an exception instance) per item, in order. If ``fn`` raises,
            each item of that batch is retried alone, so one bad item fails only its own request.
        max_batch: the most items one call of ``fn`` gets.
        max_wait_s: how long a batch smaller than ``max_batch`` waits for more (0: serve at once).
        init: run once on the model thread before it serves (e.g. native thread-pool settings).
    """

    def __init__(self, fn: Callable[[list[T]], list[R | BaseException]], max_batch: int = 32,
                 max_wait_s: float = 0.0, init: Callable[[], None] | None = None, name: str = "recsys-batcher"):
        self.fn, self.max_batch, self.max_wait_s, self.init = fn, max(1, max_batch), max(0.0, max_wait_s), init
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.batches = 0
        self.served = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Serve what is queued, then end the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __len__(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> tuple[R, float, int]:
        """Queue ``item``; returns (its result, ms it waited in the queue, size of the batch it was served in).
        Raises what ``fn`` gave for it."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._stop:
                raise RuntimeError("the service is shutting down")
            self._queue.append((item, fut, loop, time.perf_counter()))
            self._cv.notify()
        return await fut

    def call(self, items: list[T]) -> list[R | BaseException]:
        """``fn`` on ``items``, each failure confined to its own item."""
        try:
            out = self.fn(items)
            if len(out) != len(items):
                raise RuntimeError(f"the batch function gave {len(out)} results for {len(items)} items")
            return out
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, never lost
            if len(items) == 1:
                return [exc]
            return [r for item in items for r in self.call([item])]

    def _take(self) -> list | None:
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait()
            if not self._queue:
                return None
            if self.max_wait_s and len(self._queue) < self.max_batch and not self._stop:
                self._cv.wait_for(lambda: len(self._queue) >= self.max_batch or self._stop, timeout=self.max_wait_s)
            return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]

    def _run(self) -> None:
        if self.init is not None:
            self.init()
        while (batch := self._take()) is not None:
            started = time.perf_counter()
            live = [b for b in batch if not b[1].cancelled()]  # a client that went away is not served
            results = self.call([b[0] for b in live]) if live else []
            self.batches += 1
            self.served += len(live)
            for (_, fut, loop, queued), result in zip(live, results):
                waited = (started - queued) * 1000
                try:
                    loop.call_soon_threadsafe(_resolve, fut, result, waited, len(live))
                except RuntimeError:  # the loop is closed (shutdown): nobody is waiting
                    pass


def _resolve(fut: asyncio.Future, result, waited_ms: float, size: int) -> None:
    if fut.cancelled():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result((result, waited_ms, size))
