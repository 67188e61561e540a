"""The catalog in one embedding space: every item embedded (failed items named and left out, never a stand-in
vector), the saved vectors reloaded, the item inputs the two-tower chooses among (fused, text-only,
concatenated), and the one-kind vectors the content-kNN baselines read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from recsys.config import Config
from recsys.data import Dataset
from recsys.embed import Embedder, item_embedder, make_embedder
from recsys.embed.item_input import concat, input_version, weights_version
from recsys.errors import DataError
from recsys.eval import make_split
from recsys.progress import console


@dataclass
class ItemVectors:
    """The catalog's vectors in one embedding space; ``cold`` has brand-new-item versions (no user parts)."""

    ids: list[str]
    vectors: np.ndarray
    backend: str
    model_version: str
    dim: int
    failed: dict[str, str] = field(default_factory=dict)
    cold: dict[int, np.ndarray] = field(default_factory=dict)
    parts: dict[str, "PartVectors"] = field(default_factory=dict)  # one-kind vectors (part_vectors), by kind
    item_input: str = "fused"  # which item space (recsys.embed.item_input); model_version is that space's

    @property
    def weights_version(self) -> str:
        """The embedder weights' version (model_version names the item space)."""
        return weights_version(self.model_version)

    def with_cold(self, rows: np.ndarray) -> np.ndarray:
        """Vectors where ``rows`` take their cold-start version."""
        return with_cold(self.vectors, self.cold, rows)


