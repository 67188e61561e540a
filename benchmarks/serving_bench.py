"""Online retrieval at scale: per-stage latency inside the service at 10k / 100k / 1M items, exact vs tuned
approximate index (recall@100, build time, memory), the FAISS stage against a bare FAISS search of the same
index, a load test from a separate process against a real uvicorn server, and a reload under load.

The user tower and the Feast read are real (a model trained by a quick demo run on ml-latest-small). For
the larger catalogs the 9,742 real items are kept and synthetic items are added around them (each a real
item-tower vector plus noise, so the catalog stays clustered the way the model's vectors are).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (10_000, 100_000, 1_000_000)


def demo_workdir(root: Path) -> Path:
    """A trained, registered model and a materialized store (a quick demo run, reused if present)."""
    from recsys.config import Config
    from recsys.flows.demo import run_demo

    wd = root / "serving-demo"
    if not (wd / "report" / "demo.json").exists():
        cfg = Config.load(None, workdir=str(wd), eval={"protocols": ["loo"], "bootstrap": 100},
                          train={"max_epochs": 3})
        run_demo(cfg, sample_users=1)
    return wd


def synthetic_snapshot(cfg, n: int, seed: int = 0):
    """The real model's snapshot grown to ``n`` items (real items first, then noisy copies)."""
    from recsys.index import build_index
    from serving.service import ModelBundle, Snapshot

    bundle = ModelBundle.from_mlflow(cfg)
    real = len(bundle.item_ids)
    rng = np.random.default_rng(seed)
    extra = max(0, n - real)
    base = rng.integers(0, real, extra)
    unit = bundle.item_vectors[base, :-1] + 0.35 * rng.normal(size=(extra, bundle.item_vectors.shape[1] - 1)).astype(np.float32) \
        / np.sqrt(bundle.item_vectors.shape[1])
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    vecs = np.vstack([bundle.item_vectors[: min(n, real)],
                      np.hstack([unit, bundle.item_vectors[base, -1:]]).astype(np.float32)])
    content = np.vstack([bundle.content[: min(n, real)], bundle.content[base]]).astype(np.float32)
    bundle.item_ids = bundle.item_ids[: min(n, real)] + [f"x{i}" for i in range(extra)]
    bundle.titles = bundle.titles[: min(n, real)] + [f"synthetic {i}" for i in range(extra)]
    bundle.item_vectors, bundle.content = vecs, content
    bundle.known = np.concatenate([bundle.known[: min(n, real)], np.zeros(extra, bool)])
    t0 = time.perf_counter()
    index = build_index(vecs, bundle.queries, kind="auto")
    build_s = time.perf_counter() - t0
    repo_snap = Snapshot.build(cfg, ModelBundle.from_mlflow(cfg))  # the real store and statistics
    stats = np.vstack([repo_snap.item_stats[: min(n, real)], repo_snap.item_stats[base]])
    mods = np.vstack([repo_snap.modalities[: min(n, real)], repo_snap.modalities[base]])
    snap = Snapshot.assemble(bundle, repo_snap.repo, index, index, stats, mods, time.time())
    return snap, build_s


def _pct(x: list[float]) -> dict:
    a = np.asarray(x)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def index_memory_mb(index) -> float:
    import faiss

    return round(faiss.serialize_index(index.index).nbytes / 2**20, 1)


