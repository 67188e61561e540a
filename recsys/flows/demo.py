"""The demo flow: every stage on one work directory (embed, features, train + evaluate per protocol, serve a
few users), printing sample recommendations, the comparison table and the stage timings."""

from __future__ import annotations

import json
import os

from rich.table import Table

from recsys.config import Config
from recsys.data import load_dataset
from recsys.errors import DataError
from recsys.embed.catalog import embed_catalog, item_input_candidates
from recsys.eval.compare import differences_table, results_json, results_table
from recsys.eval.inputs import feasible_protocols
from recsys.flows.features import serve_features
from recsys.flows.protocol import run_protocol
from recsys.progress import console, Timings


def run_demo(cfg: Config, sample_users: int = 3) -> dict:
    """The whole flow on one work directory; returns (and saves) the metrics and stage timings."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg.save()
    timings = Timings()
    with timings.stage("load data"):
        ds = load_dataset(cfg)
        console.print(ds.report.render())
        try:
            protocols = feasible_protocols(cfg, ds)
        except DataError as exc:  # too sparse to train or evaluate on: the catalog can still be searched
            return content_only(cfg, ds, timings, str(exc))
    with timings.stage("embed catalog"):
        iv, ds = embed_catalog(cfg, ds, cold="cold" in protocols)
        candidates = item_input_candidates(cfg, ds, iv)  # auto: fused, text-only, concatenated
    runs = []
    for protocol in protocols:  # the first one that can be formed registers the served model
        with timings.stage(f"train + evaluate: {protocol}"):
            runs.append(run_protocol(cfg, ds, iv, protocol, register=(protocol == protocols[0]),
                                     rerank=(protocol == "loo"), candidates=candidates))
    with timings.stage("features (serving store: all interactions, materialized)"):
        serve_features(cfg, ds, candidates, runs[0] if runs else None)
    with timings.stage("serve sample recommendations"):
        from serving.service import Recommender

        rec = Recommender.load(cfg)
        users = ds.interactions.frame["user_id"].unique(maintain_order=True).head(sample_users).to_list()
        titles = dict(zip(ds.catalog.ids, ds.catalog.titles))
        for u in users:
            resp = rec.recommend(u, k=5)
            online = rec.user_features(rec.current(), [u])
            console.print(f"[bold]user {u}[/bold] recently: " + "; ".join(titles[i] for i in online.recent_item_ids[0][:3]))
            for r in resp.items:
                console.print(f"   -> {r.title}  [dim]({r.score:.3f})[/dim]")
            console.print(f"   [dim]{resp.timings_ms['total_ms']:.1f} ms[/dim]")
    console.print(results_table(runs))
    console.print(differences_table(runs))
    report = {"timings_s": timings.stages, "total_s": round(sum(timings.stages.values()), 1),
              "peak_rss_mb": timings.peak_mb, "max_peak_rss_mb": max(timings.peak_mb.values(), default=0),
              "results": results_json(runs), "data": ds.report.loaded,
              "embedder": {"backend": iv.backend, "model_version": iv.model_version, "dim": iv.dim,
                           "failed": len(iv.failed)},
              "item_input": {r.protocol: r.extra.get("item_input") for r in runs}}
    out = cfg.workdir / "report"
    out.mkdir(exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    t = Table(title="Stage timings and peak resident memory")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    t.add_column("peak MB", justify="right")
    for k, v in timings.stages.items():
        t.add_row(k, f"{v:.1f}", f"{timings.peak_mb.get(k, 0):,}")
    t.add_row("total", f"{report['total_s']:.1f}", f"{report['max_peak_rss_mb']:,}")
    console.print(t)
    return report


def content_only(cfg: Config, ds, timings: Timings, reason: str) -> dict:
    """A catalog too sparse to train on: embed it and write the serving store anyway, so that `recsys serve`
    answers /search, content similarity and (flagged) popularity from the embeddings alone."""
    console.print(f"[yellow]{reason}[/yellow]")
    console.print("[yellow]Nothing is trained or registered. Serving the catalog from its embeddings alone.[/yellow]")
    with timings.stage("embed catalog"):
        iv, ds = embed_catalog(cfg, ds)
    with timings.stage("features (serving store: all interactions, materialized)"):
        serve_features(cfg, ds, {iv.item_input: iv}, None)
    report = {"timings_s": timings.stages, "total_s": round(sum(timings.stages.values()), 1), "results": [],
              "content_only": reason, "data": ds.report.loaded,
              "embedder": {"backend": iv.backend, "model_version": iv.model_version, "dim": iv.dim, "failed": len(iv.failed)}}
    out = cfg.workdir / "report"
    out.mkdir(exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    console.print(f"content only: {len(iv.ids):,} items embedded. `recsys serve --workdir {cfg.workdir}` answers /search "
                  "and /items/{id}/similar?space=content, and /recommend with the most popular items "
                  "(flagged fallback=popularity) until there is enough data to train on.")
    return report
