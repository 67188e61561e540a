"""A throwaway redis-server for tests and benchmarks (the online store's Redis option, for real)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def redis_server() -> Iterator[str | None]:
    """Yields "host:port" of a running Redis: RECSYS_TEST_REDIS_URL if set (e.g. started by .ci/run), else a
    fresh ``redis-server`` on a free loopback port, stopped afterwards; None when neither is available."""
    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
