"""The nightly batch: a job a scheduler can trust.

    snapshot catalog -> diff by content hash (new / changed / unchanged / removed) -> embed only those
    (committed in batches to the embedding cache: a killed run resumes without redoing finished batches)
    -> dead letters + failure threshold -> the dataset plus the event log -> new versioned vectors (parquet)
    -> Feast offline (append changed vectors, rebuild the affected users' features) -> item-tower vectors + index
    (recsys.index, the code serving uses) -> VERIFY (checksums, counts, widths, finite vectors, recall) -> Feast
    online (the affected users' rows, incremental) -> PUBLISH: one manifest, written to a temporary file and
    renamed into place.

Vectors, item-tower vectors and the index go to ``<workdir>/nightly/runs/<run id>/``; the published manifest
(``recsys.manifest``) is what serving loads them from, so a crash anywhere before the rename leaves the previous
state served. Feast's files are written in place, each atomically (offline parquet through a rename), and the
online rows only after the run's output is verified; each user row records the event-log position it includes,
so a reader meets a user's old row or the new one, each with exactly the events it lacks folded on top. A run
whose content would be identical publishes nothing.

Exit codes (``recsys nightly``; documented in the README for schedulers):
    0  done (published, or nothing changed)
    3  more items failed than ``nightly.failure_threshold`` allows: nothing published, dead letters written
    4  another nightly run holds the lock on this work directory: nothing done
    5  what the run built failed its checks (checksums, counts, widths, finite vectors): nothing published
    1  any other error (a traceback in the log)

The run reads the dataset plus the interaction event log (recsys.events) up to the log's position when it
starts, and records that position in the manifest (``events_until``) and on every user row it writes, so
serving folds exactly the events a row does not include. Only the users with new events, new interactions or
an item whose vector changed are rebuilt and written to the online store.

An item whose embedding fails ``nightly.quarantine_after`` runs in a row with the same content is quarantined:
listed in the summary and the dead letters, not counted in the failure rate, retried when its content changes.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from rich.table import Table
from tqdm.auto import tqdm

from recsys import contract
from recsys.contract import ContractError
from recsys.config import Config
from recsys.content import Content
from recsys.data import Dataset, load_dataset
from recsys.embed import item_embedder
from recsys.embed.cache import embedding_key
from recsys.events import open_event_log, with_events
from recsys.flows.nightly_embed import Embedded, embed_local, embed_ray
from recsys.flows.nightly_guards import (NightlyLock, checkpoint, dead_letter_path, quarantined, read_dead_letters,
                                         write_dead_letters)
from recsys.manifest import Manifest, publish, read_published, sha256_file, vectors_digest, verify
from recsys.registry import registered_or_none
from recsys.progress import console, Timings

EXIT_OK, EXIT_ERROR, EXIT_FAILURES, EXIT_LOCKED, EXIT_UNVERIFIED = 0, 1, 3, 4, 5


@dataclass
class NightlySummary:
    run_id: str
    counts: dict = field(default_factory=dict)  # new, changed, unchanged, removed, failed, embedded, cache_hits, retries
    users_refreshed: int = 0
    materialized: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    published: str | None = None  # the manifest path, when this run published
    exit_code: int = EXIT_OK
    message: str = ""
    dry_run: bool = False

    def table(self) -> Table:
        t = Table(title=f"nightly {self.run_id}{' (dry run)' if self.dry_run else ''}")
        t.add_column("what")
        t.add_column("value", justify="right")
        for k, v in self.counts.items():
            t.add_row(f"items {k}", f"{v:,}")
        t.add_row("users refreshed", f"{self.users_refreshed:,}")
        for k, v in self.materialized.items():
            t.add_row(f"materialized {k}", f"{v:,}")
        for k, v in self.timings_s.items():
            t.add_row(f"time: {k}", f"{v:.1f} s")
        t.add_row("published", self.published or f"nothing ({self.message or 'no change'})")
        t.add_row("exit code", str(self.exit_code))
        return t


# Stage 1-2: snapshot and diff --------------------------------------------------------------------------------
def content_hashes(cfg: Config, contents: list[Content], backend: str, model_version: str) -> list[str]:
    """One key per item: the content digest within this embedding space (backend, version, dim)."""
    return [embedding_key(c, "document", backend, model_version, cfg.embedder.dim)
            for c in tqdm(contents, desc="snapshot: hash content", unit="item", leave=False)]


@dataclass
class Diff:
    new: list[int]  # catalog rows
    changed: list[int]
    unchanged: list[int]
    removed: list[str]  # item ids

    @property
    def todo(self) -> list[int]:
        return sorted(self.new + self.changed)


def diff(ids: list[str], hashes: list[str], previous: pl.DataFrame | None) -> Diff:
    prev = {} if previous is None else dict(zip(previous["item_id"].to_list(), previous["content_hash"].to_list()))
    new, changed, unchanged = [], [], []
    for r, (i, h) in enumerate(zip(ids, hashes)):
        (new if i not in prev else unchanged if prev[i] == h else changed).append(r)
    current = set(ids)
    return Diff(new, changed, unchanged, [i for i in prev if i not in current])


# The job -----------------------------------------------------------------------------------------------------
def run_nightly(cfg: Config, engine: str | None = None, dry_run: bool = False) -> NightlySummary:
    """Run every stage under the work directory's lock; returns the summary (``exit_code`` says what a
    scheduler should see). A second run while one holds the lock returns at once with EXIT_LOCKED."""
    lock = NightlyLock(cfg)
    holder = None if dry_run else lock.acquire()
    if holder is not None:
        summary = NightlySummary("-", exit_code=EXIT_LOCKED,
                                 message=f"another nightly holds {lock.path} ({holder}); nothing done")
        console.print(f"[red]error:[/red] {summary.message}")
        return summary
    try:
        return _run(cfg, engine, dry_run)
    finally:
        lock.release()


class Stop(Exception):
    """Ends a run before it publishes: its message and exit code (:func:`_run` is where every run exits)."""

    def __init__(self, message: str, exit_code: int = EXIT_OK, logged: bool = True):
        super().__init__(message)
        self.message, self.exit_code, self.logged = message, exit_code, logged


@dataclass
class Run:
    """One nightly run's identity and what its stages hand each other."""

    cfg: Config
    engine: str
    dry_run: bool
    run_id: str
    work: Path  # nightly/runs/<run_id>
    previous: Manifest | None  # the published run this one follows
    events_until: int  # the event-log position this run folds up to (accepted before it started)
    summary: NightlySummary
    timings: Timings = field(default_factory=Timings)

    @classmethod
    def start(cls, cfg: Config, engine: str, dry_run: bool) -> "Run":
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        log = open_event_log(cfg)
        events_until = log.max_seq()
        log.close()
        return cls(cfg, engine, dry_run, run_id, cfg.workdir / "nightly" / "runs" / run_id, read_published(cfg.workdir),
                   events_until, NightlySummary(run_id, dry_run=dry_run))


