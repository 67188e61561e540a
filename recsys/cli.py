"""``recsys``: one verb per stage of the flow, plus the demo that runs them all.

    recsys embed      catalog -> vectors (or --query / --image: an ad-hoc query -> nearest items)
    recsys features   vectors + interactions -> Feast (offline parquet, online SQLite/Redis)
    recsys train      two-tower per protocol + baselines, MLflow, registered model; prints the table
    recsys index      FAISS index of the registered model's item vectors
    recsys serve      the HTTP service
    recsys evaluate   re-evaluate trained models and baselines (or `recsys evaluate embedder`)
    recsys nightly    the nightly batch: re-embed changed items, refresh Feast, rebuild the index
    recsys data check the data report: counts, distributions, which protocols this data can form
    recsys simulate   replay a dataset's held-out period through the service as an online experiment
    recsys experiment prepare (the simulation's arms) | report (tables and figures from the logs)
    recsys demo       all of the above on ml-latest-small
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from recsys.config import Config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the traceback of a user error (also RECSYS_DEBUG=1).")):
    """Options for every verb (a user error prints one line and exits 2 unless --debug)."""

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML file with Config sections (see recsys/config.py).")
WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Where everything this run writes goes (default ./work).")
PostersOpt = typer.Option(None, "--posters", help="MovieLens poster folder (<movieId>.jpg), attached as image parts.")
DataOpt = typer.Option(None, "--data", help="Dataset folder: ml-latest-small layout, or the generic format with --source generic.")
SourceOpt = typer.Option(None, "--source", help="movielens (default), generic or synthetic.")
UsersOpt = typer.Option(None, "--max-users", help="Use only the first N users (a quick slice).")
StoreOpt = typer.Option(None, "--online-store", help="sqlite (default) or redis.")
RedisOpt = typer.Option(None, "--redis", help="Redis connection string, e.g. localhost:6390.")
BackendOpt = typer.Option(None, "--embedder", help="local (default, offline) or gemini.")
DimOpt = typer.Option(None, "--dim", help="Embedding dimension (Matryoshka prefix).")
EpochsOpt = typer.Option(None, "--epochs", help="Two-tower max epochs.")
ProtocolsOpt = typer.Option(None, "--protocols", help="Comma-separated: loo,cold,temporal.")


def _config(config, workdir, posters=None, data=None, source=None, max_users=None, online_store=None, redis=None,
            embedder=None, dim=None, epochs=None, protocols=None, quiet: bool = False) -> Config:
    """The run's configuration: ``--config`` if given, else the one saved in the work directory by an earlier
    demo or train (so every verb on a work directory uses the same dataset), else the defaults; options on the
    command line override either. Says which dataset it is."""
    saved = Path(workdir or "work") / "config.json"
    base = None
    if config is None and saved.exists():
        try:
            base = json.loads(saved.read_text())
        except json.JSONDecodeError as exc:
            from recsys.errors import DataError

            raise DataError(f"{saved} is not valid JSON ({exc}); remove it or pass --config") from exc
        if source and source != base.get("data", {}).get("source"):
            base.pop("data", None)  # another dataset named on the command line: none of the saved one's paths
    cfg = Config.load(
        config, base=base,
        workdir=str(workdir) if workdir else None,
        data={"posters": posters, "path": data, "source": source, "max_users": max_users},
        features={"online_store": online_store, "redis_connection": redis},
        embedder={"backend": embedder, "dim": dim},
        train={"max_epochs": epochs},
        eval={"protocols": protocols.split(",") if protocols else None},
    )
    from recsys.quiet import silence

    silence()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        from recsys.data import describe_source

        typer.echo(describe_source(cfg) + (f"  [configuration: {saved}]" if base is not None else
                                            f"  [configuration: {config}]" if config else ""), err=True)
    return cfg


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
    from recsys.pipeline import EmbeddingFailures, console, embed_catalog, load_item_vectors

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
    from recsys.pipeline import aligned, build_features, load_item_vectors

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
    from recsys.pipeline import (aligned, console, feasible_protocols, item_input_candidates, load_item_vectors,
                                 results_json, results_table, run_protocol, serve_features)

    from recsys.pipeline import save_config

    from recsys.events import open_event_log, with_events

    cfg = _config(config, workdir, posters, data, source, max_users, epochs=epochs, protocols=protocols)
    save_config(cfg)
    iv = load_item_vectors(cfg)
    log = open_event_log(cfg)
    ds, n_events = with_events(aligned(load_dataset(cfg), iv), log)  # what the service accepted trains too
    log.close()
    if n_events:
        console.print(f"event log: {n_events:,} interactions the service accepted")
    feasible = feasible_protocols(cfg, ds)
    if "cold" in feasible:  # brand-new items are embedded without their user tags
        from recsys.pipeline import embed_catalog

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
    from recsys.pipeline import console
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


@app.command()
def evaluate(
    what: str = typer.Argument("models", help="models (two-tower checkpoints + baselines) or embedder"),
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, protocols: Optional[str] = ProtocolsOpt,
    fsdd: Optional[Path] = typer.Option(None, help="FSDD recordings folder (embedder evaluation)."),
):
    """Evaluate: `models` re-runs the protocols from the saved checkpoints; `embedder` measures the embedder."""
    cfg = _config(config, workdir, posters, data, source, protocols=protocols)
    if what == "embedder":
        from recsys.eval.embedder_report import run as run_embedder_eval

        run_embedder_eval(cfg, fsdd=fsdd)
        return
    if what != "models":
        raise typer.BadParameter("expected `models` or `embedder`")
    from recsys.pipeline import evaluate_saved

    evaluate_saved(cfg)


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
    stage1_steps: int = typer.Option(600), stage2_steps: int = typer.Option(400),
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
    from recsys.pipeline import console
    from training.embedder import EmbedderTrainConfig, correct_weights, install as install_weights, train_embedder
    from training.embedder_data import build

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
    sample recommendations and two-tower vs popularity vs EASE on the LOO and COLD protocols."""
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
    from recsys.pipeline import console

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


