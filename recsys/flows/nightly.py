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

import json
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
from recsys.pipeline import Timings, console

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


def _finish(cfg: Config, summary: NightlySummary, timings: Timings, message: str | None = None,
            exit_code: int | None = None) -> NightlySummary:
    """Close a run (every exit after the snapshot): its message and exit code, the MLflow record, the table."""
    if message is not None:
        summary.message = message
    if exit_code is not None:
        summary.exit_code = exit_code
    summary.timings_s = timings.stages
    _log_mlflow(cfg, summary)
    console.print(summary.table())
    return summary


def _run(cfg: Config, engine: str | None, dry_run: bool) -> NightlySummary:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    engine = engine or cfg.nightly.engine
    cfg = with_item_input(cfg, served_item_input(cfg))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    summary = NightlySummary(run_id, dry_run=dry_run)
    timings = Timings()
    work = cfg.workdir / "nightly" / "runs" / run_id
    previous = read_published(cfg.workdir)
    start = open_event_log(cfg)
    events_until = start.max_seq()  # this run folds the events accepted before it started
    start.close()
    with timings.stage("snapshot + diff"):
        ds = load_dataset(cfg)
        console.print(ds.report.render())
        embedder_info = item_embedder(cfg) if engine == "local" else None
        backend, version = _space(cfg, embedder_info)
        contents = ds.catalog.contents()
        hashes = content_hashes(cfg, contents, backend, version)
        prev_vectors = None
        if previous is not None and previous.embedder == {"backend": backend, "model_version": version, "dim": cfg.embedder.item_dim}:
            prev_vectors = pl.read_parquet(cfg.workdir / previous.vectors["path"])
        d = diff(ds.catalog.ids, hashes, prev_vectors)
    held = quarantined(cfg, ds.catalog.ids, hashes, d.todo)
    todo = [r for r in d.todo if ds.catalog.ids[r] not in held]
    summary.counts = {"new": len(d.new), "changed": len(d.changed), "unchanged": len(d.unchanged), "removed": len(d.removed)}
    if held:
        summary.counts["quarantined"] = len(held)
    if dry_run:
        summary.timings_s, summary.message = timings.stages, "dry run"
        console.print(summary.table())
        return summary
    checkpoint("snapshot")
    with timings.stage(f"embed ({engine} engine): {len(todo):,} new or changed"):
        emb = embed_ray(cfg, ds, todo, work) if engine == "ray" and todo else embed_local(cfg, contents, todo)
    failed = {ds.catalog.ids[r]: why for r, why in emb.failed.items()}
    summary.counts.update(failed=len(failed), embedded=len(emb.vectors), cache_hits=emb.cache_hits, retries=emb.retries)
    if emb.budget:  # the shared request budget across Ray actors
        summary.counts.update({f"budget_{k}": v for k, v in emb.budget.items() if k in ("max_in_flight", "waits", "pauses")})
    write_dead_letters(cfg, failed, run_id, hashes={ds.catalog.ids[r]: hashes[r] for r in emb.failed}, keep=held)
    now_held = {i for i, dl in read_dead_letters(cfg).items() if dl.get("quarantined") and i in failed}
    if now_held:
        summary.counts["quarantined"] = len(held) + len(now_held)
    counted = len(failed) - len(now_held)  # a quarantined item no longer counts
    rate = counted / max(1, len(todo) - len(now_held))
    if counted and rate > cfg.nightly.failure_threshold:
        return _finish(cfg, summary, timings, exit_code=EXIT_FAILURES, message=(
            f"{counted} of {len(todo) - len(now_held)} items failed ({rate:.1%} > {cfg.nightly.failure_threshold:.1%}); "
            f"see {dead_letter_path(cfg)}"))
    checkpoint("embedded")
    vectors, keep_rows = _merge(cfg, ds, d, emb, prev_vectors, hashes)
    served = ds.without_items(set(ds.catalog.ids) - {ds.catalog.ids[r] for r in keep_rows},
                              "items without a vector yet (failed; retried next run)")
    log = open_event_log(cfg)
    served, n_events = with_events(served, log, events_until)
    log.close()
    summary.counts["events"] = n_events
    inter = served.interactions.frame
    if "seq" not in inter.columns:
        inter = inter.with_columns(pl.lit(0, pl.Int64).alias("seq"))
    until = inter["timestamp"].max() if inter.height else None
    # users of changed items, and of new ones (their interactions were left out while the item had no vector)
    users = _users_to_refresh(inter, previous, {ds.catalog.ids[r] for r in d.todo}, prev_vectors is None)
    if (previous is not None and prev_vectors is not None and not emb.vectors and not d.removed and not users
            and (previous.model or {}).get("version") == _champion_version(cfg)):
        return _finish(cfg, summary, timings, message=f"nothing changed since {previous.run_id}")
    with timings.stage("versioned vectors"):
        work.mkdir(parents=True, exist_ok=True)
        vec_path = work / "vectors.parquet"
        pl.DataFrame({"item_id": [ds.catalog.ids[r] for r in keep_rows], "content_hash": [hashes[r] for r in keep_rows],
                      "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, cfg.embedder.item_dim))}).write_parquet(vec_path)
    checkpoint("vectors")
    with timings.stage("features (Feast, incremental)"):
        from features.store import FeatureRepo

        repo = FeatureRepo(cfg, backend, version, cfg.embedder.item_dim, name="serve")
        changed_rows = repo.write_item_embeddings(served.catalog.ids, vectors)
        counts = repo.write_interaction_features(inter, served.catalog, vectors, users=users)
        repo.apply()
        summary.users_refreshed = counts["users_refreshed"]
    checkpoint("features:offline")
    with timings.stage("item-tower vectors + index"):
        model, index = _index(cfg, served, vectors, version, work)
    checkpoint("indexed")
    manifest = Manifest(
        run_id=run_id, created_at=datetime.now(timezone.utc).isoformat(),
        embedder={"backend": backend, "model_version": version, "dim": cfg.embedder.item_dim},
        vectors={"path": str(vec_path.relative_to(cfg.workdir)), "items": len(keep_rows),
                 "sha256": vectors_digest(served.catalog.ids, vectors)},
        feast={"repo": "serve", "item_view": repo.views.item_embedding.name},
        model=model, index=index, counts=dict(summary.counts), previous=previous.run_id if previous else None,
        interactions_until=until.isoformat() if until is not None else None, events_until=events_until)
    with timings.stage("verify"):
        problems = verify(manifest, cfg.workdir, min_recall=cfg.serve.target_recall - 0.05)
    if problems:
        return _finish(cfg, summary, timings, exit_code=EXIT_UNVERIFIED,
                       message="the run's output failed its checks, nothing published: " + "; ".join(problems))
    checkpoint("verified")
    with timings.stage("online features (Feast, incremental)"):
        # only once the run's output is verified; each user row carries the event-log position it includes, so a
        # reader meets a user's old row (plus the log's events past it) or the new one, never an event counted
        # twice; only the refreshed users are written
        # (every user on a first run: a row whose newest interaction predates the last materialization may have
        # gained an event with an old time)
        user_views = (repo.views.user_history.name, repo.views.user_stats.name, repo.views.user_seen.name)
        report = repo.materialize(progress=True, full=user_views, only=users)
        summary.materialized = {"item vectors written": changed_rows, **{k.split("__")[0]: v for k, v in report.rows.items()}}
        manifest.feast["materialized"] = report.rows
    checkpoint("features:online")
    if previous is not None and previous.content_key() == manifest.content_key():
        summary.message = f"nothing changed since {previous.run_id}"
    else:
        with timings.stage("publish"):
            summary.published = str(publish(manifest, cfg.workdir))
    _cleanup(cfg, keep={run_id, previous.run_id if previous else "", (read_published(cfg.workdir) or manifest).run_id})
    return _finish(cfg, summary, timings)


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
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        return str(mlflow.tracking.MlflowClient().get_model_version_by_alias(cfg.train.registered_model,
                                                                            cfg.serve.model_alias).version)
    except Exception:  # no registered model (or alias) yet
        return None


def served_item_input(cfg: Config) -> str:
    """The item space to write (recsys.embed.item_input): ``embedder.item_input``, or with ``auto`` the one the
    served model reads (its two_tower.json), fused when no model is registered yet."""
    if cfg.embedder.item_input != "auto":
        return cfg.embedder.item_input
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    try:
        mv = mlflow.tracking.MlflowClient().get_model_version_by_alias(cfg.train.registered_model, cfg.serve.model_alias)
        path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="two_tower/two_tower.json")
    except Exception:  # no registered model (or alias) yet
        return "fused"
    return json.loads(Path(path).read_text()).get("item_input", "fused")


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
    import mlflow
    import torch

    from features.inputs import ItemStatsAsOf
    from recsys.index import build_index
    from serving.service import ModelBundle

    try:
        bundle = ModelBundle.from_mlflow(cfg, published=False)  # item ids = the rows of the model's id table
    except Exception as exc:  # no registered model yet: publish vectors and features only
        console.print(f"[yellow]no registered model to index ({type(exc).__name__}); run `recsys train`[/yellow]")
        return None, None
    if bundle.config.get("embedder_version") != embedder_version or int(bundle.config.get("dim", 0)) != cfg.embedder.item_dim:
        console.print("[yellow]the registered model reads another embedding space: retrain before indexing[/yellow]")
        return None, None
    mlflow.set_tracking_uri(cfg.tracking_uri)
    item_tower = mlflow.pytorch.load_model(f"runs:/{bundle.run_id}/item_tower", map_location="cpu").eval()
    from features.store import FeatureRepo

    repo = FeatureRepo(cfg, bundle.config["embedder"], embedder_version, cfg.embedder.item_dim, name="serve")
    asof = ItemStatsAsOf(pl.read_parquet(repo._path(repo.views.item_stats)), ds.catalog)
    trained = dict(zip(bundle.item_ids, bundle.known))
    known = np.array([bool(trained.get(i, False)) for i in ds.catalog.ids])
    # the id table has one row per item of the catalog the model was trained on: ids only for those
    trained_row = {i: r for r, i in enumerate(bundle.item_ids)}
    rows = np.array([trained_row[i] if k else 0 for i, k in zip(ds.catalog.ids, known)], np.int64)
    with torch.inference_mode():
        vecs = item_tower(torch.from_numpy(vectors), torch.from_numpy(asof.all_at(time.time())), torch.from_numpy(rows),
                          torch.from_numpy(known)).numpy()
    s = cfg.serve
    index = build_index(vecs, bundle.queries if len(bundle.queries) else None, kind=s.faiss_index,
                        exact_below=s.exact_below, target_recall=s.target_recall, use_gpu=False)
    folder = work / "index"
    index.save(folder)
    np.savez_compressed(folder / "item_vectors.npz", ids=np.array(ds.catalog.ids), titles=np.array(ds.catalog.titles),
                        vectors=vecs, content=vectors, known=known, model_version=bundle.version)
    info = index.info.to_dict()
    return ({"name": cfg.train.registered_model, "version": bundle.version, "alias": cfg.serve.model_alias},
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