@dataclass
class CatalogSnapshot:
    """Stage 1-2: today's catalog, its content keys, and what changed since the published run."""

    ds: Dataset
    contents: list[Content]
    hashes: list[str]
    backend: str
    version: str
    diff: Diff
    prev_vectors: pl.DataFrame | None  # the published vectors, when they are in today's embedding space
    held: set[str]  # quarantined items (skipped until their content changes)

    @property
    def todo(self) -> list[int]:
        return [r for r in self.diff.todo if self.ds.catalog.ids[r] not in self.held]


def _run(cfg: Config, engine: str | None, dry_run: bool) -> NightlySummary:
    """The stages in order; a stage that ends the run raises :class:`Stop`, and this is the one place a run exits:
    the summary's message and exit code, the MLflow record (not for a dry run), the table."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = with_item_input(cfg, served_item_input(cfg))
    run = Run.start(cfg, engine or cfg.nightly.engine, dry_run)
    logged = True
    try:
        snap = _snapshot(run)
        emb = _embed(run, snap)
        served, inter, vectors, keep_rows, users = _merge_with_events(run, snap, emb)
        manifest, repo, changed_rows = _write_and_verify(run, snap, served, inter, vectors, keep_rows, users)
        _publish(run, manifest, repo, users, changed_rows)
    except Stop as stop:
        run.summary.message, run.summary.exit_code, logged = stop.message, stop.exit_code, stop.logged
    summary = run.summary
    summary.timings_s = run.timings.stages
    if logged:
        _log_mlflow(cfg, summary)
    console.print(summary.table())
    return summary


def _snapshot(run: Run) -> CatalogSnapshot:
    """Load the catalog, key every item's content, diff against the published vectors; a dry run stops here."""
    cfg, summary = run.cfg, run.summary
    with run.timings.stage("snapshot + diff"):
        ds = load_dataset(cfg)
        console.print(ds.report.render())
        backend, version = _space(cfg, item_embedder(cfg) if run.engine == "local" else None)
        contents = ds.catalog.contents()
        hashes = content_hashes(cfg, contents, backend, version)
        prev_vectors = None
        prev = run.previous
        if prev is not None and prev.embedder == {"backend": backend, "model_version": version, "dim": cfg.embedder.item_dim}:
            prev_vectors = pl.read_parquet(cfg.workdir / prev.vectors["path"])
        d = diff(ds.catalog.ids, hashes, prev_vectors)
    snap = CatalogSnapshot(ds, contents, hashes, backend, version, d, prev_vectors, quarantined(cfg, ds.catalog.ids, hashes, d.todo))
    summary.counts = {"new": len(d.new), "changed": len(d.changed), "unchanged": len(d.unchanged), "removed": len(d.removed)}
    if snap.held:
        summary.counts["quarantined"] = len(snap.held)
    if run.dry_run:
        raise Stop("dry run", logged=False)
    checkpoint("snapshot")
    return snap