experiment_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                              help="Online experiments: train the simulation's arms (prepare), read the logs (report).")
app.add_typer(experiment_app, name="experiment")


def _arms(spec: str):
    """"champion=sim-champion,challenger=sim-challenger:0.3" -> ArmConfigs (alias, or vN for a version)."""
    from recsys.config import ArmConfig

    arms, shares_given = [], False
    for chunk in [c.strip() for c in spec.split(",") if c.strip()]:
        name, sep, target = chunk.partition("=")
        if not sep or not name or not target:
            raise typer.BadParameter(f"arm {chunk!r}: expected name=alias (or name=vN, optionally :share)", param_hint="--arms")
        target, _, share = target.partition(":")
        shares_given |= bool(share)
        version = target[1:] if target[:1] == "v" and target[1:].isdigit() else None
        arms.append(ArmConfig(name=name, alias=None if version else target, version=version,
                              share=float(share) if share else 1.0))
    if len(arms) < 2:
        raise typer.BadParameter("an experiment needs two arms or more", param_hint="--arms")
    if not shares_given:
        for a in arms:
            a.share = 1.0 / len(arms)
    return arms


@experiment_app.command("prepare")
def experiment_prepare(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
    epochs: Optional[int] = EpochsOpt,
    challenger: list[str] = typer.Option(["train.id_embeddings=true"], help="section.field=value overrides that make the challenger (repeatable)."),
    split: str = typer.Option("holdout", help="holdout (each user's last eval.holdout_share of interactions) or temporal (a global time cut)."),
):
    """Train the simulation's two arms on the interactions before the held-out period only (so it is really
    unseen) and register them as @sim-champion and @sim-challenger; `recsys simulate` replays that period."""
    from recsys.flows.simulate import prepare

    cfg = _config(config, workdir, posters, data, source, max_users=max_users, epochs=epochs)
    try:
        prepare(cfg, challenger, split)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


@app.command()
def simulate(
    config: Optional[Path] = ConfigOpt, workdir: Optional[Path] = WorkdirOpt, posters: Optional[Path] = PostersOpt,
    data: Optional[Path] = DataOpt, source: Optional[str] = SourceOpt, max_users: Optional[int] = UsersOpt,
    name: str = typer.Option("ab", help="The run's name: logs go to <workdir>/experiments/<name>/logs."),
    arms: str = typer.Option("champion=sim-champion,challenger=sim-challenger",
                             help="name=alias (or name=vN), comma-separated, each optionally :share; equal shares by default. "
                                  "An A/A run names one alias twice."),
    mode: str = typer.Option("ab", help="ab, or interleave (team draft of the first two arms in each reply)."),
    explore: str = typer.Option("none", help="none, or softmax (sample the shown list; log propensities)."),
    temperature: float = typer.Option(0.05, help="Softmax temperature of the exploration."),
    k: int = typer.Option(10, help="Items per reply."),
    eta: float = typer.Option(0.0, help="Position bias of the click model: P(click | relevant) = (1/position)^eta."),
    seed: int = typer.Option(0, help="Seed of the click model's draws."),
    salt: Optional[str] = typer.Option(None, help="Assignment salt (default: sim-<name>)."),
    sim_users: Optional[int] = typer.Option(None, help="Replay only the first N arriving users."),
    url: Optional[str] = typer.Option(None, help="Drive this running service instead of starting one."),
):
    """Replay the dataset's held-out period (the split `experiment prepare` trained the arms for) through the
    real service as an online experiment: users arrive at their real times, engage with shown items they
    really went on to use."""
    from recsys.flows.simulate import simulate as run_simulation

    if mode not in ("ab", "interleave") or explore not in ("none", "softmax"):
        raise typer.BadParameter("mode is ab or interleave; explore is none or softmax")
    cfg = _config(config, workdir, posters, data, source, max_users=max_users)
    run = run_simulation(cfg, name, _arms(arms), mode=mode, explore=explore, temperature=temperature, k=k, eta=eta,
                         seed=seed, salt=salt, max_users=sim_users, url=url)
    raise typer.Exit(1 if run.errors else 0)


@experiment_app.command("report")
def experiment_report(
    logs: Path = typer.Option(..., "--logs", help="An experiment folder (<workdir>/experiments/<name>) or its logs/ folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where report.md and its figures go (default: <logs>/report)."),
    control: Optional[str] = typer.Option(None, help="The control arm (default: the first)."),
    interleaving: Optional[Path] = typer.Option(None, help="An interleaved run of the same arms (adds the users-needed comparison)."),
    off_policy: Optional[Path] = typer.Option(None, "--off-policy", help="A run with exploration (adds IPS / SNIPS / DR)."),
    truth: Optional[Path] = typer.Option(None, help="A greedy run of the target policy: the off-policy estimates' ground truth."),
):
    """Write a markdown report with figures: split check, per-arm metrics, differences with intervals, CUPED,
    segments, A/A calibration, power; optionally interleaving and off-policy estimates."""
    from recsys.experiments.analysis import load
    from recsys.experiments.report import write_report
    from recsys.quiet import silence

    silence()
    try:
        d = load(logs)
        path = write_report(d, out or d.folder / "report", control=control,
                            interleaved=load(interleaving) if interleaving else None,
                            explored=load(off_policy) if off_policy else None, truth=load(truth) if truth else None)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"report: {path}")


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
