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

import numpy as np

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
    events_until: int = 0  # the highest event-log sequence folded in (recsys.events): the next run reads past it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def content_key(self) -> dict:
        """Everything that says *what* is served (no run id, times or paths): equal keys = same state."""
        idx = self.index or {}
        return {"embedder": self.embedder, "vectors": self.vectors.get("sha256"), "model": self.model,
                "index_vectors": idx.get("vectors_sha256"), "interactions_until": self.interactions_until,
                "events_until": self.events_until}


def published_path(workdir: str | Path) -> Path:
    return Path(workdir) / "published" / "manifest.json"


def read_published(workdir: str | Path) -> Manifest | None:
    """The currently published manifest, or None before the first publish."""
    path = published_path(workdir)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return Manifest(**{k: v for k, v in raw.items() if k in Manifest.__dataclass_fields__})


def publish(manifest: Manifest, workdir: str | Path) -> Path:
    """Atomically make ``manifest`` the published state; the previous one is kept as history."""
    path = published_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = path.parent / "history"
    history.mkdir(exist_ok=True)
    atomic_write_text(history / f"{manifest.run_id}.json", manifest.to_json())
    atomic_write_text(path, manifest.to_json())
    return path


class SnapshotError(ValueError):
    """A published state (or a snapshot built from it) failed its checks; ``problems`` says which."""

    def __init__(self, what: str, problems: list[str]):
        self.what, self.problems = what, problems
        super().__init__(f"{what}: {'; '.join(problems)}")


def vectors_digest(ids: list[str], vectors: np.ndarray) -> str:
    """sha256 over the item ids and their float32 vectors: what a manifest records for a vector set."""
    h = hashlib.sha256("\0".join(ids).encode())
    h.update(np.ascontiguousarray(vectors, np.float32).tobytes())
    return h.hexdigest()


def check_vectors(ids: list[str], vectors: np.ndarray, what: str, dim: int | None = None,
                  digest: str | None = None) -> list[str]:
    """Problems with one vector set: count, width, non-finite rows, checksum (empty: fine)."""
    problems = []
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        problems.append(f"{what}: {vectors.shape[0] if vectors.ndim else 0} vectors for {len(ids)} ids")
    if dim is not None and vectors.ndim == 2 and vectors.shape[1] != dim:
        problems.append(f"{what}: width {vectors.shape[1]}, expected {dim}")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if vectors.ndim == 2 else []
    if len(bad):
        problems.append(f"{what}: non-finite values for {', '.join(ids[i] for i in bad[:5])} ({len(bad)})")
    if digest is not None and not problems and vectors_digest(ids, vectors) != digest:
        problems.append(f"{what}: sha256 differs from the manifest's")
    return problems


def verify(manifest: Manifest, workdir: str | Path, parts: tuple[str, ...] = ("vectors", "index"),
           min_recall: float = 0.0) -> list[str]:
    """Everything a manifest names, checked against it: files present, checksums, counts, widths, finite
    vectors, the index's size and recall. Returns the problems (empty: safe to publish or to serve)."""
    import polars as pl

    workdir = Path(workdir)
    problems: list[str] = []
    if "vectors" in parts:
        path = workdir / manifest.vectors["path"]
        if not path.exists():
            return [f"vectors: {path} is missing"]
        v = pl.read_parquet(path)
        arr = v["vector"].to_numpy().astype(np.float32) if v.height else np.zeros((0, manifest.embedder["dim"]), np.float32)
        if v.height != manifest.vectors["items"]:
            problems.append(f"vectors: {v.height} rows, the manifest says {manifest.vectors['items']}")
        problems += check_vectors(v["item_id"].to_list(), arr, "vectors", manifest.embedder["dim"], manifest.vectors["sha256"])
    if "index" in parts and manifest.index:
        idx = manifest.index
        folder = workdir / idx["path"]
        for name in ("items.faiss", "index.json", "item_vectors.npz"):
            if not (folder / name).exists():
                return problems + [f"index: {folder / name} is missing"]
        if sha256_file(folder / "items.faiss") != idx["sha256"]:
            problems.append("index: items.faiss sha256 differs from the manifest's")
        arrays = np.load(folder / "item_vectors.npz", allow_pickle=False)
        ids = arrays["ids"].tolist()
        if len(ids) != idx["items"]:
            problems.append(f"index: {len(ids)} items, the manifest says {idx['items']}")
        problems += check_vectors(ids, arrays["vectors"], "index vectors", digest=idx.get("vectors_sha256"))
        problems += check_vectors(ids, arrays["content"], "index content vectors")
        meta = json.loads((folder / "index.json").read_text())
        if int(meta.get("n", len(ids))) != len(ids):
            problems.append(f"index: holds {meta.get('n')} vectors for {len(ids)} items")
        if idx.get("recall_at_100") is not None and idx["recall_at_100"] < min_recall:
            problems.append(f"index: recall@100 {idx['recall_at_100']} below {min_recall}")
    return problems
