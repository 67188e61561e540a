"""Serving under concurrency, overload, a reload and a search flood: real uvicorn processes, loaded from other
processes on loopback by wrk (C; Debian's ``wrk`` package) and, where each reply's status and time matter, by
a few Python probe threads (httpx). The load generator's own CPU is measured (its user + system seconds per
wall second) and reported beside every figure: it shares this machine's cores with the server.

Parts (``--parts``, default all):
- ``steps``: /recommend at 1, 4, 16, 32, 64 in flight, 1 and 2 workers, 100k items; beside it a trivial
  FastAPI endpoint (a sync handler returning ten items) served by the same uvicorn the same way.
- ``overload``: 256 in flight on one worker: how fast the excess is shed and what the accepted requests see.
- ``reload``: `recsys serve` on the demo model, /admin/reload under load: p99 during the swap vs before.
- ``flood``: 32 concurrent /search uploads of distinct 170 s audio clips beside /recommend at 16 in flight;
  a 3-hour recording's refusal time.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.serving_bench import WRK_SCRIPT, _rss_mb, _tree, _wait_ready, demo_workdir

KEY = "bench"
STEPS = (1, 4, 16, 32, 64)


def trivial_app():
    """(uvicorn factory) The framework alone: a sync handler returning ten items, the same route shape."""
    from fastapi import FastAPI

    app = FastAPI()
    items = [{"item_id": str(i), "title": f"item {i}", "score": 1.0 / (i + 1)} for i in range(10)]

    @app.get("/recommend/{user_id}")
    def recommend(user_id: str, k: int = 10) -> dict:
        return {"user_id": user_id, "items": items[:k]}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    return app


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def wrk(base: str, connections: int, seconds: float, server_pid: int | None = None, seed: int = 0) -> dict:
    """wrk, one thread, closed loop (``connections`` requests in flight), random users -> throughput, errors
    (sockets; non-2xx statuses), latency percentiles (ms), and the CPU cores wrk and the server used."""
    if not shutil.which("wrk"):
        raise SystemExit("the load benchmark needs wrk: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % {"seed": seed, "key": KEY})
    pids = _tree(server_pid) if server_pid else []
    before, server_before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_s(pids), time.perf_counter()
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "5s", "-s", f.name, base],
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.unlink(f.name)
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, dur_us, sock, status, p50, p99, mx, mean = line.split()[1:]
    r = {"connections": connections, "seconds": seconds, "requests": int(n), "rps": round(int(n) / (int(dur_us) / 1e6), 1),
         "socket_errors": int(sock), "non_2xx": int(status), "p50": float(p50), "p99": float(p99), "max": float(mx),
         "mean": round(float(mean), 3),
         "wrk_cores": round((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / wall, 2)}
    if pids:
        r["server_cores"] = round((_cpu_s(pids) - server_before) / wall, 2)
    print(json.dumps(r), flush=True)
    return r


class Probe:
    """``threads`` Python clients, each sending one request after another and recording (start time, ms,
    status): the per-request view wrk does not give (which replies were shed, and when)."""

    def __init__(self, base: str, threads: int = 4, path=lambda rng: f"/recommend/{rng.integers(1, 611)}?k=10"):
        self.base, self.threads, self.path = base, threads, path
        self.records: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, seed: int) -> None:
        import httpx

        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.base, headers={"X-API-Key": KEY}, timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.time()
                s = time.perf_counter()
                try:
                    code = c.get(self.path(rng)).status_code
                except httpx.HTTPError:
                    code = 0
                with self._lock:
                    self.records.append((t0, (time.perf_counter() - s) * 1000, code))

    def __enter__(self) -> "Probe":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(15)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        rec = [r for r in self.records if since <= r[0] <= until]
        out: dict = {"requests": len(rec), "statuses": {}}
        for code in sorted({c for _, _, c in rec}):
            ms = np.array([m for _, m, c in rec if c == code])
            out["statuses"][str(code)] = {"n": int(len(ms)), "p50": round(float(np.percentile(ms, 50)), 2),
                                          "p99": round(float(np.percentile(ms, 99)), 2), "max": round(float(ms.max()), 2)}
        return out


@contextmanager
def served(app: str, port: int, workers: int = 1, env: dict | None = None, cli: list[str] | None = None):
    """A uvicorn server (``app`` a factory path, or ``cli`` a `recsys serve` command line), ready."""
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RECSYS_API_KEYS": KEY, "RECSYS_ADMIN_KEYS": f"{KEY}-admin", **(env or {})}
    if workers > 1:
        env["PROMETHEUS_MULTIPROC_DIR"], env["RECSYS_METRICS_MULTIPROC"] = tempfile.mkdtemp(prefix="recsys-metrics-"), "1"
    cmd = cli or [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(port),
                  "--workers", str(workers), "--log-level", "error"]
    server = subprocess.Popen(cmd, env=env)
    try:
        _wait_ready(base)
        time.sleep(3 * workers)  # every worker in (readyz answers from whichever worker took the probe)
        wrk(base, 4, 3, server.pid)  # warm-up, not recorded
        yield base, server
    finally:
        server.terminate()
        server.wait(60)


def _snapshot_env(workdir: Path, n: int) -> dict:
    return {"RECSYS_BENCH_WORKDIR": str(workdir), "RECSYS_BENCH_ITEMS": str(n)}


def steps(workdir: Path, n: int = 100_000, step_s: float = 15) -> dict:
    """Throughput and latency as in-flight requests rise: the service with 1 and 2 workers, the trivial app."""
    out = {}
    for name, app, workers in (("service_1_worker", "benchmarks.serving_bench:snapshot_app", 1),
                               ("service_2_workers", "benchmarks.serving_bench:snapshot_app", 2),
                               ("trivial_1_worker", "benchmarks.load_bench:trivial_app", 1)):
        with served(app, 8770, workers, _snapshot_env(workdir, n)) as (base, server):
            out[name] = [wrk(base, c, step_s, server.pid) for c in STEPS]
    for name in ("service_1_worker", "service_2_workers"):
        peak = max(r["rps"] for r in out[name])
        out[f"{name}_no_collapse"] = {str(c): round(next(r["rps"] for r in out[name] if r["connections"] == c) / peak, 3)
                                      for c in (32, 64)}
    at16 = {name: next(r["rps"] for r in out[name] if r["connections"] == 16) for name in ("service_1_worker", "trivial_1_worker")}
    out["per_worker_vs_trivial_at_16"] = round(at16["service_1_worker"] / at16["trivial_1_worker"], 3)
    ok = [r for r in out["service_2_workers"] if r["p99"] < 50 and r["socket_errors"] + r["non_2xx"] == 0]
    out["two_workers_best_under_50ms"] = max(ok, key=lambda r: r["rps"]) if ok else None
    return out


def _metric_sum(base: str, name: str, label: str | None = None) -> float:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (label is None or label in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_client(base: str, clients: int, seconds: float, backoff: bool = True) -> dict:
    """benchmarks/load_client.py as its own process (clients that honour Retry-After, or a retry storm)."""
    cmd = [sys.executable, "-m", "benchmarks.load_client", "--url", base, "--clients", str(clients),
           "--seconds", str(seconds), "--key", KEY] + ([] if backoff else ["--no-backoff"])
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(json.dumps(out), flush=True)
    return out


def overload(workdir: Path, n: int = 100_000, clients: int = 256, seconds: float = 20) -> dict:
    """256 clients on one worker, each with one request in flight: those the worker cannot take get 503 at
    once and wait what Retry-After says (the contract); then the same 256 retrying at once (a retry storm)."""
    with served("benchmarks.serving_bench:snapshot_app", 8771, 1, _snapshot_env(workdir, n)) as (base, server):
        shed_before = _metric_sum(base, "recsys_shed_total")
        cpu0 = _cpu_s(_tree(server.pid))
        polite = load_client(base, clients, seconds)
        server_cores = round((_cpu_s(_tree(server.pid)) - cpu0) / seconds, 2)
        shed = _metric_sum(base, "recsys_shed_total") - shed_before
        storm = load_client(base, clients, seconds, backoff=False)
    codes = polite["statuses"]
    return {"items": n, "in_flight": clients, "honouring_retry_after": polite, "server_cores": server_cores,
            "shed_total_server": shed, "shed_ms_p99": codes.get("503", {}).get("p99"),
            "accepted_ms_p99": codes.get("200", {}).get("p99"), "accepted_per_s": codes.get("200", {}).get("per_s"),
            "other_errors": sum(v["n"] for k, v in codes.items() if k not in ("200", "503")),
            "retry_storm": storm}


def reload_under_load(workdir: Path, connections: int = 16, seconds: float = 75) -> dict:
    """`recsys serve` on the demo model: wrk at ``connections`` in flight, 4 probe threads timing every reply;
    /admin/reload 10 s in (the child that builds the snapshot at nice 19 takes half a minute beside this load).
    p99 in the swap window (request to swapped) vs before it."""
    import httpx

    cli = [sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(workdir), "--port", "8772"]
    with served("", 8772, cli=cli) as (base, server):
        admin = {"X-API-Key": f"{KEY}-admin"}
        marks: dict = {}

        def trigger():
            time.sleep(10)
            marks["start"] = time.time()
            httpx.post(f"{base}/admin/reload", headers=admin, json={}, timeout=10)
            while httpx.get(f"{base}/admin/status", headers=admin, timeout=10).json()["reloads"] < 1:
                time.sleep(0.05)
            marks["swapped"] = time.time()

        t = threading.Thread(target=trigger)
        with Probe(base, threads=4) as probe:
            t.start()
            run = wrk(base, connections, seconds, server.pid)
            t.join()
        t_begin = min(r[0] for r in probe.records)
    before = probe.summary(t_begin + 3, marks["start"])
    during = probe.summary(marks["start"], marks["swapped"] + 1)
    p99 = lambda s: s["statuses"].get("200", {}).get("p99")  # noqa: E731
    return {"items": 9742, "wrk": run, "swap_s": round(marks["swapped"] - marks["start"], 2), "before": before,
            "during_swap": during, "p99_ratio": round(p99(during) / p99(before), 2) if p99(during) and p99(before) else None,
            "failed": sum(v["n"] for k, v in probe.summary()["statuses"].items() if k != "200") + run["socket_errors"] + run["non_2xx"]}


def _clip(seconds: float, seed: int, rate: int = 16000) -> bytes:
    """A distinct recording: a tone and noise, 16-bit WAV."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.2 * np.sin(2 * np.pi * (200 + 7 * seed) * t) + 0.05 * rng.normal(size=len(t))
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def flood(workdir: Path, searches: int = 32, connections: int = 16, seconds: float = 30) -> dict:
    """/recommend at ``connections`` in flight alone, then beside ``searches`` clients each uploading distinct
    170 s clips one after another (benchmarks/load_client.py, its own process); then a 3-hour file alone."""
    import httpx

    clips = Path(tempfile.mkdtemp(prefix="recsys-clips-"))
    for i in range(searches * 3):
        (clips / f"clip{i:03d}.wav").write_bytes(_clip(170, i))
    cli = [sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(workdir), "--port", "8773"]
    try:
        with served("", 8773, cli=cli) as (base, server):
            alone = wrk(base, connections, seconds, server.pid)
            rss_peak = [_rss_mb(_tree(server.pid))]
            rss_at_rest = {str(pid): _rss_mb([pid]) for pid in _tree(server.pid)}
            each_peak: dict = {}
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    pids = _tree(server.pid)
                    rss_peak.append(_rss_mb(pids))
                    for pid in pids:
                        each_peak[str(pid)] = max(each_peak.get(str(pid), 0), _rss_mb([pid]))
                    time.sleep(0.5)

            cmd = [sys.executable, "-m", "benchmarks.load_client", "--url", base, "--clients", str(searches),
                   "--seconds", str(seconds + 4), "--key", KEY, "--search-clips", str(clips)]
            watcher = threading.Thread(target=watch)
            watcher.start()
            flooder = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            beside = wrk(base, connections, seconds, server.pid)
            searched = json.loads(flooder.communicate(timeout=300)[0].strip().splitlines()[-1])
            stop.set()
            watcher.join()
            long = _clip_3h()
            s = time.perf_counter()
            r = httpx.post(f"{base}/search", headers={"X-API-Key": KEY}, files={"files": ("3h.wav", long, "audio/wav")},
                           timeout=60)
            long_ms = (time.perf_counter() - s) * 1000
    finally:
        shutil.rmtree(clips, ignore_errors=True)
    st = searched["statuses"]
    return {"items": 9742, "recommend_alone": alone, "recommend_beside_searches": beside,
            "p99_ratio": round(beside["p99"] / alone["p99"], 2), "rss_mb_peak": max(rss_peak),
            "rss_mb_per_process": {"at_rest": rss_at_rest, "peak": each_peak, "server_pid": str(server.pid)},
            "searches": searched,
            "answered_ms_max": st.get("200", {}).get("max"), "refused_ms_p99": st.get("503", {}).get("p99"),
            "other_statuses": sorted(set(st) - {"200", "503"}),
            "three_hours": {"status": r.status_code, "ms": round(long_ms, 1), "bytes": len(long),
                            "detail": r.json().get("detail")}}