def _embed(run: Run, snap: CatalogSnapshot) -> Embedded:
    """Embed the new and changed items; dead-letter the failures; stop past the failure threshold."""
    cfg, summary, ds, todo = run.cfg, run.summary, snap.ds, snap.todo
    with run.timings.stage(f"embed ({run.engine} engine): {len(todo):,} new or changed"):
        emb = embed_ray(cfg, ds, todo, run.work) if run.engine == "ray" and todo else embed_local(cfg, snap.contents, todo)
    failed = {ds.catalog.ids[r]: why for r, why in emb.failed.items()}
    summary.counts.update(failed=len(failed), embedded=len(emb.vectors), cache_hits=emb.cache_hits, retries=emb.retries)
    if emb.budget:  # the shared request budget across Ray actors
        summary.counts.update({f"budget_{k}": v for k, v in emb.budget.items() if k in ("max_in_flight", "waits", "pauses")})
    write_dead_letters(cfg, failed, run.run_id, hashes={ds.catalog.ids[r]: snap.hashes[r] for r in emb.failed}, keep=snap.held)
    now_held = {i for i, dl in read_dead_letters(cfg).items() if dl.get("quarantined") and i in failed}
    if now_held:
        summary.counts["quarantined"] = len(snap.held) + len(now_held)
    counted = len(failed) - len(now_held)  # a quarantined item no longer counts
    rate = counted / max(1, len(todo) - len(now_held))
    if counted and rate > cfg.nightly.failure_threshold:
        raise Stop(f"{counted} of {len(todo) - len(now_held)} items failed ({rate:.1%} > {cfg.nightly.failure_threshold:.1%}); "
                   f"see {dead_letter_path(cfg)}", EXIT_FAILURES)
    checkpoint("embedded")
    return emb


