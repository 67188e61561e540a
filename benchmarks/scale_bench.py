"""How each stage's time and memory grow with the data: synthetic catalogs of 100k items with 100k, 1M and 10M
interactions (recsys.data.scale), every stage of the train-and-evaluate flow on the project's own code.

Each size runs in a fresh process (``python -m benchmarks.scale_bench --interactions N``), so a size's peak
memory is its own; inside it a sampler thread reads the resident set every 20 ms and each stage reports its
time and the peak resident set while it ran (the process's imports and earlier stages' data included: what
the machine must hold at that point).

Stages: generate (setup, not a goal), load (the generic loader on the written parquet files, with its checks),
split (LOO; validation and test on a fixed sample of users), Feast offline writes (item vectors, user and item
snapshots), the point-in-time training set, one two-tower epoch, evaluation (full ranking of the catalog for
the sample), Feast online writes (materialize), the index build (item tower over the catalog + FAISS), and a
nightly with 1% of the items changed and 1% new interactions (the nightly's own feature calls: incremental
writes, the touched users rebuilt, only their rows materialized).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

SIZES = (100_000, 1_000_000, 10_000_000)
EVAL_USERS = 2_000


class Meter:
    """Per-stage wall time and peak resident memory (recsys.memory.PeakMemory), printed as each stage ends."""

    def __init__(self):
        from recsys.memory import PeakMemory

        self.stages: dict[str, dict] = {}
        self.memory = PeakMemory(every=0.02)

    @contextmanager
    def stage(self, name: str, **extra):
        start = self.memory.reset()
        t0 = time.perf_counter()
        print(f"[scale] {name} ...", file=sys.stderr, flush=True)
        yield extra
        seconds, peak = time.perf_counter() - t0, self.memory.peak()
        self.stages[name] = {"seconds": round(seconds, 2), "peak_rss_mb": round(peak), "start_rss_mb": round(start),
                             **extra}
        print(f"[scale] {name}: {seconds:.1f} s, peak {peak:,.0f} MB", file=sys.stderr, flush=True)


def sample(es, n: int, seed: int = 0):
    """The eval set limited to ``n`` of its users (seeded); the history stays whole (it is what they know)."""
    import numpy as np

    from recsys.eval.splits import EvalSet

    if len(es) <= n:
        return es
    keep = np.sort(np.random.default_rng(seed).choice(len(es), n, replace=False))
    return EvalSet([es.users[i] for i in keep], [es.targets[i] for i in keep], [es.at[i] for i in keep], es.history,
                   es.candidates)


def run_size(n_interactions: int, workdir: Path, n_items: int = 100_000, eval_users: int = EVAL_USERS,
             epoch_batches: int = 0) -> dict:
    import numpy as np
    import polars as pl

    from benchmarks.machine import describe
    from features.store import FeatureRepo
    from recsys.config import Config
    from recsys.data.generic import load_folder
    from recsys.data.scale import ScaleSpec, generate
    from recsys.eval import make_split
    from recsys.index import build_index
    from recsys.quiet import silence
    from training.train import fit_two_tower, training_rows

    silence()
    meter = Meter()
    workdir.mkdir(parents=True, exist_ok=True)
    # the whole epoch at every size; ``epoch_batches`` caps it for a quick look (its full length is then
    # extrapolated from the rate, and marked so in the table)
    capped = epoch_batches > 0
    cfg = Config.load(None, workdir=str(workdir), train={"max_epochs": 1, "select_epochs": 0, "epoch_batches": epoch_batches})
    spec = ScaleSpec(n_interactions=n_interactions, n_items=n_items)
    with meter.stage("generate"):
        ds, vectors = generate(spec)
        folder = workdir / "data"
        folder.mkdir(exist_ok=True)
        ds.interactions.frame.write_parquet(folder / "interactions.parquet")
        ds.catalog.items.drop("parts").with_columns(pl.col("title").alias("text")).write_parquet(folder / "items.parquet")
        del ds
    with meter.stage("load") as x:
        ds = load_folder(folder, name="scale", check_media=False)
        x.update(items=len(ds.catalog), interactions=len(ds.interactions), users=ds.interactions.n_users)
    ids = ds.catalog.ids
    order = np.array([int(i[1:]) for i in ids])  # the loader's catalog order -> the generator's rows
    vectors = vectors[order]
    with meter.stage("split") as x:
        split = make_split("loo", ds, cfg.eval)
        split.val, split.test = sample(split.val, eval_users), sample(split.test, eval_users, seed=1)
        x.update(training_interactions=split.train.height, eval_users=len(split.test))
    with meter.stage("feast offline writes") as x:
        repo = FeatureRepo(cfg, "synthetic", f"scale-{spec.dim}", spec.dim, name="train")
        repo.write_item_embeddings(ids, vectors)
        x.update(repo.write_interaction_features(split.train, ds.catalog, vectors))
        repo.apply()
    with meter.stage("point-in-time training set") as x:
        rows = training_rows(repo, split, ds.catalog, spec.dim, cfg.features.recent_items, cfg.train.int8_history_above)
        x.update(rows=len(rows[0]), history=str(rows[0].history.values.dtype))
    cache = {(split.name, repo.views.item_embedding.name): rows}
    del rows
    with meter.stage("two-tower epoch") as x:
        trained = fit_two_tower(cfg, ds.catalog, split, repo, vectors, rows_cache=cache)
        rate = trained.train_examples_per_s
        x.update(examples=trained.examples, rows=len(trained.datamodule.rows), examples_per_s=round(rate),
                 validation_s=round(trained.val_seconds, 1), capped=capped,
                 full_epoch_s=round(len(trained.datamodule.rows) / rate, 1))
        held = weakref.ref(trained.datamodule.rows)
    cache.clear()
    trained.drop_training_data()  # as the flow does once no fit resumes (recsys.flows.protocol.VariantSearch)
    meter.stages["two-tower epoch"]["rows_freed_after"] = held() is None
    with meter.stage("evaluation") as x:
        res = trained.evaluate(split, ds.catalog, cfg, n_boot=200)
        x.update(users=res.per_user.height,
                 **{m: round(e.mean, 4) for m, e in res.estimates.items() if m in ("HR@10", "NDCG@10", "Recall@50")})
    with meter.stage("feast online writes") as x:
        report = repo.materialize()
        x.update(rows=sum(report.rows.values()))
    with meter.stage("index build") as x:
        val = trained.inputs(split.val, ds.catalog, cfg)
        item_vecs = trained.module.encode_items(val.items)
        queries = trained.module.encode_users(val.users, trained.item_content)
        index = build_index(item_vecs, queries)
        x.update(kind=index.info.kind, recall_at_100=index.info.recall_at_100)
    with meter.stage("nightly (1% changed)") as x:
        rng = np.random.default_rng(7)
        changed = rng.choice(len(ids), len(ids) // 100, replace=False)
        new_vectors = vectors.copy()
        new_vectors[changed] = vectors[rng.permutation(changed)]
        train = split.train
        new = train.sample(max(1, train.height // 100), seed=7).with_columns(
            pl.col("timestamp") + pl.duration(days=400))
        inter = pl.concat([train, new])
        touched = set(new["user_id"].to_list()) | set(
            train.filter(pl.col("item_id").is_in([ids[i] for i in changed]))["user_id"].unique().to_list())
        written = repo.write_item_embeddings(ids, new_vectors)
        counts = repo.write_interaction_features(inter, ds.catalog, new_vectors, users=touched)
        repo.apply()
        views = (repo.views.user_history.name, repo.views.user_stats.name, repo.views.user_seen.name)
        report = repo.materialize(full=views, only=touched)
        x.update(items_changed=int(written), users_refreshed=counts["users_refreshed"],
                 materialized=sum(report.rows.values()))
    import resource

    return {"interactions": n_interactions, "items": spec.n_items, "users": spec.n_users, "dim": spec.dim,
            "stages": meter.stages, "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "machine": describe()}


def run(workdir: Path, sizes=SIZES, timeout_s: float | None = None) -> dict:
    """Every size in its own process; a size that fails or runs out of time is recorded as such."""
    out = {"sizes": [], "eval_users": EVAL_USERS}
    for n in sizes:
        path = workdir / f"scale-{n}.json"
        path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.scale_bench", "--interactions", str(n), "--workdir",
               str(workdir / f"n{n}"), "--out", str(path)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True)
            err = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            err = f"timed out after {timeout_s} s"
        res = json.loads(path.read_text()) if path.exists() else {"interactions": n}
        res["wall_s"] = round(time.time() - t0, 1)
        if err:
            res["error"] = err
        out["sizes"].append(res)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="One size of the scale benchmark (benchmarks.run scale runs them all).")
    p.add_argument("--interactions", type=int, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epoch-batches", type=int, default=0, help="time the epoch on its first N batches only (0: all)")
    a = p.parse_args()
    res = run_size(a.interactions, a.workdir, epoch_batches=a.epoch_batches)
    a.out.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
