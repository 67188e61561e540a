"""One request budget for a hosted embedding API, shared by every caller that spends it.

The Gemini API limits requests per minute (every content in a batch counts) and punishes bursts with 429.
A budget caps the requests in flight and the contents sent in any 60-second window, and a 429's
Retry-After pauses every caller, not just the one that got it. ``LocalBudget`` shares it between the
threads of one process; ``RayBudget`` shares it between the actors of a Ray job through one small actor
holding the ``RequestBudget`` (``ray.remote(RequestBudget)``), so N actors on N nodes spend one budget.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

WINDOW_S = 60.0
POLL_S = 0.02


class RequestBudget:
    """The bookkeeping, non-blocking so that a thread lock or a Ray actor can host it (a synchronous actor runs
    one call at a time, which is the lock).

    Args:
        concurrency: requests in flight at once, across every caller.
        per_minute: contents sent in any 60 s window (None: no rate cap).
        clock: seconds, monotonic (a test passes a fake one).
    """

    def __init__(self, concurrency: int, per_minute: int | None = None, clock: Callable[[], float] = time.monotonic):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if per_minute is not None and per_minute < 1:
            raise ValueError(f"per_minute must be >= 1 or None, got {per_minute}")
        self.concurrency, self.per_minute, self.clock = concurrency, per_minute, clock
        self.in_flight = 0
        self.sent: deque[tuple[float, int]] = deque()  # (time, contents) of the grants in the last window
        self.paused_until = 0.0
        self.stats = {"granted": 0, "contents": 0, "waits": 0, "pauses": 0, "max_in_flight": 0}

    def try_acquire(self, cost: int) -> float:
        """Grant one request of ``cost`` contents now (returns 0.0) or say how long to wait (seconds > 0)."""
        now = self.clock()
        if self.per_minute is not None:
            cost = min(cost, self.per_minute)  # a batch larger than the whole budget still goes, alone
            while self.sent and self.sent[0][0] <= now - WINDOW_S:
                self.sent.popleft()
        wait = max(0.0, self.paused_until - now)
        if self.in_flight >= self.concurrency:
            wait = max(wait, POLL_S)
        if self.per_minute is not None:
            used = sum(c for _, c in self.sent)
            if used + cost > self.per_minute:  # wait for the oldest grants to leave the window
                freed, t_free = used + cost - self.per_minute, now
                for t, c in self.sent:
                    freed -= c
                    t_free = t + WINDOW_S
                    if freed <= 0:
                        break
                wait = max(wait, t_free - now)
        if wait > 0:
            self.stats["waits"] += 1
            return wait
        self.in_flight += 1
        if self.per_minute is not None:
            self.sent.append((now, cost))
        self.stats["granted"] += 1
        self.stats["contents"] += cost
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        return 0.0

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def pause(self, seconds: float) -> None:
        """Hold every new request for ``seconds`` (after a 429 with or without Retry-After)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)
        self.stats["pauses"] += 1

    def snapshot(self) -> dict:
        return dict(self.stats)


class SharedBudget(ABC):
    """A ``RequestBudget`` reached through something shared (a lock, an actor); ``slot(cost)`` waits for a
    grant and releases it after the request."""

    @abstractmethod
    def try_acquire(self, cost: int) -> float: ...

    @abstractmethod
    def release(self) -> None: ...

    @abstractmethod
    def pause(self, seconds: float) -> None: ...

    @abstractmethod
    def snapshot(self) -> dict: ...

    @contextmanager
    def slot(self, cost: int) -> Iterator[None]:
        while (wait := self.try_acquire(cost)) > 0:
            time.sleep(min(wait, 1.0))
        try:
            yield
        finally:
            self.release()


class LocalBudget(SharedBudget):
    """The budget shared by the threads of one process."""

    def __init__(self, concurrency: int, per_minute: int | None = None):
        self.core, self._lock = RequestBudget(concurrency, per_minute), threading.Lock()

    def try_acquire(self, cost: int) -> float:
        with self._lock:
            return self.core.try_acquire(cost)

    def release(self) -> None:
        with self._lock:
            self.core.release()

    def pause(self, seconds: float) -> None:
        with self._lock:
            self.core.pause(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            return self.core.snapshot()


class RayBudget(SharedBudget):
    """A caller's view of the actor ``ray.remote(RequestBudget)``: every call is one small round trip to it."""

    def __init__(self, handle):
        self.handle = handle

    def try_acquire(self, cost: int) -> float:
        import ray

        return ray.get(self.handle.try_acquire.remote(cost))

    def release(self) -> None:
        import ray

        ray.get(self.handle.release.remote())

    def pause(self, seconds: float) -> None:
        self.handle.pause.remote(seconds)

    def snapshot(self) -> dict:
        import ray

        return ray.get(self.handle.snapshot.remote())
