"""The one embedder interface every backend implements.

``embed(contents, task=..., dim=...) -> float32 (n, dim)``: one L2-normalised vector per Content, in
ONE space for every modality, truncated Matryoshka-style to ``dim`` before normalising. Task
instructions are text prefixes, as Gemini Embedding 2 takes them. Per-item problems (a corrupt
image, a video over the length limit) fail that item with a message naming it; the rest of the
batch is embedded (``embed_many`` reports them; ``embed`` raises after finishing the batch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from recsys.content import Content, ContentError, Part

Task = Literal["document", "query", "similarity", "classification", "clustering", "none"]

# Gemini Embedding 2 task prefixes (gemini-embedding-2.md); "none" sends the content as is.
TASK_PREFIX: dict[str, str] = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "similarity": "task: sentence similarity | query: ",
    "classification": "task: classification | query: ",
    "clustering": "task: clustering | query: ",
    "none": "",
}


def apply_task(content: Content, task: Task) -> Content:
    """Prefix the first text part with the task instruction (or add a text part holding it)."""
    if task not in TASK_PREFIX:
        raise ContentError(content.item_id, f"unknown task {task!r} (expected one of {sorted(TASK_PREFIX)})")
    prefix = TASK_PREFIX[task]
    if not prefix:
        return content
    parts = list(content.parts)
    for i, p in enumerate(parts):
        if p.kind == "text":
            parts[i] = Part.of_text(prefix + (p.text or ""), source=p.source)
            return Content(tuple(parts), item_id=content.item_id)
    return Content((Part.of_text(prefix.rstrip()), *parts), item_id=content.item_id)


@dataclass(frozen=True)
class Limits:
    """What one Content may hold (Gemini Embedding 2's limits, design notes; the local backend keeps
    the same so an item that embeds locally also embeds hosted)."""

    max_text_tokens: int = 8192
    max_images: int = 6
    max_videos: int = 1
    max_video_s: float = 120.0
    max_video_with_audio_s: float = 80.0
    max_audio_s: float = 180.0
    image_mimes: frozenset[str] | None = None  # None: anything the decoder reads
    video_mimes: frozenset[str] | None = None
    audio_mimes: frozenset[str] | None = None
    max_item_bytes: int | None = None

    @staticmethod
    def estimate_tokens(text: str) -> int:
        return len(text) // 4 + 1  # ~4 characters a token for English; conservative enough for a gate

    def check(self, content: Content) -> None:
        """Raise ContentError naming the item and the first limit it breaks (counts, types, sizes)."""
        from recsys.media import has_audio_track, probe_duration

        item = content.item_id
        if content.count("image") > self.max_images:
            raise ContentError(item, f"{content.count('image')} images, more than the {self.max_images} allowed")
        if content.count("video") > self.max_videos:
            raise ContentError(item, f"{content.count('video')} videos, more than the {self.max_videos} allowed")
        tokens = sum(self.estimate_tokens(p.text or "") for p in content.parts if p.kind == "text")
        if tokens > self.max_text_tokens:
            raise ContentError(item, f"text of about {tokens} tokens, over the {self.max_text_tokens}-token limit")
        total = 0
        for p in content.parts:
            if p.kind == "text":
                continue
            allowed = {"image": self.image_mimes, "video": self.video_mimes, "audio": self.audio_mimes}[p.kind]
            if allowed is not None and p.mime_type not in allowed:
                raise ContentError(item, f"{p.describe()}: MIME type {p.mime_type} is not supported (use {sorted(allowed)})")
            try:
                data = p.read_bytes()
            except ContentError as exc:
                raise ContentError(item, exc.problem) from exc
            total += len(data)
            if p.kind in ("video", "audio"):
                try:
                    seconds = probe_duration(data, p.kind)
                except ContentError as exc:
                    raise ContentError(item, f"{p.describe()}: {exc.problem}") from exc
                limit = self.max_audio_s
                if p.kind == "video":
                    limit = self.max_video_with_audio_s if has_audio_track(data) else self.max_video_s
                if seconds > limit:
                    raise ContentError(item, f"{p.describe()} lasts {seconds:.1f} s, over the {limit:.0f} s limit")
        if self.max_item_bytes is not None and total > self.max_item_bytes:
            raise ContentError(item, f"{total / 1e6:.1f} MB of inline media, over the {self.max_item_bytes / 1e6:.1f} MB request cap")


@dataclass
class ItemError:
    index: int
    item_id: str | None
    message: str

    def __str__(self) -> str:
        return f"item {self.item_id if self.item_id is not None else '#' + str(self.index)!r}: {self.message}"


@dataclass
class EmbedResult:
    """Vectors for the items that embedded (failed rows are zero) and what went wrong with the others."""

    vectors: np.ndarray  # (n, dim) float32
    errors: list[ItemError] = field(default_factory=list)
    cache_hits: int = 0

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.vectors), dtype=bool)
        mask[[e.index for e in self.errors]] = False
        return mask


class EmbeddingError(RuntimeError):
    """Some items failed; ``result`` holds the vectors of the rest."""

    def __init__(self, result: EmbedResult):
        self.result = result
        shown = "; ".join(str(e) for e in result.errors[:5])
        more = f" (and {len(result.errors) - 5} more)" if len(result.errors) > 5 else ""
        super().__init__(f"{len(result.errors)} item(s) failed to embed: {shown}{more}")


def truncate_normalize(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Matryoshka truncation to the first ``dim`` coordinates, then L2 normalisation."""
    v = np.asarray(vectors, dtype=np.float32)[:, :dim]
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class Embedder(ABC):
    """A backend that maps Contents to one shared vector space."""

    name: str = "base"
    dims: tuple[int, ...] = ()  # supported Matryoshka dimensions
    limits: Limits = Limits()

    @property
    @abstractmethod
    def model_version(self) -> str:
        """Identifies the weights (part of every cache key and feature-view version)."""

    @property
    def max_dim(self) -> int:
        return max(self.dims)

    def check_dim(self, dim: int | None) -> int:
        dim = dim or self.default_dim
        if dim > self.max_dim or dim < 1:
            raise ValueError(f"{self.name}: dim {dim} outside 1..{self.max_dim} (recommended {self.dims})")
        return dim

    default_dim: int = 256

    @abstractmethod
    def embed_many(self, contents: Sequence[Content], task: Task = "document", dim: int | None = None,
                   progress: bool = False) -> EmbedResult:
        """Embed every content; per-item problems are reported in the result, never raised."""

    def embed(self, contents: Sequence[Content], task: Task = "document", dim: int | None = None,
              progress: bool = False) -> np.ndarray:
        """(n, dim) float32, L2-normalised; raises EmbeddingError (with the partial result) if any item failed."""
        result = self.embed_many(contents, task=task, dim=dim, progress=progress)
        if result.errors:
            raise EmbeddingError(result)
        return result.vectors