def _merge_with_events(run: Run, snap: CatalogSnapshot, emb: Embedded):
    """Today's vectors (new ones and carried-over ones), the dataset with the event log folded in, and the users
    whose features change; stops when nothing changed since the published run.

    Returns:
        (served dataset, its interactions with their event-log sequence (0: the dataset's own), (n, D) vectors, their
        catalog rows, users to refresh or None for everyone)."""
    cfg, ds, d, prev = run.cfg, snap.ds, snap.diff, run.previous
    vectors, keep_rows = _merge(cfg, ds, d, emb, snap.prev_vectors, snap.hashes)
    served = ds.without_items(set(ds.catalog.ids) - {ds.catalog.ids[r] for r in keep_rows},
                              "items without a vector yet (failed; retried next run)")
    log = open_event_log(cfg)
    served, n_events = with_events(served, log, run.events_until)
    log.close()
    run.summary.counts["events"] = n_events
    inter = served.interactions.frame
    if "seq" not in inter.columns:
        inter = inter.with_columns(pl.lit(0, pl.Int64).alias("seq"))
    # users of changed items, and of new ones (their interactions were left out while the item had no vector)
    users = _users_to_refresh(inter, prev, {ds.catalog.ids[r] for r in d.todo}, snap.prev_vectors is None)
    if (prev is not None and snap.prev_vectors is not None and not emb.vectors and not d.removed and not users
            and (prev.model or {}).get("version") == _champion_version(cfg)):
        raise Stop(f"nothing changed since {prev.run_id}")
    return served, inter, vectors, keep_rows, users