def latency(cfg, n: int, requests: int = 2000) -> dict:
    """Per-stage p50/p99 of single in-process requests; the FAISS stage vs a bare FAISS search."""
    import faiss

    from recsys.index import CandidateIndex
    from serving.service import Recommender

    faiss.omp_set_num_threads(1)
    import torch

    torch.set_num_threads(1)
    snap, build_s = synthetic_snapshot(cfg, n)
    rec = Recommender(cfg, snap)
    users = [str(u) for u in range(1, 611)]
    rng = np.random.default_rng(1)
    asked = rng.choice(users, requests)
    stages: dict[str, list[float]] = {}
    for u in asked[:50]:
        rec.recommend(u, k=10, rerank=False)  # warm-up
    for u in asked:
        r = rec.recommend(u, k=10, rerank=False)
        for k, v in r.timings_ms.items():
            stages.setdefault(k, []).append(v)
    # the bare FAISS search of the same index, same parameters, same queries and exclusions
    seen = [{snap.index_of[i] for i in snap.repo.online_users([u]).seen_item_ids[0] if i in snap.index_of} for u in asked[:300]]
    q = snap.bundle.queries[rng.integers(0, len(snap.bundle.queries), 300)]
    bare, ours = [], []
    for qi, s in zip(q, seen):
        pos = snap.index._positions(s)  # raw FAISS needs the exclusions as index positions; building its selector is timed
        t0 = time.perf_counter()
        snap.index.index.search(qi[None], 10, params=snap.index._search_params(pos))
        bare.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        snap.index.search(qi[None], 10, exclude=[s])
        ours.append((time.perf_counter() - t0) * 1000)
    exact = CandidateIndex(snap.bundle.item_vectors, "flat") if snap.index.kind != "flat" else snap.index
    exact_ms = []
    for qi in q[:200]:
        t0 = time.perf_counter()
        exact.index.search(qi[None], 100)
        exact_ms.append((time.perf_counter() - t0) * 1000)
    out = {"items": n, "index": snap.index.info.to_dict(), "build_s": round(build_s, 1),
           "index_mb": index_memory_mb(snap.index), "stages_ms": {k: _pct(v) for k, v in stages.items()},
           "faiss_stage_ms": _pct(ours), "bare_faiss_ms": _pct(bare),
           "faiss_vs_bare_p50": round(float(np.median(ours) / max(np.median(bare), 1e-9)), 2),
           "exact_search_ms": _pct(exact_ms), "requests": requests}
    print(json.dumps(out))
    return out


# Load: a real uvicorn server in one process, wrk (C, from Debian: apt-get install wrk) in another ----------------
WRK_SCRIPT = """
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", "/recommend/" .. math.random(1, 610) .. "?k=10", {["X-API-Key"] = "%(key)s"})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%d %%d %%.3f %%.3f %%.3f %%.3f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000))
end
"""


def snapshot_app():
    """(uvicorn factory, in each worker) the real app over the RECSYS_BENCH_ITEMS-item snapshot."""
    from recsys.config import Config
    from serving.app import create_app
    from serving.service import Recommender

    workdir, n = os.environ["RECSYS_BENCH_WORKDIR"], int(os.environ["RECSYS_BENCH_ITEMS"])
    cfg = Config.model_validate_json((Path(workdir) / "config.json").read_text())
    if os.environ.get("RECSYS_BENCH_SERVE"):  # serve settings to try, as JSON (e.g. {"max_in_flight": 32})
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=json.loads(os.environ["RECSYS_BENCH_SERVE"]))})
    snap, _ = synthetic_snapshot(cfg, n)
    return create_app(cfg, Recommender(cfg, snap))


def wrk(base: str, connections: int, seconds: float, key: str = "bench", seed: int = 0) -> dict:
    """wrk (closed loop: ``connections`` requests in flight) -> throughput, errors, latency percentiles (ms)."""
    import shutil
    import tempfile

    if not shutil.which("wrk"):
        raise SystemExit("the load benchmark needs wrk: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % {"seed": seed, "key": key})
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "5s", "-s", f.name, base],
                         capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, dur_us, socket_errors, status_errors, p50, p99, mx = line.split()[1:8]
    r = {"connections": connections, "seconds": seconds, "requests": int(n),
         "rps": round(int(n) / (int(dur_us) / 1e6), 1), "errors": int(socket_errors) + int(status_errors),
         "p50": float(p50), "p99": float(p99), "max": float(mx)}
    print(json.dumps(r), flush=True)
    return r


def _rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return round(total, 1)


