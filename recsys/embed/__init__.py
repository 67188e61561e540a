"""The multimodal embedder: one interface (``Embedder.embed``), two backends (``local``, ``gemini``)."""

from __future__ import annotations

from pathlib import Path

from recsys.embed.base import TASK_PREFIX, EmbedResult, Embedder, EmbeddingError, ItemError, Limits, Task, apply_task

__all__ = ["TASK_PREFIX", "EmbedResult", "Embedder", "EmbeddingError", "ItemError", "Limits", "Task",
           "apply_task", "item_embedder", "make_embedder"]


def make_embedder(cfg, cache_dir: str | Path | None = None, budget=None) -> Embedder:
    """The backend ``cfg.embedder`` names (a Config or its embedder section); ``budget``: a request budget
    shared with other processes (``recsys.embed.budget``), for the hosted backend."""
    e = getattr(cfg, "embedder", cfg)
    if cache_dir is None and hasattr(cfg, "cache_dir") and e.cache:
        cache_dir = cfg.cache_dir
    if e.backend == "local":
        from recsys.embed.local import LocalEmbedder

        return LocalEmbedder(e.local_weights, cache_dir=cache_dir, batch_size=e.batch_size, default_dim=e.dim)
    if e.backend == "gemini":
        from recsys.embed.gemini import GeminiEmbedder

        return GeminiEmbedder.from_config(e, cache_dir=cache_dir, budget=budget)
    raise ValueError(f"unknown embedder backend {e.backend!r} (expected local or gemini)")


def item_embedder(cfg, mode: str | None = None, **kwargs) -> Embedder:
    """The embedder of the item vectors the two-tower reads (recsys.embed.item_input) in ``mode``, else the
    configured ``embedder.item_input`` (``auto`` before the pipeline has chosen: fused)."""
    from recsys.embed.item_input import ItemInputEmbedder

    mode = mode or getattr(cfg, "embedder", cfg).item_input
    base = make_embedder(cfg, **kwargs)
    return base if mode in ("auto", "fused") else ItemInputEmbedder(base, mode)
