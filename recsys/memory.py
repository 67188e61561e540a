"""Large arrays go back to the system when freed.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after which blocks
below it come from the heap and stay there once freed: a loop of 100 MB temporaries (evaluation's item tower,
one pass per week of queries) then holds gigabytes it no longer uses (5.1 GB resident instead of 2.4 GB at
100k items). A fixed threshold keeps every block of ``threshold`` bytes or more in its own mapping, unmapped on
free. Set once, when ``recsys`` is imported; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLD = 4 << 20


def return_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