def with_cold(vectors: np.ndarray, cold: dict[int, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """A copy of ``vectors`` where ``rows`` take their cold-start version (where ``cold`` has one)."""
    out = vectors.copy()
    for r in rows:
        if int(r) in cold:
            out[r] = cold[int(r)]
    return out


class EmbeddingFailures(RuntimeError):
    """More items failed to embed than ``nightly.failure_threshold`` allows; nothing was written."""

    exit_code = 3

    def __init__(self, failed: dict[str, str], total: int, threshold: float):
        self.failed, self.total, self.threshold = failed, total, threshold
        shown = "; ".join(f"{i}: {m}" for i, m in list(failed.items())[:5])
        super().__init__(f"{len(failed)} of {total} items failed to embed ({len(failed) / max(total, 1):.1%}, "
                         f"over the {threshold:.1%} threshold): {shown}")


def check_failures(failed: dict[str, str], total: int, threshold: float) -> None:
    """Raise EmbeddingFailures when the share of failed items passes ``threshold``."""
    if failed and len(failed) / max(total, 1) > threshold:
        raise EmbeddingFailures(failed, total, threshold)


def embed_catalog(cfg: Config, ds: Dataset, embedder: Embedder | None = None, cold: bool = False,
                  save: bool = True) -> tuple[ItemVectors, Dataset]:
    """Embed every item (task "document"). Failed items are reported by id; past
    ``nightly.failure_threshold`` nothing is saved and EmbeddingFailures is raised; under it they are
    dropped from the returned dataset (with their interactions): no item ever gets a stand-in vector.
    With ``cold``, the COLD split's items (of the returned dataset) also get versions without user-derived parts.

    Returns:
        (vectors aligned with the returned dataset's catalog, that dataset)."""
    embedder = embedder or item_embedder(cfg)
    dim = cfg.embedder.dim
    result = embedder.embed_many(ds.catalog.contents(), task="document", dim=dim, progress=True)
    failed = {e.item_id or str(e.index): e.message for e in result.errors}
    check_failures(failed, len(ds.catalog), cfg.nightly.failure_threshold)
    ok = result.ok
    if failed:
        console.print(f"[yellow]{len(failed)} item(s) failed to embed and are left out[/yellow], e.g. {list(failed.items())[:3]}")
        ds = ds.without_items(set(failed), "items that failed to embed (left out with their interactions)")
    vectors = result.vectors[ok]
    out = ItemVectors(ds.catalog.ids, vectors, embedder.name, embedder.model_version, vectors.shape[1], failed,
                      item_input=getattr(embedder, "mode", "fused"))
    cold_rows = make_split("cold", ds, cfg.eval).cold_items if cold else None
    if cold_rows is not None and len(cold_rows):
        res = embedder.embed_many([ds.catalog.content(int(r), cold=True) for r in cold_rows], task="document", dim=dim)
        out.cold = {int(r): v for r, v, good in zip(cold_rows, res.vectors, res.ok) if good}
    if save:
        folder = cfg.workdir / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"item_id": out.ids, "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, out.dim))}).write_parquet(
            folder / "items.parquet")
        (folder / "manifest.json").write_text(json.dumps(
            {"backend": out.backend, "model_version": out.model_version, "dim": out.dim, "item_input": out.item_input,
             "items": len(out.ids), "failed": failed}, indent=2))
    return out, ds


def load_item_vectors(cfg: Config) -> ItemVectors:
    folder = cfg.workdir / "embeddings"
    if not (folder / "manifest.json").exists():
        raise FileNotFoundError(f"no embeddings under {folder}: run `recsys embed` first")
    m = json.loads((folder / "manifest.json").read_text())
    frame = pl.read_parquet(folder / "items.parquet")
    return ItemVectors(frame["item_id"].to_list(), frame["vector"].to_numpy().astype(np.float32), m["backend"],
                       m["model_version"], m["dim"], m.get("failed", {}), item_input=m.get("item_input", "fused"))


def aligned(ds: Dataset, iv: ItemVectors) -> Dataset:
    """``ds`` without the items that have no saved vector (they failed to embed), so rows line up."""
    missing = set(ds.catalog.ids) - set(iv.ids)
    ds = ds.without_items(missing, "items without a vector (failed to embed)")
    if ds.catalog.ids != iv.ids:
        raise DataError("the saved vectors belong to another catalog: run `recsys embed` again (with the same --source/--data)")
    return ds


def item_input_candidates(cfg: Config, ds: Dataset, iv: ItemVectors) -> dict[str, ItemVectors]:
    """The item inputs the pipeline chooses among (``embedder.item_input``: one, or ``auto``: all three),
    built from the fused vectors ``iv`` (with their cold versions): the text-only ones are embedded (their
    parts' features are cached), the concatenation is assembled from the two."""
    mode = cfg.embedder.item_input
    if mode != "auto":
        if mode != iv.item_input:
            raise ValueError(f"embedder.item_input is {mode!r} but the item vectors are {iv.item_input!r}")
        return {mode: iv}
    if iv.item_input != "fused":
        raise ValueError(f"item_input auto chooses from the fused vectors, got {iv.item_input!r} ones")
    if not ds.catalog.modalities[:, 1:].any():  # text-only catalog: every candidate is the fused vectors again
        console.print("item inputs: the catalog has text only, so text-only and concatenated vectors equal the fused "
                      "ones: nothing to choose")
        return {"fused": iv}
    emb = item_embedder(cfg, "text")
    with console.status("item inputs: embedding the catalog's text parts alone (the text-only candidate)"):
        res = emb.embed_many(ds.catalog.contents(), task="document", dim=cfg.embedder.dim)
        cold_rows = list(iv.cold)
        cres = emb.embed_many([ds.catalog.content(r, cold=True) for r in cold_rows], task="document", dim=cfg.embedder.dim)
    if res.errors:  # the fused vectors of these items embedded: their text alone must too
        raise EmbeddingFailures({e.item_id or str(e.index): e.message for e in res.errors}, len(ds.catalog), 0.0)
    text = ItemVectors(iv.ids, res.vectors, iv.backend, emb.model_version, iv.dim, iv.failed,
                       cold={r: v for r, v, good in zip(cold_rows, cres.vectors, cres.ok) if good}, item_input="text")
    both = ItemVectors(iv.ids, concat(iv.vectors, text.vectors), iv.backend, input_version(iv.model_version, "concat"),
                       2 * iv.dim, iv.failed, cold={r: concat(v, text.cold[r]) for r, v in iv.cold.items() if r in text.cold},
                       item_input="concat")
    return {"fused": iv, "text": text, "concat": both}


@dataclass
class PartVectors:
    """The catalog embedded from its parts of one kind only: ``has`` marks the items that have such a part
    (and embedded), ``cold`` the cold-start versions (no user-derived parts) of the rows asked for."""

    kind: str
    vectors: np.ndarray  # (n_items, dim); rows without the part are not vectors of anything (see has)
    has: np.ndarray  # (n_items,) bool
    cold: dict[int, np.ndarray] = field(default_factory=dict)

    def with_cold(self, rows: np.ndarray) -> np.ndarray:
        return with_cold(self.vectors, self.cold, rows)


def part_vectors(cfg: Config, ds: Dataset, iv: ItemVectors, kind: str, cold_rows: np.ndarray | None = None,
                 embedder: Embedder | None = None) -> PartVectors:
    """Each item's parts of one ``kind`` ("text": all its text parts; "image": its first image) embedded by the
    same embedder: the content-kNN rows' inputs. Kept on ``iv.parts`` (computed once per run)."""
    if kind in iv.parts and (cold_rows is None or all(int(r) in iv.parts[kind].cold for r in cold_rows)):
        return iv.parts[kind]
    from recsys.content import Content

    embedder = embedder or make_embedder(cfg)

    def only(c: Content) -> Content | None:
        parts = tuple(p for p in c.parts if p.kind == kind)
        return Content(parts if kind == "text" else parts[:1], item_id=c.item_id) if parts else None

    def embed(rows: list[int], cold: bool) -> dict[int, np.ndarray]:
        picked = [(r, only(ds.catalog.content(r, cold=cold))) for r in rows]
        picked = [(r, c) for r, c in picked if c is not None]
        res = embedder.embed_many([c for _, c in picked], task="document", dim=iv.dim)
        return {r: v for (r, _), v, good in zip(picked, res.vectors, res.ok) if good}

    got = embed(list(range(len(ds.catalog))), cold=False)
    vectors = np.zeros((len(ds.catalog), iv.dim), np.float32)
    has = np.zeros(len(ds.catalog), bool)
    for r, v in got.items():
        vectors[r], has[r] = v, True
    cold = embed([int(r) for r in cold_rows], cold=True) if cold_rows is not None and len(cold_rows) else {}
    iv.parts[kind] = PartVectors(kind, vectors, has, cold)
    return iv.parts[kind]