def _clip_3h() -> bytes:
    import soundfile as sf

    rate = 800
    t = np.arange(3 * 3600 * rate) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 110 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_U8")
    return buf.getvalue()


def run(args) -> dict:
    wd = demo_workdir(Path(args.workdir))
    parts = (getattr(args, "parts", None) or "steps,overload,reload,flood").split(",")
    previous = Path(__file__).resolve().parent / "results" / "load.json"
    out = json.loads(previous.read_text())["results"] if previous.exists() else {}
    if "steps" in parts:
        out["steps"] = steps(wd)
    if "overload" in parts:
        out["overload"] = overload(wd)
    if "reload" in parts:
        out["reload"] = reload_under_load(wd)
    if "flood" in parts:
        out["flood"] = flood(wd)
    out["parts_rerun"] = parts
    from benchmarks.run import _code_version

    previous_code = json.loads(previous.read_text()).get("code") if previous.exists() else None
    out["parts_code"] = {**{k: previous_code for k in ("steps", "overload", "reload", "flood") if k in out},
                         **out.get("parts_code", {}), **{k: _code_version() for k in parts}}  # which commit each part ran
    out["load_generator"] = "wrk 4.1 (one thread) plus Python probe threads (httpx), on the same machine"
    from recsys.config import Config

    cfg = Config.model_validate_json((wd / "config.json").read_text()).serve.model_dump()
    out["serve_settings"] = {k: cfg.get(k) for k in ("max_in_flight", "max_batch", "batch_wait_ms", "max_searches",
                                                      "search_workers")}
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="work/bench")
    p.add_argument("--parts", default=None)
    print(json.dumps(run(p.parse_args()), indent=2))

