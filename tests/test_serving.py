"""The online service as a client meets it: a real `recsys serve` process (uvicorn) on a loopback port,
after the demo flow trained and registered a model on a synthetic multimodal catalog (known clusters)
with one heavy user of 520 distinct interactions."""

from __future__ import annotations

import contextlib

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from tests.conftest import small_config

KEY, ADMIN = "test-key-123", "admin-key-456"
SERVER: dict = {}  # the module server's pid
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, in_a_row: int = 1, timeout_s: float = 180) -> list[int]:
    """Poll /readyz until it answers 200 ``in_a_row`` times running; the statuses seen. A server that never gets
    there is killed and its output raised."""
    seen, ok, deadline = [], 0, time.time() + timeout_s
    while ok < in_a_row:
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(proc.stdout.read().decode()[-3000:])
        try:
            seen.append(httpx.get(f"{base}/readyz", timeout=2).status_code)
            ok = ok + 1 if seen[-1] == 200 else 0
        except httpx.TransportError:
            ok = 0
        if ok < in_a_row:
            time.sleep(0.1)
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from recsys.data.synthetic import SyntheticSpec, generate
    from recsys.flows.demo import run_demo

    root = tmp_path_factory.mktemp("serving")
    data = generate(root / "data", SyntheticSpec(n_items=600, n_users=60, mean_interactions=20, seed=5,
                                                share_audio=0.05, share_video=0.03))
    frame = pl.read_csv(data / "interactions.csv", schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8})
    heavy = pl.DataFrame({"user_id": ["heavy"] * 520, "item_id": [f"s{i:05d}" for i in range(520)],
                          "timestamp": [1_704_067_200 + 60 * i for i in range(520)], "value": [1.0] * 520})
    pl.concat([frame, heavy.cast(frame.schema)]).write_csv(data / "interactions.csv")
    # the concatenated item input (fused and text-only vectors side by side, twice as wide): every online path,
    # search and the nightly job included, must work in a space other than the embedder's own (the demo's auto
    # choice is tested in test_e2e); with the content match ([train] content_match, off by default on LOO: test_e2e
    # serves that) the towers' vectors also carry the content block, so they must work at that width too
    cfg = small_config(root / "work", data={"source": "synthetic", "path": str(data)}, eval={"protocols": ["loo"]},
                       embedder={"item_input": "concat"}, train={"content_match": True})
    run_demo(cfg, sample_users=1)
    from serving.service import ModelBundle

    served = ModelBundle.from_mlflow(cfg, published=False)
    assert served.config["tower"]["content_match"] and served.config["content_match_weight"] != 0.0  # it learned
    assert served.item_vectors.shape[1] == cfg.train.out_dim + 2 * cfg.embedder.dim + 1 == served.queries.shape[1]
    return cfg


@pytest.fixture(scope="module")
def server(trained):
    cfg = trained
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEYS": KEY, "RECSYS_ADMIN_KEYS": ADMIN}
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(cfg.workdir), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    ready_seen = wait_ready(base, proc)
    client = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30)
    SERVER["pid"] = proc.pid
    yield cfg, client, ready_seen
    client.close()
    proc.terminate()
    proc.wait(10)


def test_readyz_false_until_loaded_then_healthz_shows_the_index(server):
    cfg, client, ready_seen = server
    assert ready_seen[-1] == 200
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["index"]["kind"] == "flat" and h["index"]["recall_at_100"] == 1.0
    assert h["gpu"] is False and h["items"] == 600
    paths = client.get("/openapi.json").json()["paths"]  # the OpenAPI document stays correct
    assert {"/recommend", "/recommend/{user_id}", "/items/{item_id}/similar", "/search", "/healthz", "/readyz",
            "/metrics", "/admin/reload", "/interactions"} <= set(paths)