def _write_and_verify(run: Run, snap: CatalogSnapshot, served: Dataset, inter: pl.DataFrame, vectors: np.ndarray,
                      keep_rows: list[int], users):
    """The run's versioned vectors, the offline features, the champion's item vectors and index, the manifest;
    then every check (stop: nothing published when one fails).

    Returns:
        (the verified manifest, the Feast repository, item vectors written)."""
    cfg, summary, ds, work = run.cfg, run.summary, snap.ds, run.work
    with run.timings.stage("versioned vectors"):
        work.mkdir(parents=True, exist_ok=True)
        vec_path = work / "vectors.parquet"
        pl.DataFrame({"item_id": [ds.catalog.ids[r] for r in keep_rows], "content_hash": [snap.hashes[r] for r in keep_rows],
                      "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, cfg.embedder.item_dim))}).write_parquet(vec_path)
    checkpoint("vectors")
    with run.timings.stage("features (Feast, incremental)"):
        from features.store import FeatureRepo

        repo = FeatureRepo(cfg, snap.backend, snap.version, cfg.embedder.item_dim, name="serve")
        changed_rows = repo.write_item_embeddings(served.catalog.ids, vectors)
        counts = repo.write_interaction_features(inter, served.catalog, vectors, users=users)
        repo.apply()
        summary.users_refreshed = counts["users_refreshed"]
    checkpoint("features:offline")
    with run.timings.stage("item-tower vectors + index"):
        model, index = _index(cfg, served, vectors, snap.version, work)
    checkpoint("indexed")
    until = inter["timestamp"].max() if inter.height else None
    prev = run.previous
    manifest = Manifest(
        run_id=run.run_id, created_at=datetime.now(timezone.utc).isoformat(),
        embedder={"backend": snap.backend, "model_version": snap.version, "dim": cfg.embedder.item_dim},
        vectors={"path": str(vec_path.relative_to(cfg.workdir)), "items": len(keep_rows),
                 "sha256": vectors_digest(served.catalog.ids, vectors)},
        feast={"repo": "serve", "item_view": repo.views.item_embedding.name},
        model=model, index=index, counts=dict(summary.counts), previous=prev.run_id if prev else None,
        interactions_until=until.isoformat() if until is not None else None, events_until=run.events_until)
    with run.timings.stage("verify"):
        problems = verify(manifest, cfg.workdir, min_recall=cfg.serve.target_recall - 0.05)
    if problems:
        raise Stop("the run's output failed its checks, nothing published: " + "; ".join(problems), EXIT_UNVERIFIED)
    checkpoint("verified")
    return manifest, repo, changed_rows


def _publish(run: Run, manifest: Manifest, repo, users, changed_rows: int) -> None:
    """Only once the run's output is verified: the online features, then the manifest (one atomic rename)."""
    cfg, summary, prev = run.cfg, run.summary, run.previous
    with run.timings.stage("online features (Feast, incremental)"):
        # each user row carries the event-log position it includes, so a reader meets a user's old row (plus the
        # log's events past it) or the new one, never an event counted twice; only the refreshed users are written
        # (every user on a first run: a row whose newest interaction predates the last materialization may have
        # gained an event with an old time)
        user_views = (repo.views.user_history.name, repo.views.user_stats.name, repo.views.user_seen.name)
        report = repo.materialize(progress=True, full=user_views, only=users)
        summary.materialized = {"item vectors written": changed_rows, **{k.split("__")[0]: v for k, v in report.rows.items()}}
        manifest.feast["materialized"] = report.rows
    checkpoint("features:online")
    if prev is not None and prev.content_key() == manifest.content_key():
        summary.message = f"nothing changed since {prev.run_id}"
    else:
        with run.timings.stage("publish"):
            summary.published = str(publish(manifest, cfg.workdir))
    _cleanup(cfg, keep={run.run_id, prev.run_id if prev else "", (read_published(cfg.workdir) or manifest).run_id})


def _users_to_refresh(inter: pl.DataFrame, previous: Manifest | None, changed_items: set[str], first: bool) -> set[str] | None:
    """Users whose features must be rebuilt: those with interactions or events after the last run's watermarks, and those
    who had an item whose vector is new or changed. None (everyone) on a first run or a new embedding space."""
    if first or previous is None or previous.interactions_until is None:
        return None
    since = datetime.fromisoformat(previous.interactions_until)
    # new rows of the dataset (by time) and events the log took since the last run (by sequence: an event may
    # carry an older time than the watermark)
    new = inter.filter((pl.col("timestamp") > since) | (pl.col("seq") > previous.events_until))["user_id"].unique().to_list()
    touched = inter.filter(pl.col("item_id").is_in(list(changed_items)))["user_id"].unique().to_list() if changed_items else []
    return set(new) | set(touched)


def _champion_version(cfg: Config) -> str | None:
    """The version the serving alias points to now (None without a registry entry)."""
    reg = registered_or_none(cfg, check=False)
    return reg.version if reg is not None else None


def served_item_input(cfg: Config) -> str:
    """The item space to write (recsys.embed.item_input): ``embedder.item_input``, or with ``auto`` the one the
    served model reads (its two_tower.json), fused when no model is registered yet."""
    if cfg.embedder.item_input != "auto":
        return cfg.embedder.item_input
    reg = registered_or_none(cfg, check=False)
    return reg.config.get("item_input", "fused") if reg is not None else "fused"


def with_item_input(cfg: Config, mode: str) -> Config:
    """A copy of ``cfg`` whose item input is ``mode`` (what the embedders and the Ray actors read)."""
    if mode != "fused":
        console.print(f"item vectors: {mode} (what the served model reads)")
    return cfg.with_item_input(mode)


def _space(cfg: Config, embedder) -> tuple[str, str]:
    """(backend, model version) of the configured embedder, without loading it twice."""
    emb = embedder or item_embedder(cfg)
    return emb.name, emb.model_version


def _merge(cfg: Config, ds: Dataset, d: Diff, emb: Embedded, prev: pl.DataFrame | None, hashes: list[str]):
    """The run's vectors, one per catalog item that has one: newly embedded, or carried over from the previous
    version (unchanged items, and changed items whose re-embedding failed: their last good vector stays until a
    retry succeeds). New items that failed have none and are left out."""
    prev_vec = {} if prev is None else dict(zip(prev["item_id"].to_list(), prev["vector"].to_numpy()))
    rows, vecs = [], []
    for r, item in enumerate(ds.catalog.ids):
        v = emb.vectors.get(r)
        if v is None:
            v = prev_vec.get(item)
        if v is None:
            continue
        rows.append(r)
        vecs.append(np.asarray(v, np.float32))
    arr = np.stack(vecs) if vecs else np.zeros((0, cfg.embedder.item_dim), np.float32)
    if not np.isfinite(arr).all():  # never publish a NaN: a bug upstream, not an item failure
        raise FloatingPointError("non-finite values in the merged item vectors")
    return arr, rows


def _index(cfg: Config, ds: Dataset, vectors: np.ndarray, embedder_version: str, work: Path):
    """Item-tower vectors of the champion model for today's catalog, and its index (recsys.index, the same
    build serving does). None when no model is registered or it reads another embedding space."""
    import torch

    from features.inputs import ItemInputs, ItemStatsAsOf
    from features.store import FeatureRepo
    from recsys.index import build_index

    try:
        reg = registered_or_none(cfg)  # its item ids = the rows of the model's id table
    except ContractError as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        return None, None
    if reg is None:  # no registered model yet: publish vectors and features only
        console.print("[yellow]no registered model to index; run `recsys train`[/yellow]")
        return None, None
    if reg.config.get("embedder_version") != embedder_version or int(reg.config.get("dim", 0)) != cfg.embedder.item_dim:
        console.print("[yellow]the registered model reads another embedding space: retrain before indexing[/yellow]")
        return None, None
    arrays = reg.arrays()
    item_tower = reg.item_tower()
    repo = FeatureRepo(cfg, reg.config["embedder"], embedder_version, cfg.embedder.item_dim, name="serve")
    asof = ItemStatsAsOf(repo.item_stats_snapshots(), ds.catalog)
    model_ids = arrays["ids"].tolist()
    trained = dict(zip(model_ids, arrays["known"]))
    known = np.array([bool(trained.get(i, False)) for i in ds.catalog.ids])
    # the id table has one row per item of the catalog the model was trained on: ids only for those
    trained_row = {i: r for r, i in enumerate(model_ids)}
    rows = np.array([trained_row[i] if k else 0 for i, k in zip(ds.catalog.ids, known)], np.int64)
    inputs = ItemInputs(np.asarray(vectors, np.float32), asof.all_at(time.time()), rows, known)
    with torch.inference_mode():
        vecs = item_tower(*inputs.tensors()).numpy()
    s, queries = cfg.serve, arrays["queries"]
    index = build_index(vecs, queries if len(queries) else None, kind=s.faiss_index,
                        exact_below=s.exact_below, target_recall=s.target_recall, use_gpu=False)
    folder = work / "index"
    index.save(folder)
    np.savez_compressed(folder / contract.ITEM_VECTORS_FILE, ids=np.array(ds.catalog.ids), titles=np.array(ds.catalog.titles),
                        vectors=vecs, content=vectors, known=known, model_version=reg.version)
    info = index.info.to_dict()
    return ({"name": cfg.train.registered_model, "version": reg.version, "alias": cfg.serve.model_alias},
            {"path": str(folder.relative_to(cfg.workdir)), "kind": info["kind"], "recall_at_100": info["recall_at_100"],
             "params": info["params"], "items": len(vecs), "sha256": sha256_file(folder / "items.faiss"),
             "vectors_sha256": vectors_digest(ds.catalog.ids, vecs)})


def _cleanup(cfg: Config, keep: set[str]) -> None:
    """Keep the newest ``nightly.keep_runs`` run folders and every folder named in ``keep``."""
    import shutil

    root = cfg.workdir / "nightly" / "runs"
    if not root.exists():
        return
    runs = sorted(p for p in root.iterdir() if p.is_dir())
    for p in runs[: max(0, len(runs) - cfg.nightly.keep_runs)]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _log_mlflow(cfg: Config, summary: NightlySummary) -> None:
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    # the experiment by id, not mlflow.set_experiment: that one stays active for the whole process, and a
    # later start_run of a training run (another experiment) in the same process then fails
    client = mlflow.tracking.MlflowClient()
    found = client.get_experiment_by_name("nightly")
    experiment_id = found.experiment_id if found else client.create_experiment("nightly")
    with mlflow.start_run(run_name=f"nightly/{summary.run_id}", experiment_id=experiment_id):
        mlflow.log_params({"run_id": summary.run_id, "backend": cfg.embedder.backend, "dim": cfg.embedder.dim,
                           "engine": cfg.nightly.engine, "failure_threshold": cfg.nightly.failure_threshold})
        mlflow.log_metrics({**{f"items_{k}": v for k, v in summary.counts.items()},
                            "users_refreshed": summary.users_refreshed, "exit_code": summary.exit_code,
                            **{f"seconds_{k.split(':')[0].split(' ')[0]}": v for k, v in summary.timings_s.items()}})
        mlflow.log_dict(asdict(summary), "summary.json")
