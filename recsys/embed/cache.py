"""Content-hash caches: re-embedding an unchanged item is a lookup, not a forward pass.

:class:`VectorCache` is a small SQLite key -> float array store. The embedding cache keys a vector
by (content digest, task, backend, model version, dim); the local backend also caches backbone
features per part, so a poster shared by two items is decoded and run through the CNN once.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import numpy as np

from recsys.content import Content


def embedding_key(content: Content, task: str, backend: str, model_version: str, dim: int) -> str:
    h = hashlib.sha256(f"{backend}\0{model_version}\0{task}\0{dim}\0".encode())
    h.update(content.digest().encode())
    return h.hexdigest()


class VectorCache:
    """SQLite-backed map from a string key to a float array (stored as float32 or float16)."""

    def __init__(self, path: str | Path, dtype: str = "float32"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, shape TEXT, data BLOB)")

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                q = f"SELECT key, shape, data FROM vectors WHERE key IN ({','.join('?' * len(chunk))})"
                for key, shape, data in self._db.execute(q, chunk):
                    dims = tuple(int(s) for s in shape.split(",")) if shape else ()
                    out[key] = np.frombuffer(data, dtype=self.dtype).reshape(dims).astype(np.float32)
        return out

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        rows = [(k, ",".join(map(str, v.shape)), np.ascontiguousarray(v, dtype=self.dtype).tobytes()) for k, v in items.items()]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def close(self) -> None:
        self._db.close()