def test_readyz_is_503_before_the_model_loads(trained):
    """An app whose model cannot load yet (empty registry) answers /readyz 503 with the reason."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    empty = trained.model_copy(update={"workdir": trained.workdir / "empty"})
    with TestClient(create_app(empty)) as client:
        time.sleep(0.5)
        r = client.get("/readyz")
        assert r.status_code == 503 and not r.json()["ready"] and r.json()["reason"]
        assert client.get("/healthz").status_code == 200


def test_auth(server):
    cfg, client, _ = server
    base = str(client.base_url)
    assert httpx.get(f"{base}/recommend/u0001").status_code == 401
    assert httpx.get(f"{base}/recommend/u0001", headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{base}/recommend/u0001", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{base}/metrics").status_code == 200 and httpx.get(f"{base}/healthz").status_code == 200
    assert client.post("/admin/reload").status_code == 403  # the API key is not the admin key
    assert httpx.get(f"{base}/admin/status", headers={"X-API-Key": ADMIN}).status_code == 200


def test_refuses_a_public_host_without_a_key(trained):
    env = {k: v for k, v in os.environ.items() if k not in ("RECSYS_API_KEYS", "RECSYS_ADMIN_KEYS")}
    r = subprocess.run([sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(trained.workdir), "--host", "0.0.0.0",
                        "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without an API key" in r.stderr


def test_heavy_user_never_gets_a_seen_item_and_k_up_to_the_limit(server):
    cfg, client, _ = server
    r = client.get("/recommend/heavy?k=80").json()
    seen = {f"s{i:05d}" for i in range(520)}
    assert len(r["items"]) == 80 and r["known_user"]
    assert not seen & {i["item_id"] for i in r["items"]}
    big = client.post("/recommend", json={"user_id": "u0001", "k": 300, "rerank": False}).json()
    assert len(big["items"]) == 300 and len({i["item_id"] for i in big["items"]}) == 300


def test_concurrent_recommendations_are_batched_and_answer_as_one_at_a_time(server):
    """Requests that arrive together share one pass of the model (dynamic batching); each still gets exactly
    the reply it gets alone."""
    from prometheus_client.parser import text_string_to_metric_families

    _, client, _ = server
    users = [f"u00{10 + i:02d}" for i in range(40)]
    alone = {u: client.get(f"/recommend/{u}?k=10").json() for u in users}
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda u: client.get(f"/recommend/{u}?k=10"), users * 3))
    assert all(r.status_code == 200 for r in together)
    for r in together:
        body = r.json()
        assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in alone[body["user_id"]]["items"]]
        assert [i["score"] for i in body["items"]] == pytest.approx([i["score"] for i in alone[body["user_id"]]["items"]], abs=1e-5)
    sizes = [r.json()["timings_ms"]["batch"] for r in together]
    assert max(sizes) > 1, sizes
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{client.base_url}/metrics").text)}
    counts = {s.labels.get("le"): s.value for s in families["recsys_batch_size"].samples if s.name.endswith("_bucket")}
    assert counts["+Inf"] > counts["1.0"], counts  # some batches held more than one request


def test_unknown_users_popularity_or_request_history(server):
    cfg, client, _ = server
    pop = client.get("/recommend/never-seen-user?k=5").json()
    assert pop["fallback"] == "popularity" and not pop["known_user"] and len(pop["items"]) == 5
    recent = ["s00001", "s00002"]
    r = client.post("/recommend", json={"user_id": "brand-new", "k": 5, "recent_item_ids": recent}).json()
    assert r["fallback"] == "request_history" and len(r["items"]) == 5
    assert not set(recent) & {i["item_id"] for i in r["items"]}


def test_bad_input_is_4xx_with_a_reason(server):
    cfg, client, _ = server
    cases = [
        client.get("/recommend/u0001?k=0"), client.get("/recommend/u0001?k=501"), client.get("/recommend/" + "x" * 300),
        client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"}),
        client.post("/recommend", json={"user_id": "u0001", "k": "ten"}),
        client.post("/recommend", json={"user_id": "u0001", "modalities": ["smell"]}),
        client.post("/recommend", content=b'{"user_id": "' + b"a" * (2 << 20) + b'"}', headers={"content-type": "application/json"}),
        client.get("/items/no-such-item/similar"),
        client.post("/interactions", json={"user_id": "u0001", "item_id": "no-such-item"}),
        client.post("/recommend", json={"user_id": "u0001", "k": 500}),  # more than the 600-item catalog? no: 500 < 600
    ]
    codes = [r.status_code for r in cases]
    assert codes[:9] == [422, 422, 422, 422, 422, 422, 413, 404, 404], codes
    assert codes[9] == 200
    for r in cases[:9]:
        assert r.json()["detail"]
    assert client.get("/items/s00001/similar?k=700").status_code == 422  # more than the catalog holds


def test_similar_items_in_both_spaces(server):
    from serving.service import ModelBundle

    cfg, client, _ = server
    for space in ("two-tower", "content"):
        r = client.get(f"/items/s00001/similar?k=10&space={space}").json()
        assert len(r["items"]) == 10 and "s00001" not in {i["item_id"] for i in r["items"]}
    # in the two-tower space the query is the item's own vector as a user's would be: the bias coordinate 1, the
    # content block times the learned content-match weight (this model has one: see ``trained``)
    b = ModelBundle.from_mlflow(cfg)
    t, row = b.config["tower"], b.item_ids.index("s00001")
    q = b.item_vectors[row].astype(np.float64)
    q[-1], q[t["out_dim"]:t["out_dim"] + t["content_dim"]] = 1.0, q[t["out_dim"]:-1] * b.config["content_match_weight"]
    scores = b.item_vectors @ q
    scores[row] = -np.inf
    want = [b.item_ids[j] for j in np.argsort(-scores)[:10]]
    assert [i["item_id"] for i in client.get("/items/s00001/similar?k=10").json()["items"]] == want
    assert client.get("/items/s00001/similar?space=nope").status_code == 422


def _cluster(cfg, item_ids):
    from recsys.data import load_dataset

    items = load_dataset(cfg).catalog.items
    c = dict(zip(items["item_id"].to_list(), items["cluster"].to_list()))
    return [c[i] for i in item_ids]


def test_search_by_text_and_by_image(server):
    from recsys.data.synthetic import SyntheticSpec, make_image

    cfg, client, _ = server
    r = client.post("/search", data={"text": "ocean wave surf beach tide", "k": "10"})
    assert r.status_code == 200, r.text
    assert np.mean(np.array(_cluster(cfg, [i["item_id"] for i in r.json()["items"]])) == 0) >= 0.6
    buf = io.BytesIO()
    make_image(3, SyntheticSpec(), np.random.default_rng(1)).save(buf, format="PNG")
    r = client.post("/search", data={"k": "10"}, files={"files": ("q.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    # (an image-only query of cluster 2 lands on cluster 5 with the query task: an embedder weakness, issue 16)
    assert np.mean(np.array(_cluster(cfg, [i["item_id"] for i in r.json()["items"]])) == 3) >= 0.6
    bad = [client.post("/search", files={"files": ("q.png", b"not an image", "image/png")}),
           client.post("/search", files={"files": ("q.txt", b"hello", "application/pdf")}),
           client.post("/search", data={"k": "10"}),
           client.post("/search", files={"files": ("big.png", b"\0" * (21 << 20), "image/png")})]
    assert [b.status_code for b in bad] == [422, 415, 422, 413], [b.text[:200] for b in bad]


def test_a_search_process_that_dies_is_replaced_and_never_answers_500(server):
    """/search decodes and embeds in a child process of the service: killed mid-flight (a decoder gone wrong on
    a hostile file), the request in flight gets 503, a fresh child takes over, and searches answer again."""
    import signal

    cfg, client, _ = server

    def search_children() -> list[int]:
        kids = subprocess.run(["pgrep", "-P", str(SERVER["pid"])], capture_output=True, text=True).stdout.split()
        return [int(k) for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace")]

    assert client.post("/search", data={"text": "ocean wave", "k": "5"}).status_code == 200
    before = search_children()
    assert len(before) == cfg.serve.search_workers, before
    clip = _tone(150)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(lambda: client.post("/search", files={"files": ("c.wav", clip, "audio/wav")}))
        time.sleep(0.3)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        first = slow.result()
    assert first.status_code in (200, 503), first.text  # 200 only if it finished before the kill
    codes = []
    for _ in range(120):
        codes.append(client.post("/search", data={"text": "ocean wave", "k": "5"}).status_code)
        if codes[-1] == 200:
            break
        time.sleep(0.5)
    assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
    after = search_children()
    assert after and not set(after) & set(before), (before, after)


def test_metrics_parse_with_prometheus_client(server):
    from prometheus_client.parser import text_string_to_metric_families

    cfg, client, _ = server
    client.get("/recommend/u0002")
    text = httpx.get(f"{client.base_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"recsys_requests", "recsys_request_latency_seconds", "recsys_stage_latency_seconds", "recsys_model_info",
            "recsys_index_items", "recsys_reloads"} <= set(families)
    samples = [s for s in families["recsys_requests"].samples if s.labels.get("endpoint") == "/recommend/{user_id}"]
    assert any(s.labels["status"] == "200" and s.value >= 1 for s in samples)
    assert any(s.labels["status"] == "401" for s in families["recsys_requests"].samples)
    stages = {s.labels.get("stage") for s in families["recsys_stage_latency_seconds"].samples}
    assert {"features_user", "user_tower", "faiss"} <= stages


def test_interaction_then_excluded(server):
    cfg, client, _ = server
    first = client.get("/recommend/u0003?k=3").json()["items"][0]["item_id"]
    assert client.post("/interactions", json={"user_id": "u0003", "item_id": first}).status_code == 202
    after = client.get("/recommend/u0003?k=50").json()
    assert first not in {i["item_id"] for i in after["items"]}


def test_reload_under_load_has_no_failures(server):
    cfg, client, _ = server
    admin = {"X-API-Key": ADMIN}
    before = client.get("/admin/status", headers=admin).json()
    errors, done, stop = [], [0], threading.Event()

    def hammer():
        with httpx.Client(base_url=str(client.base_url), headers={"X-API-Key": KEY}, timeout=30) as c:
            while not stop.is_set():
                r = c.get("/recommend/u0004?k=10")
                if r.status_code != 200:
                    errors.append(r.status_code)
                done[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    assert client.post("/admin/reload", headers=admin, json={"version": "1"}).status_code == 202
    deadline = time.time() + 120
    while time.time() < deadline:
        s = client.get("/admin/status", headers=admin).json()
        if s["reloads"] > before["reloads"]:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert s["reloads"] == before["reloads"] + 1 and s["error"] is None
    assert done[0] > 20 and errors == []
    # built in a low-priority child: this process only read the files (the whole build costs it seconds)
    assert s["last_load"]["built_in"] == "child" and s["last_load"]["cpu_s_here"] < s["last_load"]["seconds"], s
    assert not list((cfg.workdir / "serve" / "prepared").iterdir())  # the child's folder is gone once loaded
    assert client.post("/admin/reload", headers=admin, json={"version": "x1"}).status_code == 422


def test_reloads_close_the_replaced_snapshots_store_connections(server):
    """Each reload builds a new snapshot with its own feature-store connection; the one it replaced is closed at
    the next reload, so at most two stay open however often it reloads (each reload leaked one before)."""
    cfg, client, _ = server
    admin = {"X-API-Key": ADMIN}

    def open_stores() -> int:
        n = 0
        for f in Path(f"/proc/{SERVER['pid']}/fd").iterdir():
            try:
                n += os.readlink(f).endswith("online_store.db")
            except FileNotFoundError:  # closed between the listing and the read (the server's other threads)
                pass
        return n

    counts = []
    for _ in range(5):
        before = client.get("/admin/status", headers=admin).json()["reloads"]
        assert client.post("/admin/reload", headers=admin, json={"version": "1"}).status_code == 202
        for _ in range(1200):  # each reload is built in a child process (its imports alone take seconds)
            if client.get("/admin/status", headers=admin).json()["reloads"] > before:
                break
            time.sleep(0.1)
        with ThreadPoolExecutor(8) as pool:  # requests on several threads: each opens its connection
            assert all(r.status_code == 200 for r in pool.map(lambda u: client.get(f"/recommend/u00{u:02d}"), range(16)))
        counts.append(open_stores())
    assert counts[-1] <= counts[1] <= 3, counts  # two snapshots (+ one descriptor SQLite closes late)


def test_gpu_index_when_a_gpu_is_seen():
    from recsys.index import build_index, gpu_count

    if gpu_count() == 0:
        pytest.skip("faiss sees no GPU here (faiss-cpu)")
    x = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    index = build_index(x, kind="auto")
    assert index.on_gpu and index.info.kind == "flat"
    _, rows = index.search(x[:2], 5, exclude=[{0}, set()])
    assert 0 not in rows[0]


def test_the_nightly_publish_is_what_a_reload_serves(server):
    """`recsys nightly` publishes vectors + index for the champion; a reload serves exactly that manifest."""
    from recsys.flows.nightly import run_nightly
    from recsys.manifest import read_published

    cfg, client, _ = server
    # the loop: what u0005 consumes through the service (concurrently, one event retried) is excluded at once,
    # and still after the nightly has rebuilt the features and the reload has taken them
    consumed = [i["item_id"] for i in client.get("/recommend/u0005?k=6").json()["items"]]
    posts = [{"user_id": "u0005", "item_id": i, "event_id": f"loop-{n}"} for n, i in enumerate(consumed)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: client.post("/interactions", json=b), posts + posts[:2]))
    assert all(r.status_code == 202 for r in replies)
    assert sorted(r.json()["status"] for r in replies).count("accepted") == 6
    assert not set(consumed) & {i["item_id"] for i in client.get("/recommend/u0005?k=100").json()["items"]}
    summary = run_nightly(cfg)
    assert summary.exit_code == 0 and summary.published and summary.counts["events"] >= 6
    m = read_published(cfg.workdir)
    assert m.index and m.model["version"] == "1" and m.index["items"] == 600
    assert m.embedder["dim"] == 2 * cfg.embedder.dim and m.embedder["model_version"].endswith("+concat")
    admin = {"X-API-Key": ADMIN}
    before = client.get("/admin/status", headers=admin).json()["reloads"]
    assert client.post("/admin/reload", headers=admin).status_code == 202
    for _ in range(300):
        s = client.get("/admin/status", headers=admin).json()
        if s["reloads"] > before:
            break
        time.sleep(0.2)
    assert s["source"] == f"published:{m.run_id}" and s["error"] is None
    assert client.get("/healthz").json()["source"] == f"published:{m.run_id}"
    r = client.get("/recommend/heavy?k=20").json()
    assert len(r["items"]) == 20 and not {f"s{i:05d}" for i in range(520)} & {i["item_id"] for i in r["items"]}
    assert not set(consumed) & {i["item_id"] for i in client.get("/recommend/u0005?k=100").json()["items"]}


def test_a_reload_that_fails_its_checks_keeps_the_served_snapshot(server):
    """A published index whose bytes do not match the manifest is refused: the old snapshot keeps answering, and
    /admin/status and /metrics say so."""
    from recsys.manifest import read_published

    cfg, client, _ = server
    m = read_published(cfg.workdir)
    faiss_file = cfg.workdir / m.index["path"] / "items.faiss"
    good = faiss_file.read_bytes()
    admin = {"X-API-Key": ADMIN}
    try:
        faiss_file.write_bytes(good[:-8] + bytes(8))
        before = client.get("/admin/status", headers=admin).json()
        assert client.post("/admin/reload", headers=admin).status_code == 202
        for _ in range(600):
            s = client.get("/admin/status", headers=admin).json()
            if s["error"]:
                break
            time.sleep(0.2)
        assert "sha256" in s["error"] and s["reloads"] == before["reloads"] and s["source"] == before["source"]
        assert client.get("/recommend/u0002?k=5").status_code == 200
        metrics = httpx.get(f"{client.base_url}/metrics").text
        assert "recsys_reload_failures_total 1.0" in metrics
    finally:
        faiss_file.write_bytes(good)


def test_concurrent_pushes_on_two_workers_all_land(trained):
    """`recsys serve --workers 2`: 64 concurrent pushes for 4 users (a quarter of them retries of the same event
    id) all answer 2xx, each event is in the log once, and every pushed item is out of its user's next reply."""
    from recsys.events import open_event_log

    cfg = trained
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(cfg.workdir), "--port", str(port),
                             "--workers", "2"], env={**os.environ, "RECSYS_API_KEYS": KEY},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, in_a_row=20)  # both workers: each probe lands on either
        log = open_event_log(cfg)
        start = log.max_seq()
        items = [f"s{i:05d}" for i in range(540, 588)]  # 48 items none of these users had
        users = [f"u00{40 + k}" for k in range(4)]
        posts = [{"user_id": users[n % 4], "item_id": i, "event_id": f"two-{n}"} for n, i in enumerate(items)]
        with httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as c, ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda b: c.post("/interactions", json=b), posts + posts[:16]))
            assert [r.status_code for r in replies] == [202] * 64
            new = log.read(after=start)
            assert new.height == 48 and sorted(new["event_id"].to_list()) == sorted(p["event_id"] for p in posts)
            for k, u in enumerate(users):
                got = {i["item_id"] for i in c.get(f"/recommend/{u}?k=500").json()["items"]}
                assert not got & set(items[k::4]), u
    finally:
        proc.terminate()
        try:  # two workers (each with a search process) shut down gracefully; on a loaded machine that took > 20 s
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_online_path_imports_nothing_from_training(trained):
    """Load the model and answer a request in a fresh process: no module of training/ gets imported (the user
    tower is a torch.export program; the index, reranker and tower inputs live below both)."""
    code = ("import sys; from recsys.config import Config; from serving.service import Recommender; "
            f"cfg = Config.model_validate_json(open({str(trained.workdir / 'config.json')!r}).read()); "
            "r = Recommender.load(cfg); assert r.recommend('u0001', k=5).items; "
            "print('TRAINING', sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "TRAINING []" in out.stdout, out.stdout[-1000:] + out.stderr[-2000:]


def test_train_again_reads_what_the_service_accepted(server):
    """The loop's last step: `recsys train` on the served work directory reads the dataset plus the event log
    (the pushes the earlier tests made), trains and registers a new version."""
    import mlflow

    from recsys.events import open_event_log

    cfg, client, _ = server
    n = open_event_log(cfg).read().height
    assert n >= 6  # the loop test's pushes at least
    r = subprocess.run([sys.executable, "-m", "recsys.cli", "train", "--workdir", str(cfg.workdir), "--epochs", "1",
                        "--protocols", "loo", "--alias", "retrained"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"event log: {n:,} interactions the service accepted" in r.stdout
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mv = mlflow.tracking.MlflowClient().get_model_version_by_alias(cfg.train.registered_model, "retrained")
    assert int(mv.version) >= 2


@pytest.fixture(scope="module")
def tight(trained):
    """The same model behind `uvicorn --factory` with tight limits: 3 requests in flight, k <= 50, one search."""
    cfg = trained.model_copy(update={"serve": trained.serve.model_copy(update={"max_in_flight": 3, "max_k": 50,
                                                                               "max_searches": 1})})
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEYS": KEY, "RECSYS_SERVE_CONFIG": cfg.model_dump_json()}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serving.app:app_from_env", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    client = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=60)
    yield cfg, client
    client.close()
    proc.terminate()
    proc.wait(10)


def test_over_capacity_is_shed_at_once_with_503_and_retry_after(tight):
    from prometheus_client.parser import text_string_to_metric_families

    cfg, client = tight
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda i: client.get(f"/recommend/u00{10 + i % 40}?k=10"), range(128)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    shed = [r for r in replies if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "over capacity" in r.json()["detail"] for r in shed)
    assert httpx.get(f"{client.base_url}/healthz").status_code == 200  # never shed
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{client.base_url}/metrics").text)}
    assert sum(s.value for s in families["recsys_shed"].samples if s.name == "recsys_shed_total") >= len(shed)


def test_limits_on_k_ids_and_bodies(tight, server):
    cfg, client = tight
    assert client.get("/recommend/u0001?k=50").status_code == 200
    r = client.get("/recommend/u0001?k=51")
    assert r.status_code == 422 and "serve.max_k" in r.json()["detail"]
    assert client.post("/recommend", json={"user_id": "u0001", "exclude": ["x" * 300]}).status_code == 422
    assert client.post("/recommend", json={"user_id": "u0001", "recent_item_ids": [""]}).status_code == 422

    def chunks():  # a chunked body (no Content-Length) over the 1 MiB limit
        yield b'{"user_id": "u0001", "exclude": ['
        for _ in range(2000):
            yield b'"' + b"y" * 600 + b'",'
        yield b'"z"]}'

    _, main, _ = server
    r = main.post("/recommend", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    # the API description needs the key when keys are configured
    assert httpx.get(f"{main.base_url}/openapi.json").status_code == 401
    assert httpx.get(f"{main.base_url}/docs").status_code == 401
    assert main.get("/docs").status_code == 200


def _tone(seconds: float, rate: int = 8000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_U8")
    return buf.getvalue()


def test_a_recording_over_the_limit_is_refused_before_decoding_and_searches_have_their_own_bounded_pool(tight):
    cfg, client = tight
    long = _tone(3 * 3600, rate=800)  # 3 hours (8.6 MB at 800 Hz, 8 bits)
    t0 = time.perf_counter()
    r = client.post("/search", files={"files": ("3h.wav", long, "audio/wav")})
    assert r.status_code == 413 and "10800 s of audio" in r.json()["detail"], r.text
    # refused from the header, not after decoding and embedding 3 hours (minutes): a loose bound, as the full
    # suite on 2 loaded cores took 5.3 s here
    assert time.perf_counter() - t0 < 30
    clip = _tone(150)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda i: client.post("/search", files={"files": (f"c{i}.wav", clip, "audio/wav")}), range(6)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    why = [r.json()["detail"] for r in replies if r.status_code == 503]  # the search pool's, or the worker's limit
    assert any("searches in progress" in w for w in why) and all("searches in progress" in w or "over capacity" in w
                                                                 for w in why), why


def test_the_app_factory_refuses_a_public_host_without_a_key(trained):
    cfg = trained.model_copy(update={"serve": trained.serve.model_copy(update={"host": "0.0.0.0"})})
    env = {k: v for k, v in os.environ.items() if k not in ("RECSYS_API_KEYS", "RECSYS_ADMIN_KEYS")}
    env["RECSYS_SERVE_CONFIG"] = cfg.model_dump_json()
    r = subprocess.run([sys.executable, "-c", "from serving.app import app_from_env; app_from_env()"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "refusing to listen on 0.0.0.0 without an API key" in r.stdout + r.stderr


@contextlib.contextmanager
def served(cfg):
    """``uvicorn --factory`` on ``cfg`` for a ``with`` block (its base URL), then SIGTERM: the logs' last rows
    are written before the process ends."""
    port = free_port()
    env = {**os.environ, "RECSYS_API_KEYS": KEY, "RECSYS_SERVE_CONFIG": cfg.model_dump_json()}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "serving.app:app_from_env", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def _serve_once(cfg, users: list[str]) -> None:
    """One /recommend per user on a fresh service."""
    with served(cfg) as base, httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30) as c:
        assert all(c.get(f"/recommend/{u}?k=5").status_code == 200 for u in users)


def test_experiment_logs_carry_their_design_so_an_unequal_split_reads_right_and_a_change_is_reported(trained, tmp_path):
    """A 90/10 split served for real: the logs record the shares (the split check uses them, not equal shares), an
    arm is listed whatever its size, a changed salt mid-run is reported, and a one-arm log is a clear error."""
    from recsys.experiments.analysis import design_changes, load, srm, per_user
    from recsys.experiments.report import write_report

    logs = tmp_path / "logs"
    exp = {"name": "ninety-ten", "salt": "s1", "log_dir": str(logs), "flush_s": 0.5,
           "arms": [{"name": "control", "share": 0.9}, {"name": "small", "share": 0.1}]}
    cfg = trained.model_copy(update={"experiment": trained.experiment.model_validate(exp)})
    _serve_once(cfg, [f"visitor{i}" for i in range(400)])
    d = load(logs)
    assert d.shares == {"control": 0.9, "small": 0.1} and d.arms == ["control", "small"]
    split = srm(per_user(d), d.shares)
    assert split.ok and 20 < split.observed["small"] < 70, split  # about 40 of 400; equal shares would cry mismatch
    assert not srm(per_user(d), {"control": 0.5, "small": 0.5}).ok
    assert d.exposures["design_id"].n_unique() == 1 and design_changes(d) == []
    report = write_report(d, tmp_path / "report").read_text()
    assert "SAMPLE RATIO MISMATCH" not in report.upper() and "0.9" in report
    cfg2 = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"salt": "s2"})})
    _serve_once(cfg2, [f"visitor{i}" for i in range(400, 450)])
    d = load(logs)
    changes = design_changes(d)
    assert len(changes) == 1 and "salt changed" in changes[0], changes
    assert d.exposures["design_id"].n_unique() == 2
    assert "the design changed mid-run" in write_report(d, tmp_path / "report2").read_text()
    one = tmp_path / "one-arm"
    _serve_once(trained.model_copy(update={"experiment": trained.experiment.model_validate(
        {"log_dir": str(one), "flush_s": 0.5})}), ["u0001", "u0002"])
    with pytest.raises(ValueError, match="one arm .* nothing to compare"):
        write_report(load(one), tmp_path / "report3")


def test_real_traffic_with_returning_users_and_an_unequal_split_is_read_as_preregistered(trained, tmp_path):
    """Returning users (1-20 requests over 14 simulated days, position-biased clicks, a planted +100% click lift in
    the 10% arm) sent to a real service: the report checks the split against the recorded 90/10 shares, decides on
    the pre-registered primary metric, shows the daily sequential looks (the planted effect allows a decision),
    tests the guardrails from the logged latencies, and corrects the secondary metrics; `experiment plan` sizes a
    new run from the same logs; an interleaved run of the same arms is reported on its own, in its own arm names."""
    import json

    from typer.testing import CliRunner

    from recsys.cli import app as cli
    from recsys.experiments.analysis import load, per_user
    from recsys.experiments.report import write_report
    from recsys.experiments.traffic import TrafficSpec, drive

    logs = tmp_path / "logs"
    exp = {"name": "returning", "salt": "r1", "log_dir": str(logs), "flush_s": 0.5, "primary_metric": "clicks",
           "mde": 0.5, "guardrails": {"latency_p99_ms": 2000},
           "arms": [{"name": "control", "share": 0.9}, {"name": "treatment", "share": 0.1}]}
    cfg = trained.model_copy(update={"experiment": trained.experiment.model_validate(exp)})
    spec = TrafficSpec(users=600, days=14, mean_requests=5, effect={"treatment": 1.0}, seed=1, concurrency=8)
    with served(cfg) as base:
        run = drive(base, spec, headers={"X-API-Key": KEY})
    assert run.errors == 0 and run.requests > 2 * spec.users and set(run.arms) == {"control", "treatment"}
    d = load(logs)
    users = per_user(d)
    assert users["requests"].max() > 5 and users["requests"].mean() > 2  # repeat visitors, in the logs
    assert d.exposures["latency_ms"].is_not_null().all() and d.exposures["error"].is_null().all()
    report = write_report(d, tmp_path / "report").read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["srm_p"] > 0.001 and "SAMPLE RATIO MISMATCH" not in report.upper()
    assert "The pre-registered decision: clicks" in report and "q_value" in report and "LOG ROWS WERE DROPPED" not in report
    seq = summary["sequential"]
    assert len(seq["looks"]) == 14 and seq["decision_day"] is not None and summary["primary"]["diff"] > 0
    assert all(g["ok"] for g in summary["guardrails"]), summary["guardrails"]
    plan = CliRunner().invoke(cli, ["experiment", "plan", "--logs", str(logs), "--mde", "0.2", "--shares", "0.9,0.1"])
    assert plan.exit_code == 0 and "day  14" in plan.output and "-> " in plan.output, plan.output
    il_logs = tmp_path / "il"
    il = trained.model_copy(update={"experiment": trained.experiment.model_validate(
        {**exp, "name": "returning-il", "mode": "interleave", "log_dir": str(il_logs),
         "arms": [{"name": "treatment", "share": 0.5}, {"name": "control", "share": 0.5}]})})
    with served(il) as base:
        assert drive(base, TrafficSpec(users=80, days=3, seed=2), headers={"X-API-Key": KEY}).errors == 0
    il_report = write_report(load(il_logs), tmp_path / "il-report").read_text()
    assert "Interleaving report" in il_report and "'treatment' and 'control'" in il_report
    both = write_report(d, tmp_path / "both", interleaved=load(il_logs)).read_text()
    assert "## 9. Interleaving" in both


def test_a_replayed_request_reads_user_statistics_as_of_its_own_time(trained, monkeypatch):
    """A request that says when it happens (a replay's ``at``) gets the user's statistics as of then, not as of
    the wall clock (a replayed user would otherwise look years older to the model than in training)."""
    from features.inputs import user_stat_matrix
    from recsys import contract
    from serving import service
    from serving.service import Query, Recommender

    rec = Recommender.load(trained)
    seen = []

    def spy(n, mean, first, at):
        seen.append(np.broadcast_to(np.asarray(at, np.float64), np.shape(n)).copy())
        return user_stat_matrix(n, mean, first, at)

    monkeypatch.setattr(service, "user_stat_matrix", spy)
    then = 1_704_067_200.0 + 30 * 86400
    users = ["heavy", "u0001"]
    replies = rec.recommend_many([Query(users[0], 5, at=then), Query(users[1], 5)])
    assert all(r.items for r in replies)
    assert seen[0][0] == then and abs(seen[0][1] - time.time()) < 120
    stats_then = user_stat_matrix([520], [1.0], [1_704_067_200.0], then)
    stats_now = user_stat_matrix([520], [1.0], [1_704_067_200.0], time.time())
    days = contract.user_stat("log_days_since_first")
    assert stats_then[0, days] < stats_now[0, days]  # fewer days since the first interaction: what the tower reads


def test_the_ranking_stage_is_served_once_fitted_and_a_bad_bundle_leaves_the_two_tower_serving(trained, tmp_path):
    """`recsys ranker fit` on the served catalog, then a real service with serve.ranker = "on": a known user's
    reply is ordered by the multi-source ranker (as the in-process ranker orders that user's stored history),
    never a seen or excluded item, under concurrent requests; a request may opt out; an unknown user's recent
    items are its input. A corrupt bundle at the next reload is refused with its reason and the two-tower goes on
    serving. Runs last in this module: it removes the ranker it wrote."""
    from recsys.data import load_dataset
    from recsys.ranking import ServedRanker, folder_of

    cfg = trained
    conf = tmp_path / "ranker.toml"
    conf.write_text('[ranker]\nval_rounds = 3\ntrain_rounds = 6\nper_source = 20\n[serve]\nranker = "on"\n')
    folder = folder_of(cfg)
    try:
        done = subprocess.run([sys.executable, "-m", "recsys.cli", "ranker", "fit", "--workdir", str(cfg.workdir),
                               "--config", str(conf)], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "serve.ranker=auto serves:" in done.stdout and (folder / "report.json").exists()
        # the verdict also weighs the two-tower the demo kept, on the validation questions it did not learn from
        # (each user's last 2: LOO's validation and test)
        report = json.loads((folder / "report.json").read_text())
        tt = report["rivals"]["two-tower"]
        assert list(report["rivals"]) == ["two-tower"] and "no two-tower kept" not in done.stdout
        assert tt["questions"] == 2 * tt["users"] and tt["questions"] < report["sets"]["val"]["questions"]
        assert 0 < tt["two-tower"]["NDCG@10"]["mean"] <= 1 and tt["ranker"]["NDCG@10"]["mean"] > 0
        d = tt["ranker_minus"]["NDCG@10"]
        assert d["low"] <= d["mean"] <= d["high"]
        ranker_wins = report["val"]["ranker"]["NDCG@10"]["mean"] > max(
            r["NDCG@10"]["mean"] for k, r in report["val"].items() if k != "ranker")
        assert report["served"] == ("two-tower" if ranker_wins and d["mean"] <= 0 else
                                    "ranker" if ranker_wins else report["best_single_on_val"])
        port = free_port()
        env = {**os.environ, "RECSYS_API_KEYS": KEY, "RECSYS_ADMIN_KEYS": ADMIN}
        proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--workdir", str(cfg.workdir), "--config",
                                 str(conf), "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc)
            client = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=30)
            assert "fitted" in client.get("/healthz").json()["ranker"]
            frame = load_dataset(cfg).interactions.frame.sort("timestamp")
            users = frame["user_id"].unique().sort().to_list()[:12]
            r = client.post("/recommend", json={"user_id": users[0], "k": 10}).json()
            assert r["ranked_by"] == "ranker" and r["reranked"] and len(r["items"]) == 10, r
            assert {"ranker_sources_ms", "ranker_model_ms"} <= set(r["timings_ms"])
            mine = frame.filter(pl.col("user_id") == users[0])["item_id"].to_list()
            got = [i["item_id"] for i in r["items"]]
            assert not set(got) & set(mine)
            # the same ranker in this process, on the user's stored history (the last 20 in order, all as seen)
            ranker = ServedRanker.load(folder)
            idx = {i: k for k, i in enumerate(ranker.item_ids)}
            seq = np.array([idx[i] for i in mine], np.int64)
            rows, _, _ = ranker.rank(seq[-cfg.features.recent_items:], seq, len(seq), time.time(), 10)
            assert got == [ranker.item_ids[k] for k in rows]
            again = client.post("/recommend", json={"user_id": users[0], "k": 10, "exclude": got[:3]}).json()
            assert not set(got[:3]) & {i["item_id"] for i in again["items"]} and len(again["items"]) == 10
            assert client.post("/recommend", json={"user_id": users[0], "ranker": False}).json()["ranked_by"] == "two-tower"
            new = client.post("/recommend", json={"user_id": "someone-new", "recent_item_ids": mine[-3:][::-1]}).json()
            assert new["ranked_by"] == "ranker" and new["fallback"] == "request_history" and new["items"]
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda u: client.post("/recommend", json={"user_id": u, "k": 10}), users * 4))
            assert all(x.status_code == 200 and x.json()["ranked_by"] == "ranker" for x in replies)
            # a corrupt bundle: the reload refuses the ranker, says why, and the two-tower serves
            (folder / "ranker.joblib").write_bytes(b"truncated")
            admin = {"X-API-Key": ADMIN}
            before = client.get("/admin/status", headers=admin).json()["reloads"]
            assert client.post("/admin/reload", headers=admin, json={"version": "1"}).status_code == 202
            deadline = time.time() + 120
            while client.get("/admin/status", headers=admin).json()["reloads"] == before and time.time() < deadline:
                time.sleep(0.2)
            assert "refused" in client.get("/healthz").json()["ranker"]
            after = client.post("/recommend", json={"user_id": users[0], "k": 10}).json()
            assert after["ranked_by"] == "two-tower" and len(after["items"]) == 10
            asked = client.post("/recommend", json={"user_id": users[0], "ranker": True})
            assert asked.status_code == 409 and "refused" in asked.json()["detail"]
            client.close()
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
