"""What one model version serves from: the registered model's files (:class:`ModelBundle`) and everything
derived from them once per version (:class:`Snapshot`: the user tower, item vectors, both FAISS indexes, item
statistics and modalities, the popularity order), immutable once built and swapped whole on reload
(serving/service.py). The item vectors and index come from the nightly job's published manifest when it was
built for this model version (``recsys.manifest``), else from the registered run's artifacts. Without any
registered model, a bundle can be the catalog's embeddings alone (content only).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.inputs import UserInputs, item_stat_matrix
from features.store import FeatureRepo
from recsys import contract
from recsys.config import Config
from recsys.index import CandidateIndex, build_index
from recsys.manifest import SnapshotError, check_vectors, read_published, verify
from recsys.ranking import ServedRanker
from recsys.registry import read_registered
from recsys.rerank import Reranker

CONTENT_ONLY = "content-only"  # the version name of a bundle with no trained model
ALL_TIME, LAST_30D = contract.item_stat("log_pop_all"), contract.item_stat("log_pop_30d")  # popularity columns


@dataclass
class ModelBundle:
    """What one registered two-tower version needs online."""

    version: str
    run_id: str
    user_tower: torch.nn.Module | None  # a torch.export program's module; None: content only (no trained model)
    item_ids: list[str]
    titles: list[str]
    item_vectors: np.ndarray  # (n, vector_dim) item-tower outputs
    content: np.ndarray  # (n, D) embedder vectors
    known: np.ndarray  # (n,) ids the model was trained on
    config: dict
    reranker: Reranker | None
    queries: np.ndarray  # (Q, vector_dim) user-tower outputs on validation users: what the index tunes on
    source: str = "registry"  # or "published:<nightly run id>"
    index_dir: Path | None = None  # a prebuilt index for these vectors (published by the nightly job)
    artifacts: Path | None = None  # the registered run's files (the exported tower), where they were read from

    @property
    def layout(self) -> contract.VectorLayout:
        """How the item and user vectors are laid out (recsys.contract); a content-only bundle has none."""
        if self.user_tower is None:
            raise ValueError("a content-only bundle has no two-tower vectors")
        return contract.VectorLayout.from_tower(self.config["tower"])

    @classmethod
    def from_mlflow(cls, cfg: Config, alias: str | None = None, version: str | None = None,
                    published: bool = True) -> "ModelBundle":
        """The registered version (by alias, or ``version``); with ``published``, the nightly job's published
        item vectors and index for that version replace the ones logged at training time."""
        reg = read_registered(cfg, alias, version)
        a = reg.arrays()
        reranker_file = reg.file(contract.RERANKER_FILE)
        bundle = cls(reg.version, reg.run_id, reg.user_tower(), a["ids"].tolist(), a["titles"].tolist(), a["vectors"],
                     a["content"], a["known"], reg.config, Reranker.load(reranker_file) if reranker_file else None,
                     a["queries"], artifacts=reg.folder)
        if published:
            bundle.use_published(cfg)
        return bundle

    @classmethod
    def content_only(cls, cfg: Config) -> "ModelBundle":
        """No registered model, only the catalog's embeddings (`recsys demo` on a catalog too sparse to train
        on): the content vectors serve /search and content similarity; /recommend answers popularity."""
        import polars as pl

        from recsys.data import load_dataset

        folder = cfg.workdir / "embeddings"
        m = json.loads((folder / "manifest.json").read_text())
        frame = pl.read_parquet(folder / "items.parquet")
        ids = frame["item_id"].to_list()
        vecs = np.stack(frame["vector"].to_list()).astype(np.float32)
        catalog = load_dataset(cfg).catalog
        title = dict(zip(catalog.ids, catalog.titles))
        config = {"embedder": m["backend"], "embedder_version": m["model_version"], "dim": int(m["dim"]),
                  "embedder_dim": int(m["dim"]), "item_input": m.get("item_input", "fused"), "tower": {"recent": 1}}
        return cls(CONTENT_ONLY, "", None, ids, [title.get(i, i) for i in ids], vecs, vecs, np.zeros(len(ids), bool),
                   config, None, np.zeros((0, vecs.shape[1]), np.float32), source="embeddings (no trained model)")

    def use_published(self, cfg: Config) -> None:
        """Take the item vectors and index the nightly job published for this model version, if any, once they
        pass the manifest's checks (checksums, counts, finite vectors; SnapshotError otherwise)."""
        m = read_published(cfg.workdir)
        if m is None or not m.index or not m.model or str(m.model.get("version")) != self.version:
            return
        problems = verify(m, cfg.workdir, parts=("index",))
        if problems:
            raise SnapshotError(f"published run {m.run_id}", problems)
        folder = cfg.workdir / m.index["path"]
        fresh = np.load(folder / contract.ITEM_VECTORS_FILE, allow_pickle=False)
        self.item_ids, self.titles = fresh["ids"].tolist(), fresh["titles"].tolist()
        self.item_vectors, self.content, self.known = fresh["vectors"], fresh["content"], fresh["known"]
        self.source, self.index_dir = f"published:{m.run_id}", folder


