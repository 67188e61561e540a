"""Freed memory handed back to the system after phases that churn through large temporaries.

glibc's malloc keeps freed blocks below its mmap threshold (which it raises to 32 MB as large blocks are freed)
in its heap, and a long loop of large temporaries fragments it: evaluation's per-week item-tower passes over
100k items held 5.1 GB resident for 2.3 GB of live data. ``malloc_trim(0)`` returns every free page to the
system (a few milliseconds). A fixed, low mmap threshold would do it continuously, but made every large
tensor a fresh mapping: two-tower training steps ran several times slower, so the trim is called where the
churn ends instead (each evaluation group, each training fit, each demo stage).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from functools import lru_cache


@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries: nothing to trim
        return None


def release() -> bool:
    """Return the heap's free pages to the system; True when glibc did."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def rss_mb() -> float:
    """The process's resident memory now, in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


class PeakMemory:
    """The resident memory's peak within a window (a stage), sampled every ``every`` seconds on a daemon thread:
    what the machine must hold while the stage runs."""

    def __init__(self, every: float = 0.05):
        self._peak = rss_mb()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, args=(every,), daemon=True, name="peak-memory").start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self._peak = max(self._peak, rss_mb())

    def reset(self) -> float:
        """Start a new window; returns the resident memory now."""
        self._peak = now = rss_mb()
        return now

    def peak(self) -> float:
        self._peak = max(self._peak, rss_mb())
        return self._peak

    def stop(self) -> None:
        self._stop.set()
