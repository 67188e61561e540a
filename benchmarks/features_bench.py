"""Feature-store benchmarks: materialization speed and peak memory, online read latency, PIT build time.

Each materialization runs in its own process, after another process wrote its offline data, so its peak
memory (VmHWM) is the materialization's own. The paths: ``materialize`` (Feast's plain
``FeatureStore.materialize`` on Feast's stock online store type), ``write_to_online_store`` (Feast's
ingestion API, fed in chunks), ``ours-protos`` (FeatureRepo.materialize's streaming, handing protos to
Feast's ``online_write_batch``) and ``ours`` (the same streaming into the bulk ``write_encoded`` of
features/online.py: what FeatureRepo.materialize does by default).

    python -m benchmarks.features_bench prepare --path ours --store sqlite --dim 384 --rows 100000 --workdir /tmp/fb
    python -m benchmarks.features_bench child --path ours --store sqlite --dim 384 --rows 100000 --workdir /tmp/fb
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from features.local_redis import redis_server


def _peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _repo(workdir: Path, store: str, redis: str | None, dim: int, bulk: bool = True, project: str | None = None):
    from features.store import FeatureRepo
    from recsys.config import Config

    feats = {"online_store": store, "project": project or f"bench{os.getpid()}", "bulk_writes": bulk}
    if redis:
        feats["redis_connection"] = redis
    cfg = Config.model_validate({"workdir": str(workdir), "features": feats})
    return FeatureRepo(cfg, "bench", "v1", dim, name="bench")


T_WRITTEN = datetime(2024, 1, 1, tzinfo=timezone.utc)


def prepare(args) -> dict:
    """Write N random unit vectors to the offline store (its own process, so it does not count in the
    materializing process's peak memory)."""
    import polars as pl

    from features.parquet import write_parquet

    repo = _repo(Path(args.workdir), args.store, args.redis, args.dim, args.path != "materialize", args.project)
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    frame = pl.DataFrame({"item_id": [f"i{i}" for i in range(args.rows)],
                          "event_timestamp": pl.Series([T_WRITTEN] * args.rows).cast(pl.Datetime("us", "UTC")),
                          "embedding": pl.Series(vecs, dtype=pl.Array(pl.Float32, args.dim)).cast(pl.List(pl.Float32))})
    write_parquet(frame, repo._path(repo.views.item_embedding))
    repo.store.apply([repo.views.item, repo.views.item_embedding])
    return {"prepared": args.rows}


def child(args) -> dict:
    """Time one materialization path over the prepared offline store; peak memory is this process's VmHWM."""
    import polars as pl

    from features.online import read_rows, stream_rows

    repo = _repo(Path(args.workdir), args.store, args.redis, args.dim, args.path != "materialize", args.project)
    view = repo.views.item_embedding.name
    end = T_WRITTEN + timedelta(days=1)
    fv = repo.store.get_feature_view(view)
    base_mb = _peak_mb()
    t0 = time.perf_counter()
    if args.path == "materialize":  # Feast's plain materialize, Feast's stock online store type
        repo.store.materialize(start_date=T_WRITTEN - timedelta(days=1), end_date=end, feature_views=[view])
    elif args.path == "write_to_online_store":
        table = pl.read_parquet(repo._path(repo.views.item_embedding))
        for start in range(0, table.height, 5000):
            part = table.slice(start, 5000).to_pandas()
            part["embedding"] = part["embedding"].map(list)
            repo.store.write_to_online_store(view, part)
    else:  # what FeatureRepo.materialize does per view; "ours-protos": Feast's online_write_batch instead of the bulk write
        stream_rows(repo.store, fv, repo._path(repo.views.item_embedding), T_WRITTEN - timedelta(days=1), end,
                    repo.cfg.features.write_chunk_rows, bulk=args.path == "ours")
    seconds = time.perf_counter() - t0
    peak = _peak_mb()
    last = pl.read_parquet(repo._path(repo.views.item_embedding)).tail(1)
    check = read_rows(repo.store, view, "item_id", ["i0", last["item_id"][0]], ["embedding"])["embedding"]
    assert check[0] is not None and np.allclose(check[1], last["embedding"][0].to_numpy(), atol=1e-6), "materialized values differ"
    return {"path": args.path, "store": args.store, "dim": args.dim, "rows": args.rows, "seconds": seconds,
            "rows_per_s": args.rows / seconds, "peak_mb": peak, "peak_before_mb": base_mb,
            "online_store_type": repo.store.config.online_store.type}


def materialization(rows: int = 100_000, dims=(384, 768), paths=("materialize", "write_to_online_store", "ours-protos", "ours")) -> list[dict]:
    out = []
    with redis_server() as redis:
        for store in ("sqlite", "redis"):
            if store == "redis" and redis is None:
                continue
            for dim in dims:
                for path in paths:
                    workdir = tempfile.mkdtemp(prefix="featbench")
                    common = ["--path", path, "--store", store, "--dim", str(dim), "--rows", str(rows), "--workdir", workdir,
                              "--project", f"bench{len(out)}"] + (["--redis", redis] if store == "redis" else [])
                    res = subprocess.run([sys.executable, "-m", "benchmarks.features_bench", "prepare", *common],
                                         capture_output=True, text=True)
                    if res.returncode == 0:
                        res = subprocess.run([sys.executable, "-m", "benchmarks.features_bench", "child", *common],
                                             capture_output=True, text=True)
                    shutil.rmtree(workdir, ignore_errors=True)
                    if res.returncode != 0:
                        out.append({"path": path, "store": store, "dim": dim, "error": res.stderr[-800:]})
                    else:
                        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
                    print(out[-1], flush=True)
    return out


def _movielens_repo(workdir: Path, store: str, redis: str | None, dim: int = 256, features: bool = True):
    """ml-latest-small with random unit item vectors, written to a fresh repository (and applied)."""
    from recsys.data import load_movielens

    ds = load_movielens()
    V = np.random.default_rng(0).standard_normal((len(ds.catalog), dim)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    repo = _repo(workdir, store, redis, dim)
    repo.write_item_embeddings(ds.catalog.ids, V)
    if features:
        repo.write_interaction_features(ds.interactions.frame, ds.catalog, V)
        repo.apply()
    return ds, V, repo


def online_latency(calls: int = 1000, candidates: int = 200) -> list[dict]:
    """p50/p99 of one request's reads on each store: the user's features, and 200 candidates' item features.
    Feast's generic ``get_online_features`` for the same rows is measured beside it as the baseline."""
    rng = np.random.default_rng(0)
    out = []
    with redis_server() as redis:
        for store in ("sqlite", "redis"):
            if store == "redis" and redis is None:
                continue
            workdir = Path(tempfile.mkdtemp(prefix="latbench"))
            ds, V, repo = _movielens_repo(workdir, store, redis if store == "redis" else None)
            users = ds.interactions.frame["user_id"].unique().to_list()
            repo.materialize()
            refs_user = [f"{repo.views.user_history.name}:{f}" for f in ("history_vector", "recent_item_ids", "history_count")] + \
                        [f"{repo.views.user_stats.name}:{f}" for f in ("n_interactions", "mean_value", "user_first_seen")]
            refs_item = [f"{repo.views.item_embedding.name}:embedding"] + \
                        [f"item_stats:{f}" for f in ("pop_all", "pop_30d", "item_first_seen", "has_image")]

            def timeit(fn) -> dict:
                fn(0)  # warm
                ts = []
                for i in range(calls):
                    t0 = time.perf_counter()
                    fn(i)
                    ts.append((time.perf_counter() - t0) * 1000)
                a = np.array(ts)
                return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}

            cand = [[ds.catalog.ids[j] for j in rng.choice(len(ds.catalog), candidates, replace=False)] for _ in range(16)]
            res = {
                "user (ours: FeatureRepo.online_users)": timeit(lambda i: repo.online_users([users[i % len(users)]])),
                "user (feast get_online_features)": timeit(lambda i: repo.store.get_online_features(
                    features=refs_user, entity_rows=[{"user_id": users[i % len(users)]}]).to_dict()),
                f"{candidates} items (ours: FeatureRepo.online_items)": timeit(lambda i: repo.online_items(cand[i % 16])),
                f"{candidates} items (feast get_online_features)": timeit(lambda i: repo.store.get_online_features(
                    features=refs_item, entity_rows=[{"item_id": x} for x in cand[i % 16]]).to_dict()),
            }
            for name, r in res.items():
                out.append({"store": store, "read": name, "calls": calls, **r})
                print(out[-1], flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def pit_build() -> dict:
    """Point-in-time training set for all of ml-latest-small (100,836 labels), ASOF store vs Feast's stock
    DuckDB store (the stock one on a 5,000-label sample, extrapolated linearly, as it grows faster than linear)."""
    import yaml

    from features.store import FeatureRepo

    workdir = Path(tempfile.mkdtemp(prefix="pitbench"))
    ds, V, repo = _movielens_repo(workdir, "sqlite", None, features=False)
    t0 = time.perf_counter()
    repo.write_interaction_features(ds.interactions.frame, ds.catalog, V)
    snapshots_s = time.perf_counter() - t0
    repo.apply()
    labels = ds.interactions.frame.select("user_id", "item_id", "timestamp")
    t0 = time.perf_counter()
    ts = repo.training_set(labels)
    asof_s = time.perf_counter() - t0
    sample = labels.sample(5000, seed=0)
    t0 = time.perf_counter()
    repo.training_set(sample)
    asof_sample_s = time.perf_counter() - t0
    conf = yaml.safe_load((repo.dir / "feature_store.yaml").read_text())
    conf["offline_store"] = {"type": "duckdb"}
    (repo.dir / "feature_store.yaml").write_text(yaml.safe_dump(conf))
    stock = FeatureRepo.__new__(FeatureRepo)
    stock.__dict__.update({k: v for k, v in repo.__dict__.items() if k != "store"})
    t0 = time.perf_counter()
    stock.training_set(sample)
    stock_sample_s = time.perf_counter() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    return {"labels": labels.height, "rows_out": ts.height, "snapshot_build_s": snapshots_s,
            "asof_full_s": asof_s, "asof_5000_s": asof_sample_s, "stock_duckdb_5000_s": stock_sample_s,
            "ratio_on_5000": stock_sample_s / asof_sample_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("prepare", "write the offline data for one materialization (prints JSON)"),
                       ("child", "time one materialization in this process (prints JSON)")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--path", choices=["materialize", "write_to_online_store", "ours-protos", "ours"], required=True)
        c.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
        c.add_argument("--redis", default=None)
        c.add_argument("--dim", type=int, default=384)
        c.add_argument("--rows", type=int, default=100_000)
        c.add_argument("--workdir", required=True)
        c.add_argument("--project", default="bench")
    sub.add_parser("all", help="every feature benchmark (prints JSON)")
    args = p.parse_args()
    if args.cmd in ("prepare", "child"):
        print(json.dumps((prepare if args.cmd == "prepare" else child)(args)))
    else:
        print(json.dumps({"materialization": materialization(), "online": online_latency(), "pit": pit_build()}, indent=2))


if __name__ == "__main__":
    main()
