"""The stages of the flow as functions, shared by the CLI verbs and the flows (recsys.flows).

embed -> features -> train (+ baselines, reranker) -> index -> serve; ``recsys.flows.demo`` runs them all on
one work directory, ``recsys.flows.nightly`` is the nightly batch.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

from recsys.config import Config
from recsys.content import ContentError
from recsys.data import Dataset, load_dataset
from recsys.embed import Embedder, item_embedder, make_embedder
from recsys.embed.item_input import concat, input_version, weights_version
from recsys.errors import DataError
from recsys.eval import METRICS, EvalResult, make_split
from recsys.eval.evaluate import evaluate, paired_differences, score_topk

console = Console(width=max(Console().width, 150))  # tables stay readable in logs and CI


@dataclass
class Timings:
    """Wall-clock seconds per stage, printed as they finish and saved with the run's report."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t0, 2)
        console.print(f"[dim]{name}: {self.stages[name]:.1f} s[/dim]")


# Embedding ---------------------------------------------------------------------------------------------
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


def tags_in_training_window(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> tuple[Dataset, ItemVectors]:
    """``ds`` and ``iv`` with the items' user tags limited to ``split``'s training window: a user's tags count
    only before the time they are asked at validation (and none after the training data ends), so no item
    content carries a tag its author applied later (TEMPORAL: a third of MovieLens's tags fall after the cut).
    Only the items whose content changes are embedded again."""
    from datetime import timedelta

    if ds.tags is None or split.train.is_empty():
        return ds, iv
    end = split.train["timestamp"].max() + timedelta(seconds=1)
    limit = {u: min(a, end) for u, a in zip(split.val.users, split.val.at) if a is not None}
    pds, changed, dropped = ds.with_tags_before(limit, end)
    if not changed:
        return pds, iv
    res = item_embedder(cfg, iv.item_input).embed_many([pds.catalog.content(r) for r in changed], task="document",
                                                       dim=cfg.embedder.dim)
    if res.errors:
        raise EmbeddingFailures({e.item_id or str(e.index): e.message for e in res.errors}, len(changed), 0.0)
    vectors = iv.vectors.copy()
    vectors[changed] = res.vectors
    console.print(f"{split.name}: user tags limited to the training window: {dropped:,} of {ds.tags.height:,} tags left "
                  f"out, {len(changed):,} items embedded again")
    return pds, ItemVectors(iv.ids, vectors, iv.backend, iv.model_version, iv.dim, iv.failed, iv.cold,
                            item_input=iv.item_input)


def new_item_vectors(cfg: Config, ds: Dataset, iv: ItemVectors) -> np.ndarray:
    """(n_items, D): every item as a brand-new item would look, its own content without user-derived parts (tags):
    rows with such parts take their cold version (``iv.cold``, else embedded now), the others keep ``iv.vectors``.
    An item whose content without them does not embed (nothing but tags) keeps its vector, and is named."""
    rows = [r for r, parts in enumerate(ds.catalog.items["parts"].to_list()) if any(p["source"] == "user" for p in parts)]
    missing = [r for r in rows if r not in iv.cold]
    vectors = with_cold(iv.vectors, iv.cold, np.array(rows, dtype=np.int64))
    contents, kept = [], {}  # kept: item id -> why it keeps its tagged vector
    for r in missing:
        try:
            contents.append((r, ds.catalog.content(r, cold=True)))
        except ContentError as exc:  # nothing of its own but tags
            kept[ds.catalog.ids[r]] = exc.problem
    if contents:
        res = item_embedder(cfg, iv.item_input).embed_many([c for _, c in contents], task="document",
                                                           dim=cfg.embedder.dim)
        done = np.array([r for r, _ in contents])[res.ok]
        vectors[done] = res.vectors[res.ok]
        kept |= {e.item_id or str(e.index): e.message for e in res.errors}
    if kept:
        console.print(f"[yellow]{len(kept)} item(s) have no content of their own that embeds without their user tags "
                      f"and keep their tagged vectors[/yellow], e.g. " + "; ".join(f"{i}: {m}" for i, m in list(kept.items())[:5]))
    return vectors


def protocol_vectors(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> tuple[Dataset, ItemVectors, np.ndarray]:
    """What the two-tower reads on ``split``: the dataset and item vectors with user tags limited to the training
    window (:func:`tags_in_training_window`) and the (n_items, D) matrix it trains and is scored on. On COLD the
    cold items take their new-item version, and with ``train.cold_item_content`` "new" every item does."""
    pds, tiv = tags_in_training_window(cfg, ds, iv, split)
    if split.name != "cold":
        return pds, tiv, tiv.vectors
    if cfg.train.cold_item_content == "new":
        return pds, tiv, new_item_vectors(cfg, ds, iv)
    return pds, tiv, tiv.with_cold(split.cold_items)


def check_embedder_overlap(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> None:
    """Refuse (DataError) to evaluate ``split`` with local embedder weights that trained on its test items or
    interactions (recsys.embed.provenance); print what was checked."""
    if iv.backend != "local":
        return
    from recsys.embed.local import DEFAULT_WEIGHTS
    from recsys.embed.provenance import check_overlap

    manifest = json.loads(((cfg.embedder.local_weights or DEFAULT_WEIGHTS) / "manifest.json").read_text())
    if manifest.get("version") != iv.weights_version:
        console.print(f"[yellow]the item vectors come from {iv.model_version}, not the installed weights "
                      f"{manifest.get('version')}: overlap not checked[/yellow]")
        return
    console.print(f"[dim]{check_overlap(manifest.get('training_data'), ds, split)}[/dim]")


def aligned(ds: Dataset, iv: ItemVectors) -> Dataset:
    """``ds`` without the items that have no saved vector (they failed to embed), so rows line up."""
    missing = set(ds.catalog.ids) - set(iv.ids)
    ds = ds.without_items(missing, "items without a vector (failed to embed)")
    if ds.catalog.ids != iv.ids:
        raise DataError("the saved vectors belong to another catalog: run `recsys embed` again (with the same --source/--data)")
    return ds


def load_item_vectors(cfg: Config) -> ItemVectors:
    folder = cfg.workdir / "embeddings"
    if not (folder / "manifest.json").exists():
        raise FileNotFoundError(f"no embeddings under {folder}: run `recsys embed` first")
    m = json.loads((folder / "manifest.json").read_text())
    frame = pl.read_parquet(folder / "items.parquet")
    return ItemVectors(frame["item_id"].to_list(), frame["vector"].to_numpy().astype(np.float32), m["backend"],
                       m["model_version"], m["dim"], m.get("failed", {}), item_input=m.get("item_input", "fused"))


def feasible_protocols(cfg: Config, ds: Dataset) -> list[str]:
    """Print the data report and return the configured protocols this dataset can form; none -> DataError
    (nothing is trained, so nothing is registered from a run that could not be evaluated)."""
    from recsys.data.check import check_dataset

    check = check_dataset(ds, cfg.eval)
    console.print(check.table())
    ok = check.feasible(list(cfg.eval.protocols))
    if not ok:
        reasons = "; ".join(f"{p.protocol}: {p.reason}" for p in check.protocols)
        raise DataError(f"no evaluation protocol can be formed on {ds.name} ({reasons}); "
                        "see `recsys data check`")
    for p in check.protocols:
        if not p.ok:
            console.print(f"[yellow]protocol {p.protocol} skipped: {p.reason}[/yellow]")
    return ok


# Features ----------------------------------------------------------------------------------------------
def build_features(cfg: Config, ds: Dataset, vectors: np.ndarray, iv: ItemVectors, interactions: pl.DataFrame,
                   name: str, materialize: bool):
    """A Feast repository holding ``interactions``-derived features and the item vectors."""
    from features.store import FeatureRepo

    repo = FeatureRepo(cfg, iv.backend, iv.model_version, iv.dim, name=name)
    repo.write_item_embeddings(ds.catalog.ids, vectors)
    counts = repo.write_interaction_features(interactions, ds.catalog, vectors)
    repo.apply()
    if materialize:
        report = repo.materialize(progress=True)
        counts["materialized"] = sum(report.rows.values())
    console.print(f"feast[{name}]: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return repo


def serve_features(cfg: Config, ds: Dataset, candidates: dict[str, ItemVectors], registered: "ProtocolRun | None"):
    """The serving store (all interactions, materialized) in the item space the registered model reads (the
    fused one when nothing was registered)."""
    mode = registered.extra.get("item_input", {}).get("chosen") if registered is not None else None
    iv = candidates.get(mode) or candidates.get("fused") or next(iter(candidates.values()))
    return build_features(cfg, ds, iv.vectors, iv, ds.interactions.frame, name="serve", materialize=True)


# Training + evaluation -------------------------------------------------------------------------------
@dataclass
class ProtocolRun:
    protocol: str
    results: list[EvalResult]
    trained: object | None = None
    split: object | None = None
    extra: dict = field(default_factory=dict)


def save_config(cfg: Config) -> None:
    """The run's configuration next to its results (the A/B notebook reloads it)."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    (cfg.workdir / "config.json").write_text(cfg.model_dump_json(indent=2))


BASELINES = ("popularity", "ease", "sasrec", "content-knn")


def run_protocol(cfg: Config, ds: Dataset, iv: ItemVectors, protocol: str, register: bool = False,
                 rerank: bool = False, baselines: tuple[str, ...] = BASELINES,
                 alias: str | None = None, candidates: dict[str, ItemVectors] | None = None) -> ProtocolRun:
    """Train and evaluate the two-tower and the baselines on one protocol (same split, same run).

    Args:
        iv: the fused item vectors (what the content baselines read).
        candidates: item inputs to choose among (item_input_candidates; default: ``iv`` alone). With several
            inputs, or several ``train.newest_items`` or ``train.id_embeddings`` values, a two-tower is trained on
            each input with the first values, then on the better half of the inputs with each other newest_items
            value, then the best so far with each other id_embeddings value; the one with the best validation
            NDCG@10 is evaluated on test (and registered); ``extra["item_input"]`` reports the choice (``chosen``:
            the input, ``newest_items`` and ``id_embeddings``: the values, ``val_ndcg10``: per variant trained,
            ``kept_val_ndcg10``: the kept epoch's, after training on).

    The baselines: see :func:`baseline_results`."""
    from recsys.rerank import MIN_USERS, Reranker
    from training.train import fit_two_tower

    split = make_split(protocol, ds, cfg.eval)
    console.print(split.describe())
    check_embedder_overlap(cfg, ds, iv, split)
    candidates = candidates or {iv.item_input: iv}
    newest, ids = cfg.train.newest_choices, cfg.train.for_protocol(protocol).id_choices
    single = len(candidates) * len(newest) * len(ids) == 1
    # several variants: successive halving. Each trains select_epochs epochs; the best one on validation trains on.
    screen = cfg.train.select_epochs if not single and 0 < cfg.train.select_epochs < cfg.train.max_epochs else 0
    fits = {}  # variant label -> (fit, dataset with tags in the window, item vectors, item input, newest_items, ids)
    inputs: dict = {}  # item input -> (dataset with tags in the window, item vectors, their matrix, Feast repo, rows)
    val: dict[str, float] = {}  # variant label -> its best validation NDCG@10

    def fit(mode: str, k: int, use_ids: bool) -> float:
        """Train the (item input, newest_items, id_embeddings) variant; its best validation NDCG@10."""
        if mode not in inputs:
            pds, civ, cvec = protocol_vectors(cfg, ds, candidates[mode], split)
            repo = build_features(cfg, pds, cvec, civ, split.train, materialize=False,
                                  name=protocol if len(candidates) == 1 or mode == "fused" else f"{protocol}_{mode}")
            inputs[mode] = pds, civ, cvec, repo, {}  # the training rows, shared by this input's variants
        pds, civ, cvec, repo, rows = inputs[mode]
        label = variant_label(mode, k, use_ids, newest, ids)
        trained = fit_two_tower(cfg.with_train(newest_items=k, id_embeddings=use_ids), pds.catalog, split, repo, cvec,
                                max_epochs=screen or None, name="two-tower" if single else f"two-tower[{label}]",
                                rows_cache=rows)
        fits[label] = (trained, pds, civ, mode, k, use_ids)
        val[label] = max((r.estimates["NDCG@10"].mean for r in trained.val_results), default=float("nan"))
        return val[label]

    def lead() -> str:
        return max(val, key=lambda m: (val[m], -list(val).index(m)))  # ties: the first variant trained

    # round 1: every item input with the first newest_items and id_embeddings values; round 2: the other
    # newest_items values, on the better half of the inputs only (the demo's 1-epoch screens: 5 fits instead of
    # 6, the same choices on LOO and COLD); round 3: the lead so far with the other id_embeddings values
    first = {mode: fit(mode, newest[0], ids[0]) for mode in candidates}
    better = sorted(first, key=lambda m: -np.nan_to_num(first[m], nan=-np.inf))[: (len(first) + 1) // 2]  # stable
    for mode in better:
        for k in newest[1:]:
            fit(mode, k, ids[0])
    _, _, _, mode, k, _ = fits[lead()]
    for use_ids in ids[1:]:
        fit(mode, k, use_ids)
    best = lead()
    trained, ds_c, civ, chosen, k, use_ids = fits[best]
    if not single:
        after = f" after {screen} epoch{'s' if screen > 1 else ''} each" if screen else ""
        what = [w for w, n in (("item input", len(candidates)), ("newest_items", len(newest)), ("id_embeddings", len(ids))) if n > 1]
        console.print(f"{protocol}: {', '.join(what[:-1])}{' and ' if len(what) > 1 else ''}{what[-1]} chosen on validation (NDCG@10{after}): "
                      f"{best} (" + ", ".join(f"{m} {v:.4f}" for m, v in val.items()) + ")"
                      + (f"; {best} trains on (up to {cfg.train.max_epochs} epochs)" if screen else ""))
    if screen:
        trained = fit_two_tower(cfg.with_train(newest_items=k, id_embeddings=use_ids), ds_c.catalog, split, None,
                                trained.content_vectors, name=trained.name, resume=trained)
    trained.name = "two-tower"
    keep_checkpoint(cfg, trained, protocol, chosen)
    if register:
        trained.register(cfg, ds_c.catalog, split, alias or cfg.serve.model_alias, civ.model_version, chosen)
    # the content baselines read the fused vectors, with tags in the same window
    fused_fit = next((f for f in fits.values() if f[3] == "fused"), None)
    ds, iv = fused_fit[1:3] if fused_fit else tags_in_training_window(cfg, ds, iv, split)
    fused = iv.with_cold(split.cold_items) if protocol == "cold" else iv.vectors
    nb = cfg.eval.bootstrap
    # with the reranker, the test candidates are ranked once: with an exact search ("auto" is exact in evaluation,
    # recsys.index) the two-tower's own top 50 is their head
    share = rerank and cfg.serve.candidates >= 50 and cfg.serve.faiss_index in ("auto", "flat")
    test_cands = trained.candidates(split.test, ds.catalog, cfg, cfg.serve.candidates) if share else None
    results = [trained.evaluate(split, ds.catalog, cfg, n_boot=nb, ranked=test_cands)]
    extra: dict = {"epochs": trained.epochs, "examples_per_s": round(trained.examples_per_s),
                   "train_s": round(trained.seconds + sum(f[0].seconds for m, f in fits.items() if m != best), 1),
                   "item_input": {"chosen": chosen, "newest_items": k, "id_embeddings": use_ids, "variant": best,
                                  "val_ndcg10": val,
                                  "screen_epochs": screen, "item_vectors": civ.model_version,
                                  "kept_val_ndcg10": max((r.estimates["NDCG@10"].mean for r in trained.val_results),
                                                         default=None)}}
    if rerank:
        val_cands = trained.candidates(split.val, ds.catalog, cfg, cfg.serve.candidates)
        reranker = Reranker(seed=cfg.train.seed)
        check = reranker.check(val_cands, split.val.targets)  # does it beat retrieval on validation?
        reranker.fit(val_cands, split.val.targets)
        extra["rerank_val"] = check.to_dict()
        if not reranker.fitted:
            console.print(f"reranker skipped: fewer than {MIN_USERS} validation users have a target among their "
                          f"{cfg.serve.candidates} candidates ({check.users} validation users); serving uses the retrieval order")
        console.print(f"reranker on validation (cross-fitted, {check.users} users): NDCG@10 {check.reranked_ndcg10:.4f} "
                      f"vs retrieval {check.retrieval_ndcg10:.4f} -> {'used' if check.helps else 'not used'} in serving by default")
        cands = test_cands if test_cands is not None else trained.candidates(split.test, ds.catalog, cfg, cfg.serve.candidates)
        rows, _ = reranker.rerank(cands, 50)
        n_cand = len(ds.catalog) if split.test.candidates is None else split.test.candidates.size
        results.append(score_topk("two-tower + rerank", rows, split.test, n_cand, protocol, n_boot=nb))
        if register and trained.run_id:
            log_reranker(cfg, trained.run_id, reranker)
    results += baseline_results(cfg, ds, iv, split, fused, baselines, extra)
    extra["two_tower_minus"] = {model: {m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in d.items()}
                                for model, d in paired_differences(results, n_boot=nb).items()}
    return ProtocolRun(protocol, results, trained, split, extra)


def variant_label(item_input: str, newest_items: int, use_ids: bool, newest_choices: list[int],
                  id_choices: list[bool]) -> str:
    """How a screened two-tower is named: its item input, then its newest_items value and whether it learns ids
    where several are screened (``concat+newest1+ids``)."""
    label = item_input if len(newest_choices) == 1 else f"{item_input}+newest{newest_items}"
    return label if len(id_choices) == 1 else label + ("+ids" if use_ids else "")


def keep_checkpoint(cfg: Config, trained, protocol: str, item_input: str) -> Path | None:
    """Copy the kept model's best checkpoint to ``models/two-tower-<protocol>/best.ckpt`` with the item input it
    reads beside it (``recsys evaluate`` reloads both)."""
    import shutil

    folder = cfg.models_dir / f"two-tower-{protocol}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "item_input.json").write_text(json.dumps({"item_input": item_input}))
    if trained.checkpoint is None:
        return None
    target = folder / "best.ckpt"
    if Path(trained.checkpoint).resolve() != target.resolve():
        shutil.copyfile(trained.checkpoint, target)
    return target


def baseline_results(cfg: Config, ds: Dataset, iv: ItemVectors, split, vectors: np.ndarray,
                     baselines: tuple[str, ...] = BASELINES, extra: dict | None = None) -> list[EvalResult]:
    """The baselines on ``split``'s test round, each tuned on its validation round where it has a knob.

    "popularity"; "ease" (lambda tuned); "sasrec" (tuned, recsys.eval.sasrec); "itemknn"; "content-knn" (three
    rows: item-kNN on the items' text, image and fused vectors). On COLD, popularity, EASE and SASRec cannot
    tell cold items apart (nobody interacted with them): they give one row, "random", for what it is.
    ``extra`` receives the tuned settings."""
    from recsys.eval.baselines import EASE, ContentKNN, ItemKNN, Popularity, Random
    from recsys.eval.sasrec import SASRec

    extra = {} if extra is None else extra
    protocol, idx = split.name, ds.catalog.index
    models: list = []
    no_interactions = [b for b in baselines if b in ("popularity", "ease", "sasrec")]
    if protocol == "cold" and no_interactions:
        models.append(Random(idx, name=f"random ({'/'.join(no_interactions)}: no interactions on cold items)"))
    for name in baselines:
        if protocol == "cold" and name in no_interactions:
            continue
        if name == "popularity":
            models.append(Popularity(idx).fit(split.test.history))
        elif name == "ease":
            best, _ = EASE.tuned(idx, split.val, cfg.eval.ease_lambdas, protocol)
            extra["ease_lambda"] = best.lam
            models.append(EASE(idx, best.lam).fit(split.test.history))
        elif name == "sasrec":
            try:
                sas, scores = SASRec.tuned(idx, split.val, protocol)
            except ValueError as exc:
                console.print(f"[yellow]sasrec skipped on {protocol}: {exc}[/yellow]")
                continue
            extra["sasrec"] = {"dropout": sas.cfg.dropout, "epochs": sas.epochs, "val_ndcg10": scores}
            models.append(sas)
        elif name == "itemknn":
            models.append(ItemKNN(idx).fit(split.test.history))
        elif name == "content-knn":
            cold = split.cold_items if protocol == "cold" else None
            for kind in ("text", "image"):
                pv = part_vectors(cfg, ds, iv, kind, cold)
                if not pv.has.any():
                    console.print(f"[dim]content-knn ({kind}) skipped: no item has a {kind} part[/dim]")
                    continue
                vec = pv.with_cold(split.cold_items) if cold is not None else pv.vectors
                models.append(ContentKNN(idx, vec, name=f"content-knn ({kind})", has=pv.has))
            models.append(ContentKNN(idx, vectors, name="content-knn (fused)"))
        else:
            raise ValueError(f"unknown baseline {name!r}")
    return [evaluate(m, split.test, idx, protocol, n_boot=cfg.eval.bootstrap) for m in models]


def log_reranker(cfg: Config, run_id: str, reranker) -> None:
    import tempfile

    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        reranker.save(Path(tmp) / "reranker.joblib")
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(Path(tmp) / "reranker.joblib"), artifact_path="two_tower")


def results_table(runs: list[ProtocolRun], title: str = "Recommendation quality (test, 95% bootstrap CI)") -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("protocol", "model", "users", *METRICS, "Coverage@10"):
        table.add_column(col, justify="right" if col not in ("protocol", "model") else "left")
    for run in runs:
        for r in run.results:
            table.add_row(run.protocol, r.model, str(r.per_user.height), *[str(r.estimates[m]) for m in METRICS],
                          f"{r.coverage10:.3f}")
    return table


def differences_table(runs: list[ProtocolRun]) -> Table:
    """The two-tower minus each other model, per user (paired bootstrap 95% interval)."""
    table = Table(title="Two-tower minus each model (test, same users, paired bootstrap 95% CI)")
    for col in ("protocol", "model", "HR@10 diff", "NDCG@10 diff"):
        table.add_column(col, justify="right" if "diff" in col else "left")
    for run in runs:
        for model, d in run.extra.get("two_tower_minus", {}).items():
            table.add_row(run.protocol, model, *[f"{d[m]['mean']:+.4f} [{d[m]['low']:+.4f}, {d[m]['high']:+.4f}]"
                                                 for m in ("HR@10", "NDCG@10")])
    return table


def results_json(runs: list[ProtocolRun]) -> list[dict]:
    out = []
    for run in runs:
        for r in run.results:
            out.append({"protocol": run.protocol, "model": r.model, "users": r.per_user.height,
                        **{m: {"mean": e.mean, "low": e.low, "high": e.high} for m, e in r.estimates.items()},
                        "Coverage@10": r.coverage10, **({"extra": run.extra} if r.model == "two-tower" else {})})
    return out


def kept_two_tower(cfg: Config, ds: Dataset, iv: ItemVectors, split):
    """The two-tower checkpoint kept for ``split``'s protocol (:func:`keep_checkpoint`) with the item vectors it
    was trained on (:func:`protocol_vectors`): its item input, user tags in the training window, on COLD the
    new-item versions (``train.cold_item_content``).

    Returns:
        (TrainedTwoTower, item input, the ItemVectors it reads)."""
    from training.module import TwoTowerModule
    from training.train import TrainedTwoTower

    ckpt = cfg.models_dir / f"two-tower-{split.name}" / "best.ckpt"
    mode_file = ckpt.parent / "item_input.json"
    mode = json.loads(mode_file.read_text())["item_input"] if mode_file.exists() else iv.item_input
    civ = iv if mode == iv.item_input else item_input_candidates(cfg.with_item_input("auto"), ds, iv)[mode]
    _, tiv, tvec = protocol_vectors(cfg, ds, civ, split)
    return TrainedTwoTower("two-tower", TwoTowerModule.from_checkpoint(ckpt), tvec), mode, tiv


def evaluate_saved(cfg: Config, baselines: tuple[str, ...] = ("popularity", "ease")) -> list[ProtocolRun]:
    """Re-evaluate the two-tower checkpoints of a previous `recsys train` beside the baselines."""
    iv = load_item_vectors(cfg)
    ds = aligned(load_dataset(cfg), iv)
    runs = []
    for protocol in cfg.eval.protocols:
        ckpt = cfg.models_dir / f"two-tower-{protocol}" / "best.ckpt"
        if not ckpt.exists():
            console.print(f"[yellow]no checkpoint for {protocol} at {ckpt}: run `recsys train` first[/yellow]")
            continue
        split = make_split(protocol, ds, cfg.eval)
        check_embedder_overlap(cfg, ds, iv, split)
        if protocol == "cold":
            iv.cold = embed_catalog(cfg, ds, cold=True, save=False)[0].cold
        trained, mode, tiv = kept_two_tower(cfg, ds, iv, split)
        pds, piv = tags_in_training_window(cfg, ds, iv, split)  # the content baselines' vectors
        vectors = piv.with_cold(split.cold_items) if protocol == "cold" else piv.vectors
        console.print(f"{protocol}: the two-tower reads the {mode} item vectors ({tiv.model_version})")
        results = [trained.evaluate(split, pds.catalog, cfg, n_boot=cfg.eval.bootstrap),
                   *baseline_results(cfg, pds, piv, split, vectors, baselines)]
        runs.append(ProtocolRun(protocol, results, trained, split))
    console.print(results_table(runs))
    return runs