def _tree(pid: int) -> list[int]:
    """The process and its children (uvicorn's workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *[int(p) for p in out]]


def _wait_ready(base: str, timeout: float = 900) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(base)


def load(workdir: Path, n: int = 100_000, port: int = 8765, workers: int = 1, steps=(1, 2, 4, 8, 16),
         step_s: float = 20, hold_s: float = 180) -> dict:
    """Step the in-flight requests up, take the highest throughput with p99 < 50 ms and no error, hold it."""
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RECSYS_BENCH_WORKDIR": str(workdir), "RECSYS_BENCH_ITEMS": str(n), "RECSYS_API_KEYS": "bench"}
    if workers > 1:
        env["PROMETHEUS_MULTIPROC_DIR"], env["RECSYS_METRICS_MULTIPROC"] = tempfile_dir(), "1"
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.serving_bench:snapshot_app", "--factory",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "error"],
                              env=env)
    try:
        _wait_ready(base)
        time.sleep(2 * workers)  # every worker loaded (readyz answers from whichever worker got the probe)
        rss_before = _rss_mb(_tree(server.pid))
        results = [wrk(base, c, step_s) for c in steps]
        ok = [r for r in results if r["errors"] == 0 and r["p99"] < 50]
        best = max(ok, key=lambda r: r["rps"]) if ok else results[0]
        hold = wrk(base, best["connections"], hold_s, seed=1)
        rss_after = _rss_mb(_tree(server.pid))
    finally:
        server.terminate()
        server.wait(30)
    return {"items": n, "workers": workers, "steps": results, "held_connections": best["connections"], "hold": hold,
            "hold_s": hold_s, "rss_mb_before": rss_before, "rss_mb_after": rss_after}


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="recsys-metrics-")


def reload_under_load(workdir: Path, port: int = 8766, connections: int = 4, seconds: float = 40) -> dict:
    """`recsys serve` on the demo model (9,742 items); /admin/reload a third of the way into a steady wrk load."""
    import threading

    import httpx

    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RECSYS_API_KEYS": "bench", "RECSYS_ADMIN_KEYS": "bench-admin"}
    server = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(workdir), "--port", str(port)],
                              env=env)
    try:
        _wait_ready(base)
        result: dict = {}

        def trigger():
            time.sleep(seconds / 3)
            t0 = time.time()
            admin = {"X-API-Key": "bench-admin"}
            httpx.post(f"{base}/admin/reload", headers=admin, json={}, timeout=10)
            while httpx.get(f"{base}/admin/status", headers=admin, timeout=10).json()["reloads"] < 1:
                time.sleep(0.1)
            result["swap_s"] = round(time.time() - t0, 2)

        t = threading.Thread(target=trigger)
        t.start()
        run = wrk(base, connections, seconds)
        t.join()
    finally:
        server.terminate()
        server.wait(30)
    return {"items": 9742, **run, **result}


def run(args) -> dict:
    from recsys.config import Config

    wd = demo_workdir(Path(args.workdir))
    cfg = Config.model_validate_json((wd / "config.json").read_text())
    sizes = [int(s) for s in (args.sizes.split(",") if getattr(args, "sizes", None) else SIZES)]
    parts = (getattr(args, "parts", None) or "latency,load,reload").split(",")
    previous = Path(__file__).resolve().parent / "results" / "serving.json"
    out = json.loads(previous.read_text())["results"] if previous.exists() and len(parts) < 3 else {}
    if "latency" in parts:
        out["latency"] = [latency(cfg, n) for n in sizes]
    if "load" in parts:
        out["load"] = load(wd, hold_s=float(getattr(args, "hold_s", 180)))
        out["load_2_workers"] = load(wd, workers=2, hold_s=float(getattr(args, "hold_s", 180)))
    if "reload" in parts:
        out["reload"] = reload_under_load(wd)
    out["parts_rerun"] = parts
    out["peak_rss_mb_benchmark"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="work/bench")
    p.add_argument("--sizes", default=None)
    p.add_argument("--hold-s", dest="hold_s", default=180)
    print(json.dumps(run(p.parse_args()), indent=2))
