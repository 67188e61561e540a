"""The nightly's embedding stage: the local engine (committed batches, resumable) and Ray Data (an actor pool,
one embedder per actor, one shared request budget with the gemini backend)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from recsys.config import Config
from recsys.content import Content
from recsys.data import Dataset
from recsys.embed import item_embedder
from recsys.flows.nightly_guards import checkpoint
from recsys.progress import console


@dataclass
class Embedded:
    vectors: dict[int, np.ndarray]  # catalog row -> vector
    failed: dict[int, str]  # catalog row -> reason
    cache_hits: int = 0
    retries: int = 0
    budget: dict = field(default_factory=dict)  # the shared request budget's counters (Ray with gemini)


def embed_local(cfg: Config, contents: list[Content], rows: list[int]) -> Embedded:
    """Embed ``rows`` in batches of ``nightly.batch_items``; each batch is committed to the cache as it
    finishes, so a rerun after a kill finds finished batches as cache hits."""
    if not rows:
        console.print("nothing new or changed to embed")
        return Embedded({}, {})
    embedder = item_embedder(cfg)
    out = Embedded({}, {})
    step = cfg.nightly.batch_items
    bar = tqdm(total=len(rows), desc=f"embed[{embedder.name}]", unit="item")
    for b, start in enumerate(range(0, len(rows), step)):
        chunk = rows[start:start + step]
        res = embedder.embed_many([contents[r] for r in chunk], task="document", dim=cfg.embedder.dim)
        bad = {e.index: e.message for e in res.errors}
        for j, r in enumerate(chunk):
            if j in bad:
                out.failed[r] = bad[j]
            else:
                out.vectors[r] = res.vectors[j]
        out.cache_hits += res.cache_hits
        bar.update(len(chunk))
        bar.set_postfix(cached=out.cache_hits, failed=len(out.failed))
        checkpoint(f"embed:{b + 1}")
    bar.close()
    out.retries = int(getattr(embedder, "stats", {}).get("retries", 0))
    return out


class _RayEmbedActor:
    """One embedder per Ray actor; ``__call__`` embeds one batch of rows (item_id, row, parts as JSON)."""

    def __init__(self, cfg_json: str, budget_actor=None):
        from recsys.embed.budget import RayBudget

        cfg = Config.model_validate_json(cfg_json)
        # every actor spends one request budget (concurrency, contents per minute, 429 pauses) held by one
        # actor; each actor's own thread pool may use all of it when the others are idle
        budget = RayBudget(budget_actor) if budget_actor is not None else None
        self.cfg, self.embedder = cfg, item_embedder(cfg, budget=budget)

    def __call__(self, batch: dict) -> dict:
        from recsys.content import Part

        contents = []
        for item_id, parts in zip(batch["item_id"], batch["parts"]):
            ps = [Part.of_text(p["text"], source=p["source"] or "content") if p["kind"] == "text"
                  else Part(p["kind"], path=p["path"], source=p["source"] or "content") for p in json.loads(parts)]
            contents.append(Content(tuple(ps), item_id=str(item_id)))
        stats = getattr(self.embedder, "stats", {})
        retries_before = stats.get("retries", 0)
        res = self.embedder.embed_many(contents, task="document", dim=self.cfg.embedder.dim)
        bad = {e.index: e.message for e in res.errors}
        n = len(contents)
        if n == 0:
            return {"row": batch["row"], "vector": [], "error": [], "cache_hits": [], "retries": []}
        # per-batch counters ride on the batch's first row (the driver sums the columns)
        return {"row": batch["row"], "vector": [v.tolist() if j not in bad else None for j, v in enumerate(res.vectors)],
                "error": [bad.get(j, "") for j in range(n)], "cache_hits": [res.cache_hits] + [0] * (n - 1),
                "retries": [stats.get("retries", 0) - retries_before] + [0] * (n - 1)}


def embed_ray(cfg: Config, ds: Dataset, rows: list[int], work: Path) -> Embedded:
    """The embedding stage on Ray Data: the rows to embed are written as parquet, read by Ray, embedded by
    ``map_batches`` over an actor pool holding the embedder, written back as parquet and read here.
    Locally (``nightly.ray_address`` None) Ray starts in this process; on a cluster, media paths must be
    readable from every node (a shared filesystem or object store mount)."""
    import ray

    n = cfg.nightly.ray_actors
    src, dst = work / "ray-in", work / "ray-out"
    src.mkdir(parents=True, exist_ok=True)
    items = ds.catalog.items
    parts = [json.dumps(items["parts"][r].to_list()) for r in rows]
    pl.DataFrame({"row": rows, "item_id": [ds.catalog.ids[r] for r in rows], "parts": parts},
                 schema={"row": pl.Int64, "item_id": pl.Utf8, "parts": pl.Utf8}).write_parquet(src / "todo.parquet")
    if not ray.is_initialized():
        # locally: one logical CPU per actor plus two for reading and writing (else the actors take every CPU
        # and the read tasks wait for them forever)
        ray.init(address=cfg.nightly.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, **({} if cfg.nightly.ray_address else {"num_cpus": n + 2}))
    budget, remote_args = None, {}
    if cfg.embedder.backend == "gemini":
        # the actors read the API key from the driver's environment (a cluster's workers do not have it)
        keys = {k: os.environ[k] for k in ("GEMINI_API_KEY", "GOOGLE_API_KEY") if os.environ.get(k)}
        remote_args = {"runtime_env": {"env_vars": keys}} if keys else {}
        from recsys.embed.budget import RequestBudget

        budget = ray.remote(RequestBudget).options(num_cpus=0).remote(cfg.embedder.gemini_concurrency,
                                                                     cfg.embedder.gemini_items_per_minute)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    blocks = max(n, -(-len(rows) // cfg.nightly.batch_items))  # enough blocks to keep every actor busy
    (ray.data.read_parquet(str(src)).repartition(blocks)
     .map_batches(_RayEmbedActor, fn_constructor_args=(cfg.model_dump_json(), budget), batch_size=cfg.nightly.batch_items,
                  concurrency=n, num_cpus=1, batch_format="numpy", **remote_args)
     .write_parquet(str(dst)))
    frame = pl.read_parquet(dst / "*.parquet")
    out = Embedded({}, {}, cache_hits=int(frame["cache_hits"].sum()) if frame.height else 0,
                   retries=int(frame["retries"].sum()) if frame.height else 0)
    if budget is not None:
        out.budget = ray.get(budget.snapshot.remote())
        ray.kill(budget)
    for r, v, err in zip(frame["row"].to_list(), frame["vector"].to_list(), frame["error"].to_list()):
        if err:
            out.failed[int(r)] = err
        else:
            out.vectors[int(r)] = np.asarray(v, np.float32)
    return out
