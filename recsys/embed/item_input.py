"""What the two-tower reads of an item: its fused vector, its text-only vector, or both side by side.

One embedder, three item spaces (the ``embedder.item_input`` setting; ``auto`` lets the pipeline choose on
validation, see recsys.flows.protocol.VariantSearch):

- ``fused``: every part of the item through the embedder (the native multimodal vector);
- ``text``: the item's text parts only (an item without text keeps every part: it has nothing else);
- ``concat``: ``[fused; text] / sqrt(2)``, twice as wide, still unit length (the towers learn how to weigh them).

Queries (task other than ``document``) are embedded as the base embedder does; in ``concat`` their vector is
repeated in both halves, so a query scores ``(q . fused + q . text) / 2`` against an item: search over the
item inputs stays meaningful whatever the choice.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from recsys.content import Content
from recsys.embed.base import EmbedResult, Embedder, ItemError, Task

ItemInput = Literal["fused", "text", "concat"]
ITEM_INPUTS: tuple[str, ...] = ("fused", "text", "concat")


def text_parts(content: Content) -> Content:
    """The content's text parts (all of them, tags included), or the content itself when it has none."""
    parts = tuple(p for p in content.parts if p.kind == "text")
    return Content(parts, item_id=content.item_id) if parts else content


def concat(fused: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(n, 2 d): both d-wide unit vectors side by side, divided by sqrt(2) (unit length again)."""
    return (np.concatenate([fused, text], -1) / np.sqrt(2)).astype(np.float32)


def input_version(model_version: str, mode: str) -> str:
    """The item space's version: the weights' version, tagged with the input unless it is the fused one."""
    return model_version if mode == "fused" else f"{model_version}+{mode}"


def weights_version(item_space_version: str) -> str:
    """The embedder weights' version of an item space's version (inverse of input_version)."""
    return item_space_version.split("+", 1)[0]


class ItemInputEmbedder(Embedder):
    """A base embedder whose documents come out in one item-input mode (module docstring); ``dim`` is the base
    embedder's Matryoshka truncation, the output is twice that wide in concat mode (``EmbedderConfig.item_dim``)."""

    def __init__(self, base: Embedder, mode: str):
        if mode not in ITEM_INPUTS:
            raise ValueError(f"unknown item input {mode!r} (expected one of {ITEM_INPUTS})")
        self.base, self.mode = base, mode
        self.name, self.dims, self.limits, self.default_dim = base.name, base.dims, base.limits, base.default_dim

    @property
    def model_version(self) -> str:
        return input_version(self.base.model_version, self.mode)

    def __getattr__(self, name):  # stats, featurizer, ...: the base embedder's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def embed_many(self, contents: Sequence[Content], task: Task = "document", dim: int | None = None,
                   progress: bool = False) -> EmbedResult:
        if task != "document" or self.mode == "fused":
            res = self.base.embed_many(contents, task=task, dim=dim, progress=progress)
            if self.mode == "concat":
                res = EmbedResult(concat(res.vectors, res.vectors), res.errors, res.cache_hits)
            return res
        text = self.base.embed_many([text_parts(c) for c in contents], task=task, dim=dim, progress=progress)
        if self.mode == "text":
            return text
        fused = self.base.embed_many(contents, task=task, dim=dim, progress=progress)
        errors = {e.index: e for e in fused.errors}
        for e in text.errors:  # an item whose text fails has no concatenated vector either
            errors.setdefault(e.index, ItemError(e.index, e.item_id, f"text parts alone: {e.message}"))
        vectors = concat(fused.vectors, text.vectors)
        vectors[list(errors)] = 0.0  # failed rows: not vectors of anything (EmbedResult.ok says which)
        return EmbedResult(vectors, sorted(errors.values(), key=lambda e: e.index), fused.cache_hits + text.cache_hits)
