"""The production loop on ml-latest-small's demo model (9,742 items): `recsys serve --workers 2` takes 10,000
interactions from 64 concurrent clients over 100 users (repeated event ids, out-of-order times, retries after a
connection cut mid-request); every accepted event must be in the event log exactly once and in its user's features
at once, and after the next nightly in the offline store and the rebuilt rows. Then: push-to-visible latency,
a nightly with 1 changed item against one with nothing changed, and /recommend's p99 with a nightly beside it.

Runs on a copy of the quick demo work directory (benchmarks.serving_bench.demo_workdir), so the event log starts
empty; ``--loop-store redis`` runs the same with the Redis online store and the event log on a Redis Stream
(a redis-server on a loopback port, started here)."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from benchmarks.serving_bench import _pct, _wait_ready, demo_workdir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cut_mid_request(port: int, body: bytes) -> None:
    """Send a POST and close the connection before reading the reply (a client that died mid-request)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /interactions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def _both_workers_ready(port: int, in_a_row: int = 20) -> None:
    """/readyz answered 200 ``in_a_row`` times running (each probe lands on either worker)."""
    import httpx

    ok = 0
    while ok < in_a_row:
        ok = ok + 1 if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200 else 0
        time.sleep(0.05)


def push_storm(port: int, users: list[str], items: list[str], n: int = 10_000, clients: int = 64, seed: int = 0) -> dict:
    """``n`` POST /interactions from ``clients`` threads: 10% resend an earlier event id (same body), 2% are cut
    mid-request and then retried with the same id, times spread over the last 30 days in random order."""
    import httpx

    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    bodies = []
    for k in range(n):
        if bodies and rng.random() < 0.10:
            bodies.append(dict(rng.choice(bodies)))  # a duplicate: the same event again
            continue
        bodies.append({"user_id": rng.choice(users), "item_id": rng.choice(items), "event_id": f"storm-{k}",
                       "timestamp": (now - timedelta(seconds=rng.uniform(0, 30 * 86400))).isoformat()})
    cut = set(rng.sample(range(n), n // 50))
    statuses: dict[int, int] = {}
    accepted: dict[str, dict] = {}
    lock = threading.Lock()
    local = threading.local()

    def send(k: int) -> None:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        b = bodies[k]
        if k in cut:
            _cut_mid_request(port, json.dumps(b).encode())
        for attempt in range(5):  # a client retries a transport error with the same event id
            try:
                r = c.post("/interactions", json=b)
                break
            except httpx.TransportError:
                time.sleep(0.05 * (attempt + 1))
        with lock:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code < 300:
                accepted[b["event_id"]] = b

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(n)))
    seconds = time.perf_counter() - t0
    return {"requests": n, "clients": clients, "seconds": round(seconds, 1), "req_per_s": round(n / seconds, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "cut_mid_request": len(cut),
            "duplicates_sent": n - len({b["event_id"] for b in bodies}), "accepted": accepted}


def push_to_visible(port: int, users: list[str], samples: int = 300) -> dict:
    """Time from the 2xx of POST /interactions (the user's current top item) to a /recommend that leaves it out."""
    import httpx

    times, tries = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for k in range(samples):
            u = users[k % len(users)]
            top = c.get(f"/recommend/{u}?k=1").json()["items"][0]["item_id"]
            assert c.post("/interactions", json={"user_id": u, "item_id": top}).status_code == 202
            t0 = time.perf_counter()
            for n in range(1, 100):
                if top not in {i["item_id"] for i in c.get(f"/recommend/{u}?k=10").json()["items"]}:
                    break
            times.append((time.perf_counter() - t0) * 1000)
            tries.append(n)
    return {"samples": samples, "ms": _pct(times), "recommends_needed_max": max(tries)}


def steady_load(port: int, users: list[str], seconds: float, clients: int = 4, until: threading.Event | None = None) -> dict:
    """/recommend from ``clients`` threads for ``seconds`` (or until ``until`` is set): latency percentiles, errors."""
    import httpx

    lat, errors, stop = [], [0], time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            k = i
            while (until.is_set() is False) if until is not None else time.monotonic() < stop:
                t0 = time.perf_counter()
                r = c.get(f"/recommend/{users[k % len(users)]}?k=10")
                lat.append((time.perf_counter() - t0) * 1000)
                errors[0] += r.status_code != 200
                k += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return {"requests": len(lat), "errors": errors[0], "ms": _pct(lat)}


def _edit_one_title(src: Path, dst: Path) -> str:
    """A copy of the MovieLens folder with one movie's title changed; returns its id."""
    shutil.copytree(src, dst)
    lines = (dst / "movies.csv").read_text().splitlines()
    movie_id = lines[1].split(",")[0]
    lines[1] = lines[1].replace(",", ",Edited: ", 1)
    (dst / "movies.csv").write_text("\n".join(lines) + "\n")
    return movie_id


def _nightly(workdir: Path, data: Path | None = None) -> tuple[dict, float]:
    """`recsys nightly` as a scheduler runs it (its own process); returns (its MLflow summary, seconds)."""
    cmd = [sys.executable, "-m", "recsys.cli", "nightly", "--workdir", str(workdir)] + (["--data", str(data)] if data else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"nightly exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    import mlflow

    from recsys.config import Config

    cfg = Config.model_validate_json((workdir / "config.json").read_text())
    mlflow.set_tracking_uri(cfg.tracking_uri)
    run = mlflow.search_runs(experiment_names=["nightly"], order_by=["start_time DESC"], max_results=1)
    path = mlflow.artifacts.download_artifacts(run_id=run.iloc[0]["run_id"], artifact_path="summary.json")
    return json.loads(Path(path).read_text()), round(seconds, 1)


def run(args) -> dict:
    from features.local_redis import redis_server
    from recsys.config import Config

    store = getattr(args, "loop_store", "sqlite")
    root = Path(args.workdir)
    src = demo_workdir(root)
    wd = root / f"loop-{store}"
    if wd.exists():
        shutil.rmtree(wd)
    shutil.copytree(src, wd, ignore=shutil.ignore_patterns("events"))
    saved = json.loads((wd / "config.json").read_text())
    saved["workdir"] = str(wd)
    saved.setdefault("features", {})
    saved["mlflow_tracking_uri"] = None
    out: dict = {"store": store}
    with redis_server() if store == "redis" else _nothing() as url:
        if store == "redis":
            if url is None:
                raise SystemExit("--loop-store redis needs redis-server (apt-get install redis-server)")
            saved["features"].update(online_store="redis", redis_connection=url)
            saved["events"] = {"backend": "redis", "redis_connection": url, "redis_prefix": f"loop:{time.time_ns()}"}
        (wd / "config.json").write_text(json.dumps(saved))
        cfg = Config.model_validate(saved)
        if store == "redis":  # the serving store materialized into Redis
            subprocess.run([sys.executable, "-m", "recsys.cli", "features", "--workdir", str(wd)], check=True,
                           capture_output=True)
        from recsys.data import load_dataset

        ds = load_dataset(cfg)
        users = sorted(ds.interactions.frame["user_id"].unique().to_list())[:100]
        items = ds.catalog.ids
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(wd), "--port", str(port),
                                   "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(f"http://127.0.0.1:{port}")
            _both_workers_ready(port)
            storm = push_storm(port, users, items)
            accepted = storm.pop("accepted")
            out["storm"] = storm
            out["events"] = _check_events(cfg, accepted, users)
            out["push_to_visible"] = push_to_visible(port, users)
            steady_s = 30.0
            out["recommend_alone"] = steady_load(port, users, steady_s)
            # the nightly beside a steady load: 1 changed item, the events folded in
            data = root / f"loop-{store}-data"
            if data.exists():
                shutil.rmtree(data)
            from recsys.config import BUNDLED_MOVIELENS

            edited = _edit_one_title(Path(cfg.data.path or BUNDLED_MOVIELENS), data)
            beside: dict = {}
            done = threading.Event()
            t = threading.Thread(target=lambda: beside.update(steady_load(port, users, 0, until=done)))
            t.start()
            try:
                summary, seconds = _nightly(wd, data)
            finally:
                done.set()
                t.join()
            out["recommend_beside_nightly"] = beside
            out["nightly_events"] = {"seconds": seconds, "counts": summary["counts"], "users_refreshed": summary["users_refreshed"],
                                     "materialized": summary["materialized"], "timings_s": summary["timings_s"]}
            out["after_nightly"] = _check_after_nightly(cfg, accepted, users)
            # proportional: nothing changed vs 1 changed item (a second title edit), both after the events are in
            unchanged, s0 = _nightly(wd, data)
            lines = (data / "movies.csv").read_text().splitlines()
            lines[2] = lines[2].replace(",", ",Edited: ", 1)
            (data / "movies.csv").write_text("\n".join(lines) + "\n")
            one, s1 = _nightly(wd, data)
            out["proportional"] = {
                "nothing_changed": {"seconds": s0, "message": unchanged["message"], "timings_s": unchanged["timings_s"]},
                "one_item_changed": {"seconds": s1, "counts": one["counts"], "users_refreshed": one["users_refreshed"],
                                     "materialized": one["materialized"], "timings_s": one["timings_s"]},
                "users_of_the_item": int((ds.interactions.frame["item_id"] == lines[2].split(",")[0]).sum()),
                "edited_items": [edited, lines[2].split(",")[0]]}
        finally:
            server.terminate()
            server.wait(30)
    out["side_by_side_p99_ratio"] = round(out["recommend_beside_nightly"]["ms"]["p99"] / out["recommend_alone"]["ms"]["p99"], 2)
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _check_events(cfg, accepted: dict[str, dict], users: list[str]) -> dict:
    """Every accepted event in the log exactly once, and in its user's features (what serving reads) at once."""
    from features.store import FeatureRepo
    from recsys.events import open_event_log
    from recsys.manifest import read_published
    from serving.service import ModelBundle

    log = open_event_log(cfg)
    frame = log.read()
    ids = frame["event_id"].to_list()
    bundle = ModelBundle.from_mlflow(cfg)
    row = {i: r for r, i in enumerate(bundle.item_ids)}
    e = bundle.config
    repo = FeatureRepo(cfg, e["embedder"], e["embedder_version"], int(e["dim"]), name=cfg.serve.feature_repo)
    now = repo.online_users_now(users, log, lambda i: bundle.content[row[i]] if i in row else None)
    want: dict[str, set] = {}
    for b in accepted.values():
        want.setdefault(b["user_id"], set()).add(b["item_id"])
    missing = sum(len(want.get(u, set()) - set(now.seen_item_ids[r])) for r, u in enumerate(users))
    published = read_published(cfg.workdir)
    return {"accepted_ids": len(accepted), "in_log": len(ids), "in_log_distinct": len(set(ids)),
            "accepted_missing_from_log": len(set(accepted) - set(ids)), "not_accepted_but_logged": len(set(ids) - set(accepted)),
            "missing_from_seen_sets": missing, "published_before": published.run_id if published else None}


def _check_after_nightly(cfg, accepted: dict[str, dict], users: list[str]) -> dict:
    """After the nightly: the offline store's seen sets and the rebuilt online rows hold every accepted event."""
    import polars as pl

    from features.store import FeatureRepo
    from recsys.events import open_event_log
    from recsys.manifest import read_published

    m = read_published(cfg.workdir)
    v = pl.read_parquet(cfg.workdir / m.vectors["path"])
    row = {i: r for r, i in enumerate(v["item_id"].to_list())}
    arr = v["vector"].to_numpy()
    repo = FeatureRepo(cfg, m.embedder["backend"], m.embedder["model_version"], m.embedder["dim"], name="serve")
    offline = pl.read_parquet(repo._path(repo.views.user_seen))
    seen_off = dict(zip(offline["user_id"].to_list(), offline["seen_item_ids"].to_list()))
    log = open_event_log(cfg)
    now = repo.online_users_now(users, log, lambda i: arr[row[i]] if i in row else None)
    want: dict[str, set] = {}
    for b in accepted.values():
        want.setdefault(b["user_id"], set()).add(b["item_id"])
    return {"events_until": m.events_until, "log_max_seq": log.max_seq(),
            "missing_from_offline_seen": sum(len(want.get(u, set()) - set(seen_off.get(u, []))) for u in users),
            "missing_from_online_rows": sum(len(want.get(u, set()) - set(now.seen_item_ids[r])) for r, u in enumerate(users)),
            "rows_still_folding_events": int(np.count_nonzero(now.events_folded))}
