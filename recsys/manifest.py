"""The published state: one small JSON that says which vectors, Feast views and index belong together.

The nightly job writes everything it produces into a new versioned folder, then *publishes* by writing
``<workdir>/published/manifest.json`` through a temporary file and a rename (``os.replace`` is atomic on
POSIX): a reader sees the previous manifest or the new one, never half of either. Serving (start-up and
``POST /admin/reload``) reads only published manifests; a crash before the rename leaves the previous
state intact and served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from recsys.index import atomic_write_text


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """What one nightly run published. Paths are relative to the work directory."""

    run_id: str
    created_at: str  # ISO 8601, UTC
    embedder: dict  # backend, model_version, dim
    vectors: dict  # path (parquet: item_id, content_hash, vector), items, sha256
    feast: dict  # repo, item view name, rows materialized
    model: dict | None = None  # registered model name, version, alias
    index: dict | None = None  # path (folder with items.faiss, index.json, item_vectors.npz), kind, recall, sha256
    counts: dict = field(default_factory=dict)  # new / changed / unchanged / removed / failed / users_refreshed
    previous: str | None = None  # the run id this one replaced
    interactions_until: str | None = None  # ISO time of the newest interaction folded in (the next run's watermark)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def content_key(self) -> dict:
        """Everything that says *what* is served (no run id, times or paths): equal keys = same state."""
        idx = self.index or {}
        return {"embedder": self.embedder, "vectors": self.vectors.get("sha256"), "model": self.model,
                "index_vectors": idx.get("vectors_sha256"), "interactions_until": self.interactions_until}


def published_path(workdir: str | Path) -> Path:
    return Path(workdir) / "published" / "manifest.json"


def read_published(workdir: str | Path) -> Manifest | None:
    """The currently published manifest, or None before the first publish."""
    path = published_path(workdir)
    if not path.exists():
        return None
    return Manifest(**json.loads(path.read_text()))


def publish(manifest: Manifest, workdir: str | Path) -> Path:
    """Atomically make ``manifest`` the published state; the previous one is kept as history."""
    path = published_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = path.parent / "history"
    history.mkdir(exist_ok=True)
    atomic_write_text(history / f"{manifest.run_id}.json", manifest.to_json())
    atomic_write_text(path, manifest.to_json())
    return path
