"""recsys: one verb per stage of the flow, plus the demo that runs them all.

\b
  demo                the whole flow on one work directory (ml-latest-small by default)
  data check          the data report: counts, problems, which protocols this data can form
  data example        write a small dataset in the generic format, to copy
  embed               catalog -> item vectors (or --query/--image: an ad-hoc search)
  features            item vectors + interactions -> Feast (offline parquet, online SQLite/Redis)
  train               two-tower per protocol + baselines -> MLflow, the registered model, the table
  train-embedder      train the local embedder's fusion model on paired data
  evaluate models     score the kept two-tower checkpoints again beside the baselines
  evaluate embedder   measure the embedder (cross-modal retrieval, Matryoshka, speed)
  index               FAISS index of the registered model's item vectors
  serve               the HTTP service (recommend, similar, search, interactions)
  ranker fit          the multi-source ranking stage (EASE, SASRec, item-kNN, popularity + LambdaRank) for serving
  nightly             the nightly batch: embed changed items, refresh Feast, index, publish
  simulate            replay the held-out period through the service as an online experiment
  experiment prepare  train the simulation's arms and register them under aliases
  experiment report   the decision, sequential looks, guardrails, tables and figures from the logs
  experiment plan     users and days a planned experiment needs, from earlier logs
  experiment traffic  drive a running service with returning simulated users

Every verb takes --help; --debug shows the traceback of a user error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from recsys.cli_experiment import experiment_app, simulate
from recsys.cli_options import (BackendOpt, ConfigOpt, DataOpt, DimOpt, EpochsOpt, PostersOpt, ProtocolsOpt, RedisOpt,
                                SourceOpt, StoreOpt, UsersOpt, WorkdirOpt, _config)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the traceback of a user error (also RECSYS_DEBUG=1).")):
    """Options for every verb (a user error prints one line and exits 2 unless --debug)."""


@app.command()
def embed(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, embedder: Optional[str] = BackendOpt,
    dim: Optional[int] = DimOpt,
    query: Optional[str] = typer.Option(None, "--query", "-q", help="Embed this text as a search query instead."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image file to add to (or make) the query."),
    top: int = typer.Option(10, "--top", help="Items to show for a query."),
):
    """Embed the catalog (all modalities, interleaved parts), or search it with an ad-hoc query."""
    from recsys.content import Content, Part
    from recsys.data import load_dataset
    from recsys.embed import item_embedder
    from recsys.embed.catalog import embed_catalog, EmbeddingFailures, load_item_vectors
    from recsys.progress import console

    cfg = _config(config, workdir, posters, data, source, embedder=embedder, dim=dim)
    if query or image:
        parts = ([query] if query else []) + ([Part.of_file("image", image)] if image else [])
        iv = load_item_vectors(cfg)
        emb = item_embedder(cfg, iv.item_input)
        q = emb.embed([Content.of(*parts, item_id="query")], task="query", dim=cfg.embedder.dim)
        titles = dict(zip(load_dataset(cfg).catalog.ids, load_dataset(cfg).catalog.titles))
        scores = iv.vectors @ q[0]
        for r in scores.argsort()[::-1][:top]:
            console.print(f"{scores[r]:.3f}  {iv.ids[r]}  {titles.get(iv.ids[r], '')}")
        return
    ds = load_dataset(cfg)
    console.print(ds.report.render())
    try:
        iv, _ = embed_catalog(cfg, ds)
    except EmbeddingFailures as exc:
        console.print(f"[red]error:[/red] {exc}; nothing written")
        raise typer.Exit(exc.exit_code)
    console.print(f"embedded {len(iv.ids) - len(iv.failed):,} items ({len(iv.failed)} failed) with "
                  f"{iv.backend} {iv.model_version}, dim {iv.dim} -> {cfg.workdir / 'embeddings'}")


@app.command()
def features(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, data: Optional[Path] = DataOpt,
    source: Optional[str] = SourceOpt, posters: Optional[Path] = PostersOpt, online_store: Optional[str] = StoreOpt,
    redis: Optional[str] = RedisOpt,
):
    """Write item and user features to Feast and materialize them to the online store."""
    from recsys.data import load_dataset
    from recsys.embed.catalog import aligned, load_item_vectors
    from recsys.flows.features import build_features

    from recsys.events import open_event_log, with_events

    cfg = _config(config, workdir, posters, data, source, online_store=online_store, redis=redis)
    iv = load_item_vectors(cfg)
    log = open_event_log(cfg)
    ds, _ = with_events(aligned(load_dataset(cfg), iv), log)
    log.close()
    build_features(cfg, ds, iv.vectors, iv, ds.interactions.frame, name="serve", materialize=True)


@app.command()
def train(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
    epochs: Optional[int] = EpochsOpt, protocols: Optional[str] = ProtocolsOpt,
    alias: str = typer.Option("champion", help="Alias for the registered model (champion, challenger, ...)."),
):
    """Train the two-tower on each protocol, evaluate it beside the baselines, register the first protocol's
    model in MLflow under --alias, and print one comparison table."""
    from recsys.data import load_dataset
    from recsys.embed.catalog import aligned, item_input_candidates, load_item_vectors
    from recsys.eval.compare import results_json, results_table
    from recsys.eval.inputs import feasible_protocols
    from recsys.flows.features import serve_features
    from recsys.flows.protocol import run_protocol
    from recsys.progress import console


    from recsys.events import open_event_log, with_events

    cfg = _config(config, workdir, posters, data, source, max_users, epochs=epochs, protocols=protocols)
    cfg.save()
    iv = load_item_vectors(cfg)
    log = open_event_log(cfg)
    ds, n_events = with_events(aligned(load_dataset(cfg), iv), log)  # what the service accepted trains too
    log.close()
    if n_events:
        console.print(f"event log: {n_events:,} interactions the service accepted")
    feasible = feasible_protocols(cfg, ds)
    if "cold" in feasible:  # brand-new items are embedded without their user tags
        from recsys.embed.catalog import embed_catalog

        iv.cold = embed_catalog(cfg, ds, cold=True, save=False)[0].cold
    candidates = item_input_candidates(cfg, ds, iv)
    runs = [run_protocol(cfg, ds, iv, p, register=(i == 0), rerank=(p == "loo"), alias=alias, candidates=candidates)
            for i, p in enumerate(feasible)]
    if runs and runs[0].extra["item_input"]["chosen"] != iv.item_input:  # the served model reads another item space
        serve_features(cfg, ds, candidates, runs[0])
    console.print(results_table(runs))
    (cfg.workdir / "report").mkdir(exist_ok=True)
    (cfg.workdir / "report" / "train.json").write_text(json.dumps(results_json(runs), indent=2, default=str))


@app.command()
def index(config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt,
          alias: Optional[str] = typer.Option(None, help="Model alias (default: serve.model_alias).")):
    """Build the candidate index of the registered model's item vectors (exact, or IVF tuned to the recall
    target above serve.exact_below items) and save it under <workdir>/index."""
    from recsys.index import build_index
    from recsys.progress import console
    from serving.service import ModelBundle

    cfg = _config(config, workdir)
    bundle = ModelBundle.from_mlflow(cfg, alias=alias)
    s = cfg.serve
    idx = build_index(bundle.item_vectors, bundle.queries if len(bundle.queries) else None, kind=s.faiss_index,
                      exact_below=s.exact_below, target_recall=s.target_recall, use_gpu=False)
    out = idx.save(cfg.workdir / "index")
    console.print(f"{idx.info.kind} index of {idx.n:,} x {idx.dim} from model v{bundle.version} "
                  f"(recall@100 {idx.info.recall_at_100}, {idx.info.params}) -> {out}")


@app.command()
def serve(config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt,
          host: Optional[str] = typer.Option(None, help="Interface (default serve.host, 127.0.0.1)."),
          port: Optional[int] = typer.Option(None, help="Port (default serve.port, 8000)."),
          workers: Optional[int] = typer.Option(None, help="uvicorn worker processes (default serve.workers).")):
    """Start the HTTP service (FastAPI): /recommend, /items/{id}/similar, /search, /interactions, /healthz,
    /readyz, /metrics, /admin/reload. API keys: RECSYS_API_KEYS, RECSYS_ADMIN_KEYS (comma-separated)."""
    import tempfile

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch/faiss load: every thread of every worker inherits it
    import uvicorn

    from serving.app import check_host, create_app

    cfg = _config(config, workdir)
    host, port, workers = host or cfg.serve.host, port or cfg.serve.port, workers or cfg.serve.workers
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"host": host, "port": port, "workers": workers})})
    try:
        check_host(cfg, host)
    except SystemExit as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if workers == 1:
        uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")
        return
    os.environ["RECSYS_SERVE_CONFIG"] = cfg.model_dump_json()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="recsys-metrics-"))
    os.environ["RECSYS_METRICS_MULTIPROC"] = "1"
    uvicorn.run("serving.app:app_from_env", factory=True, host=host, port=port, workers=workers, log_level="warning")


evaluate_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                           help="Evaluate again: the kept two-tower models, or the embedder.")
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.command("models")
def evaluate_models(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, protocols: Optional[str] = ProtocolsOpt,
):
    """Re-run the protocols from the checkpoints `recsys train` kept, beside popularity and EASE."""
    from recsys.flows.saved import evaluate_saved

    evaluate_saved(_config(config, workdir, posters, data, source, protocols=protocols))


@evaluate_app.command("embedder")
def evaluate_embedder(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    fsdd: Optional[Path] = typer.Option(None, help="FSDD recordings folder (spoken digits)."),
):
    """Measure the embedder: cross-modal retrieval, Matryoshka prefixes, speed (recsys.eval.embedder_report)."""
    from recsys.eval.embedder_report import run as run_embedder_eval

    run_embedder_eval(_config(config, workdir, posters), fsdd=fsdd)


@app.command()
def nightly(config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
            data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt,
            engine: Optional[str] = typer.Option(None, help="local (default) or ray (Ray Data; nightly.ray_address for a cluster)."),
            dry_run: bool = typer.Option(False, "--dry-run", help="Report what would change; write nothing."),
            threshold: Optional[float] = typer.Option(None, help="Failure share that stops the publish (default 0.01).")):
    """The nightly batch job: embed only new/changed items (crash-safe, in committed batches), dead-letter the
    failures, write versioned vectors, refresh Feast incrementally, rebuild the index, publish one manifest
    atomically; reads the dataset plus the service's event log. Exit codes: 0 done, 3 failures over the threshold
    (nothing published), 4 another nightly holds the lock, 5 the output failed its checks (nothing published),
    1 error."""
    from recsys.flows.nightly import run_nightly

    cfg = _config(config, workdir, posters, data, source)
    if engine:
        cfg.nightly.engine = engine
    if threshold is not None:
        cfg.nightly.failure_threshold = threshold
    summary = run_nightly(cfg, dry_run=dry_run)
    raise typer.Exit(summary.exit_code)


@app.command(name="train-embedder")
def train_embedder_cmd(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    fsdd: Optional[Path] = typer.Option(None, help="FSDD recordings folder (spoken digits)."),
    stage1_steps: int = typer.Option(600, help="Stage 1 (alignment on real pairs): optimizer steps."),
    stage2_steps: int = typer.Option(400, help="Stage 2 (multi-task with hard negatives): optimizer steps."),
    coengagement_share: float = typer.Option(0.5, help="Stage 2's share of batches from co-engagement pairs."),
    part_item_share: float = typer.Option(0.15, help="Stage 2's share of batches from one-part <-> whole-item pairs."),
    titles_without_posters: bool = typer.Option(False, help="Part-item pairs also for the titles of movies without a poster."),
    kd_items: bool = typer.Option(False, help="Distil MiniLM's item-item geometry on every content with text "
                                  "(co-engagement and part-item batches too), not only on text-only batches."),
    own_val: float = typer.Option(0.1, help="Validate on this share of the training poster movies instead of the COLD "
                                  "protocol's validation movies, which are then left out (0: validate on those, the "
                                  "recipe before fusion-e853765975)."),
    correction_rank: int = typer.Option(64, help="Stage 4: rank of each query signature's learned modality-gap map (0: centres only)."),
    correction_steps: int = typer.Option(600, help="Stage 4: steps (validated every 50)."),
    correction_search_weight: float = typer.Option(16.0, help="Stage 4: weight of the one-part query -> item task (the others: 1)."),
    from_weights: Optional[Path] = typer.Option(None, "--from-weights", help="Keep this weights folder's fusion model "
                                                "and run stage 4 alone (the same data options it trained with)."),
    install: bool = typer.Option(False, help="Copy the weights into the package (the default local weights)."),
):
    """Train the local embedder's fusion model (3 stages, then the modality-gap correction) on the paired data at
    hand; log to MLflow."""
    from recsys.data import load_dataset
    from recsys.progress import console
    from training.embedder import EmbedderTrainConfig, correct_weights, install as install_weights, train_embedder
    from recsys.embed.tasks import build

    if from_weights is not None and not (from_weights / "manifest.json").exists():
        raise FileNotFoundError(f"--from-weights {from_weights}: no manifest.json there, so not a weights folder")
    cfg = _config(config, workdir, posters)
    ds = load_dataset(cfg) if cfg.data.source == "movielens" else None
    data = build(ds, cfg.eval, fsdd, cfg.cache_dir / "embedder-synthetic", titles_without_posters=titles_without_posters,
                 own_val=own_val or None)
    tcfg = EmbedderTrainConfig(stage1_steps=stage1_steps, stage2_steps=stage2_steps, coengagement_share=coengagement_share,
                               part_item_share=part_item_share, kd_items=kd_items, correction_rank=correction_rank,
                               correction_steps=correction_steps, correction_search_weight=correction_search_weight)
    if from_weights is not None:
        folder, test = correct_weights(from_weights, data, cfg.models_dir / "embedder", cfg.tracking_uri, tcfg, cfg.cache_dir)
    else:
        folder, test = train_embedder(data, cfg.models_dir / "embedder", cfg.tracking_uri, tcfg, cache_dir=cfg.cache_dir)
    console.print_json(json.dumps(test))
    if install:
        console.print(f"installed -> {install_weights(folder)}")


@app.command()
def demo(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt,
    max_users: Optional[int] = UsersOpt, epochs: Optional[int] = EpochsOpt, protocols: Optional[str] = ProtocolsOpt,
    online_store: Optional[str] = StoreOpt, redis: Optional[str] = RedisOpt,
):
    """The main job: the whole flow (ml-latest-small with the embedded defaults, or --source/--data); prints
    sample recommendations, the two-tower beside its baselines (popularity, EASE, SASRec, content kNN) on each
    protocol, and the stage timings."""
    from recsys.flows.demo import run_demo

    cfg = _config(config, workdir, posters, data, source, max_users=max_users, epochs=epochs, protocols=protocols,
                  online_store=online_store, redis=redis)
    run_demo(cfg)


data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Look at a dataset before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
    protocols: Optional[str] = typer.Option(None, "--protocols", help="Protocols to check (default: loo,cold,temporal,holdout)."),
):
    """The data report: what loading found, users/items/interactions, interactions per user and per item, the
    time span, items per modality, and which evaluation protocols can be formed (with how many test users, or
    why not). Exit 0 when the configured protocols can all be formed, 1 when some cannot, 2 when none can."""
    from recsys.data import load_dataset
    from recsys.data.check import check_dataset
    from recsys.progress import console

    cfg = _config(config, workdir, posters, data, source, max_users=max_users)
    ds = load_dataset(cfg)
    console.print(ds.report.render())
    check = check_dataset(ds, cfg.eval, protocols.split(",") if protocols else ["loo", "cold", "temporal", "holdout"])
    console.print(check.table())
    wanted = protocols.split(",") if protocols else list(cfg.eval.protocols)
    ok = check.feasible(wanted)
    raise typer.Exit(0 if len(ok) == len(wanted) else 1 if ok else 2)


@data_app.command("example")
def data_example(
    folder: Path = typer.Argument(..., help="Where to write the example catalog (created; must be empty or new)."),
    items: int = typer.Option(120, help="Items (six themes; text, images, audio, a few videos)."),
    users: int = typer.Option(150, help="Users, each with interactions driven by their favourite themes."),
):
    """Write a tiny catalog in the generic format (items.jsonl, interactions.csv, media/ with images, audio
    and video) to try the generic path on: README, "Your own data in 10 minutes". The media are generated
    here (no media files are shipped in the repository)."""
    from recsys.data.synthetic import SyntheticSpec, generate
    from recsys.errors import DataError

    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} is not empty: pick a new folder for the example")
    generate(folder, SyntheticSpec(n_items=items, n_users=users, mean_interactions=14, seed=1,
                                   share_audio=0.2, share_video=0.05))
    n_media = sum(1 for p in (folder / "media").rglob("*") if p.is_file()) if (folder / "media").is_dir() else 0
    typer.echo(f"wrote {folder}: items.jsonl ({items} items), interactions.csv ({users} users), {n_media} media files")


ranker_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The multi-source ranking stage.")
app.add_typer(ranker_app, name="ranker")


@ranker_app.command("fit")
def ranker_fit(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, data: Optional[Path] = DataOpt,
    source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
):
    """Fit the ranking stage on the catalog's interactions: each user's last [ranker] val_rounds interactions are
    validation questions, the train_rounds before them train a LambdaRank model over the merged candidates of
    EASE, SASRec, item-kNN and popularity. Writes <workdir>/ranker (the bundle and report.json); a running
    service takes it at its next reload, and with serve.ranker = "auto" serves it only where validation chose it
    over the best of those four sources and over the two-tower kept in the work directory (on each user's last 2
    questions: the ones it did not learn from). About 14 minutes on ml-latest-small on 2 idle cores, 26 on busy ones (two SASRec fits, each checked on thousands of validation questions)."""
    from recsys import ranking
    from recsys.data import load_dataset
    from recsys.progress import console
    from recsys.quiet import silence

    silence()
    cfg = _config(config, workdir, None, data, source, max_users=max_users)
    from recsys.flows.saved import kept_two_tower_scorer

    two_tower, ds = kept_two_tower_scorer(cfg, load_dataset(cfg))
    if two_tower is None:
        console.print(f"[yellow]no two-tower kept in {cfg.models_dir} (recsys demo or recsys train keeps one): the "
                      "verdict compares the ranker with its sources only[/yellow]")
    ranker, _ = ranking.fit(ds, cfg, say=console.print, rivals={"two-tower": two_tower} if two_tower else None)
    path = ranker.save(ranking.folder_of(cfg))
    r = ranker.report
    d = r["ranker_minus_best_single_val"]["NDCG@10"]
    console.print(f"wrote {path} ({r['ranker']['trees']} trees); validation NDCG@10 ranker minus {r['best_single_on_val']}: "
                  f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] -> serve.ranker=auto serves: {r['served']}")


app.add_typer(experiment_app, name="experiment")
app.command()(simulate)


def main(argv: list[str] | None = None) -> None:
    """The ``recsys`` entry point: a user error (bad data, a bad configuration, a missing file) prints one line
    and exits 2; ``--debug`` (anywhere on the line) or RECSYS_DEBUG=1 shows the traceback instead."""
    import sys

    from recsys.errors import user_errors

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("RECSYS_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="recsys")
    except user_errors() as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        typer.echo("(run with --debug for the traceback)", err=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