@dataclass
class Snapshot:
    """One model version and everything derived from it, immutable once built."""

    bundle: ModelBundle
    repo: FeatureRepo
    index: CandidateIndex  # two-tower space
    content_index: CandidateIndex  # embedder space (similar items by content, /search)
    item_stats: np.ndarray  # (n, 7) as of load time
    modalities: np.ndarray  # (n, 4) bool
    popular: np.ndarray  # catalog rows, most popular (last 30 days, then all time) first
    index_of: dict[str, int]
    content_table: np.ndarray  # (n + 1, D), last row zeros (padding)
    known: np.ndarray  # (n + 1,)
    loaded_at: float
    recent: int
    ranker: ServedRanker | None = None  # the multi-source ranking stage (recsys/ranking.py), where one is fitted
    ranker_rows: np.ndarray | None = None  # (ranker's n_items,) this snapshot's row of each ranker row, -1: none
    ranker_of: np.ndarray | None = None  # (n_items,) the ranker's row of each of this snapshot's rows, -1: none
    ranker_note: str = "off"  # why there is no ranker, or what the one here is

    @property
    def n_items(self) -> int:
        return len(self.bundle.item_ids)

    @property
    def model(self) -> str:
        return f"v{self.bundle.version}" if self.bundle.user_tower is not None else CONTENT_ONLY

    @classmethod
    def build(cls, cfg: Config, bundle: ModelBundle, repo: FeatureRepo | None = None,
              item_stats: np.ndarray | None = None, modalities: np.ndarray | None = None) -> "Snapshot":
        """Load item statistics once (one bulk online read), build or load both indexes."""
        e = bundle.config
        repo = repo or FeatureRepo(cfg, e["embedder"], e["embedder_version"], int(e["dim"]), name=cfg.serve.feature_repo)
        now = time.time()
        if item_stats is None:
            items = repo.online_items(bundle.item_ids)
            modalities = items.modalities.astype(bool)
            item_stats = item_stat_matrix(items.pop_all, items.pop_30d, items.first_seen, now, modalities)
        s = cfg.serve
        if bundle.index_dir is not None and (bundle.index_dir / "items.faiss").exists():
            index = CandidateIndex.load(bundle.index_dir, use_gpu=s.use_gpu)
        else:
            index = build_index(bundle.item_vectors, bundle.queries if len(bundle.queries) else None,
                                kind=s.faiss_index, exact_below=s.exact_below, target_recall=s.target_recall,
                                use_gpu=s.use_gpu)
        content_index = index if bundle.user_tower is None else build_index(  # content only: one space
            bundle.content, None, kind=s.faiss_index, exact_below=s.exact_below, target_recall=s.target_recall,
            use_gpu=s.use_gpu)
        problems = check_vectors(bundle.item_ids, bundle.item_vectors, "item vectors", dim=index.dim)
        problems += check_vectors(bundle.item_ids, bundle.content, "content vectors")
        if index.n != len(bundle.item_ids):
            problems.append(f"index holds {index.n} items, the model {len(bundle.item_ids)}")
        if len(bundle.queries) and bundle.queries.shape[1] != index.dim:
            problems.append(f"the user tower's width {bundle.queries.shape[1]} is not the index's {index.dim}")
        if problems:  # never swap in a snapshot that would answer wrongly
            raise SnapshotError(f"model v{bundle.version} ({bundle.source})", problems)
        return cls.assemble(bundle, repo, index, content_index, item_stats, modalities, now).with_ranker(cfg)

    def with_ranker(self, cfg: Config) -> "Snapshot":
        """This snapshot with the ranking stage fitted under <workdir>/ranker attached (serve.ranker not "off"):
        a ranker that cannot be read is left out, with the reason in ``ranker_note`` (/healthz shows it), rather
        than keeping the two-tower from serving."""
        import dataclasses
        import logging

        from recsys.ranking import folder_of

        if cfg.serve.ranker == "off":
            return self
        folder = folder_of(cfg)
        try:
            ranker = ServedRanker.load(folder)
        except FileNotFoundError:
            return dataclasses.replace(self, ranker_note=f"none fitted (recsys ranker fit writes {folder})")
        except ValueError as exc:
            logging.getLogger(__name__).warning("serving without the ranking stage: %s", exc)
            return dataclasses.replace(self, ranker_note=f"refused: {exc}")
        rows = np.array([self.index_of.get(i, -1) for i in ranker.item_ids], np.int64)
        of = np.full(self.n_items, -1, np.int64)
        of[rows[rows >= 0]] = np.flatnonzero(rows >= 0)
        chosen = "chosen" if ranker.chosen else f"not chosen ({ranker.report.get('served')} won)"
        note = (f"fitted {ranker.report.get('fitted_at', '?')} on {ranker.n_items} items, {chosen} on validation; "
                f"serve.ranker={cfg.serve.ranker}")
        return dataclasses.replace(self, ranker=ranker, ranker_rows=rows, ranker_of=of, ranker_note=note)

    @classmethod
    def assemble(cls, bundle: ModelBundle, repo: FeatureRepo, index: CandidateIndex, content_index: CandidateIndex,
                 item_stats: np.ndarray, modalities: np.ndarray, loaded_at: float) -> "Snapshot":
        """The snapshot of checked parts: what derives from them (popularity order, id -> row, the padded
        content table) is computed here only, then one warm-up forward pass."""
        if bundle.user_tower is not None:
            _warm_up(bundle)
        content = np.asarray(bundle.content, np.float32)
        return cls(bundle, repo, index, content_index, np.asarray(item_stats, np.float32), np.asarray(modalities, bool),
                   np.lexsort((-item_stats[:, ALL_TIME], -item_stats[:, LAST_30D])), {i: r for r, i in enumerate(bundle.item_ids)},
                   np.vstack([content, np.zeros((1, content.shape[1]), np.float32)]), np.append(bundle.known, False),
                   loaded_at, int(bundle.config["tower"]["recent"]))


def _warm_up(bundle: ModelBundle) -> None:
    """One forward pass before the snapshot goes live: the first request should not pay for lazy set-up."""
    L, D = int(bundle.config["tower"]["recent"]), bundle.content.shape[1]
    n = len(bundle.item_ids)
    empty = UserInputs.empty(1, L, D, n)
    with torch.inference_mode():
        bundle.user_tower(*empty.tensors(np.zeros((n + 1, D), np.float32), np.zeros(n + 1, bool)))
