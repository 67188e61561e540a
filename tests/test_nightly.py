"""The nightly job as a scheduler meets it: publish, idempotent rerun, SIGKILL mid-embedding, in the feature writes
and before the publish, the service's events folded in exactly once, dead letters, quarantine and the failure
threshold's exit code, the lock, and the Ray engine's parity with the local one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from recsys.cli import app as cli
from recsys.config import Config
from recsys.manifest import read_published
from tests.conftest import small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    from recsys.data.synthetic import SyntheticSpec, generate

    return generate(tmp_path_factory.mktemp("nightly-data"), SyntheticSpec(n_items=64, n_users=20, seed=7,
                                                                          share_audio=0.1, share_video=0.05))


def config(workdir: Path, data: Path, **nightly) -> Config:
    return small_config(workdir, data={"source": "synthetic", "path": str(data)},
                        nightly={"batch_items": 16, **nightly})


def cli_nightly(cfg: Config, kill_at: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("RECSYS_NIGHTLY_KILL_AT", None)
    if kill_at:
        env["RECSYS_NIGHTLY_KILL_AT"] = kill_at
    path = cfg.workdir / "run.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'workdir = "{cfg.workdir}"\n[data]\nsource = "synthetic"\npath = "{cfg.data.path}"\n'
                    f'[nightly]\nbatch_items = {cfg.nightly.batch_items}\nfailure_threshold = {cfg.nightly.failure_threshold}\n')
    return subprocess.run([sys.executable, "-m", "recsys.cli", "nightly", "--config", str(path), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def vectors(cfg: Config) -> pl.DataFrame:
    m = read_published(cfg.workdir)
    return pl.read_parquet(cfg.workdir / m.vectors["path"]).sort("item_id")


def test_publish_then_an_unchanged_rerun_embeds_nothing(catalog, tmp_path):
    from recsys.flows.nightly import run_nightly

    cfg = config(tmp_path / "w", catalog)
    first = run_nightly(cfg)
    assert first.exit_code == 0 and first.published and first.counts["new"] == 64 and first.counts["failed"] == 0
    v = vectors(cfg)
    assert v.height == 64 and np.isfinite(v["vector"].to_numpy()).all()
    m1 = read_published(cfg.workdir)
    second = run_nightly(cfg)
    assert second.counts["embedded"] == 0 and second.counts["unchanged"] == 64 and second.published is None
    assert read_published(cfg.workdir).run_id == m1.run_id
    dry = run_nightly(cfg, dry_run=True)
    assert dry.counts["unchanged"] == 64 and read_published(cfg.workdir).run_id == m1.run_id


def test_sigkill_mid_embedding_then_rerun_equals_an_uninterrupted_run(catalog, tmp_path):
    killed = config(tmp_path / "killed", catalog)
    r = cli_nightly(killed, "embed:2")
    assert r.returncode == -9, r.stderr[-2000:]
    assert read_published(killed.workdir) is None
    r = cli_nightly(killed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(_last_summary(killed))
    assert summary["counts"]["cache_hits"] >= 32  # two committed batches were not embedded again
    clean = config(tmp_path / "clean", catalog)
    assert cli_nightly(clean).returncode == 0
    a, b = vectors(killed), vectors(clean)
    assert a["item_id"].to_list() == b["item_id"].to_list() and a.height == 64
    # within the precision of the backbone-feature cache (float16): a resumed run reads some features back from it
    np.testing.assert_allclose(a["vector"].to_numpy(), b["vector"].to_numpy(), atol=5e-4)


def _last_summary(cfg: Config) -> str:
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["nightly"], order_by=["start_time DESC"], max_results=1)
    return Path(mlflow.artifacts.download_artifacts(run_id=runs.iloc[0]["run_id"], artifact_path="summary.json")).read_text()


def test_a_crash_before_the_publish_leaves_the_old_state_served(catalog, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(catalog, data)
    cfg = config(tmp_path / "w", data)
    assert cli_nightly(cfg).returncode == 0
    before = read_published(cfg.workdir)
    lines = (data / "items.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["parts"] = [{"text": "a brand new description of ocean waves"}]
    (data / "items.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    r = cli_nightly(cfg, "indexed")
    assert r.returncode == -9
    after = read_published(cfg.workdir)
    assert after.run_id == before.run_id and (cfg.workdir / after.vectors["path"]).exists()
    r = cli_nightly(cfg)
    assert r.returncode == 0
    new = read_published(cfg.workdir)
    assert new.run_id != before.run_id and new.counts["changed"] == 1 and new.previous == before.run_id


def test_failures_go_to_dead_letters_and_past_the_threshold_nothing_is_published(catalog, tmp_path):
    from recsys.flows.nightly import read_dead_letters

    data = tmp_path / "data"
    shutil.copytree(catalog, data)
    items = [json.loads(line) for line in (data / "items.jsonl").read_text().splitlines()]
    broken = next(i for i in items if any("image" in p for p in i["parts"]))
    img = next(p["image"] for p in broken["parts"] if "image" in p)
    raw = bytearray((data / "media" / img).read_bytes())
    raw[60:-20] = bytes(len(raw) - 80)  # corrupt inside: the loader's header/end-marker check passes, decoding fails
    (data / "media" / img).write_bytes(bytes(raw))
    cfg = config(tmp_path / "w", data)
    r = cli_nightly(cfg)
    assert r.returncode == 3, r.stdout[-2000:]  # 1 of 64 = 1.6% > 1%
    assert read_published(cfg.workdir) is None
    dead = read_dead_letters(cfg)
    assert list(dead) == [broken["item_id"]] and dead[broken["item_id"]]["attempts"] == 1
    assert dead[broken["item_id"]]["stage"] == "embed" and dead[broken["item_id"]]["reason"]
    relaxed = config(tmp_path / "w", data, failure_threshold=0.05)
    assert cli_nightly(relaxed).returncode == 0
    assert read_dead_letters(cfg)[broken["item_id"]]["attempts"] == 2  # retried, failed again
    v = vectors(cfg)
    assert v.height == 63 and broken["item_id"] not in v["item_id"].to_list()
    assert np.isfinite(v["vector"].to_numpy()).all()
    # the third failure in a row quarantines it: not counted against the threshold, so the strict run publishes
    # once the catalog changes elsewhere; after that it is not retried until its own content changes
    other = next(i for i in items if i["item_id"] != broken["item_id"])
    other["parts"] = [{"text": "a fresh description of mountain rivers"}]
    (data / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    r = cli_nightly(cfg)
    assert r.returncode == 0, r.stdout[-2000:]
    dl = read_dead_letters(cfg)[broken["item_id"]]
    assert dl["attempts"] == 3 and dl["quarantined"] and json.loads(_last_summary(cfg))["counts"]["quarantined"] == 1
    r = cli_nightly(cfg)
    summary = json.loads(_last_summary(cfg))
    assert r.returncode == 0 and summary["counts"]["quarantined"] == 1 and summary["counts"]["embedded"] == 0
    assert read_dead_letters(cfg)[broken["item_id"]]["attempts"] == 3  # not tried again
    broken["parts"] = [{"text": "the same item, now with readable content"}]
    (data / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    assert cli_nightly(cfg).returncode == 0
    assert broken["item_id"] not in read_dead_letters(cfg) and vectors(cfg).height == 64


def test_a_second_nightly_is_refused_while_one_holds_the_lock(catalog, tmp_path):
    from recsys.flows.nightly import EXIT_LOCKED, NightlyLock

    cfg = config(tmp_path / "w", catalog)
    lock = NightlyLock(cfg)
    assert lock.acquire() is None
    try:
        r = cli_nightly(cfg)
        assert r.returncode == EXIT_LOCKED and "another nightly holds" in r.stdout + r.stderr
        assert read_published(cfg.workdir) is None
    finally:
        lock.release()
    assert cli_nightly(cfg).returncode == 0


def online_now(cfg: Config, users: list[str]):
    """What serving reads for ``users``: the published space's online rows plus the event log past them."""
    from features.store import FeatureRepo
    from recsys.events import open_event_log

    m = read_published(cfg.workdir)
    v = vectors(cfg)
    row = {i: r for r, i in enumerate(v["item_id"].to_list())}
    arr = v["vector"].to_numpy()
    repo = FeatureRepo(cfg, m.embedder["backend"], m.embedder["model_version"], m.embedder["dim"], name="serve")
    return repo.online_users_now(users, open_event_log(cfg), lambda i: arr[row[i]] if i in row else None)


@pytest.mark.parametrize("kill_at", ["features:offline", "verified", "features:online"])
def test_accepted_events_reach_the_nightly_and_a_kill_at_any_stage_counts_none_twice(catalog, tmp_path, kill_at):
    """Events in the log (out of order, one retried) are in the users' features at once; a nightly killed at any
    stage leaves the old manifest published and every user's features counting each event exactly once; the
    rerun folds them into the offline store, the rows and the watermark, and rewrites only those users."""
    from recsys.events import Event, open_event_log

    cfg = config(tmp_path / "w", catalog)
    assert cli_nightly(cfg).returncode == 0
    before = read_published(cfg.workdir)
    ids = vectors(cfg)["item_id"].to_list()
    inter = pl.read_csv(catalog / "interactions.csv", schema_overrides={"user_id": pl.Utf8, "item_id": pl.Utf8})
    users = sorted(inter["user_id"].unique().to_list())[:3]
    counts = {u: inter.filter(pl.col("user_id") == u).height for u in users}
    log = open_event_log(cfg)
    t = datetime.now(timezone.utc)
    sent = {u: [ids[-1 - k], ids[-5 - k]] for k, u in enumerate(users)}
    for u in users:
        log.append(Event.new(u, sent[u][0], t, event_id=f"{u}-a"))
        log.append(Event.new(u, sent[u][1], t - timedelta(days=400), event_id=f"{u}-b"))  # an older client time
        log.append(Event.new(u, sent[u][1], t - timedelta(days=400), event_id=f"{u}-b"))  # a retry: stored once

    def check():
        now = online_now(cfg, users)
        for r, u in enumerate(users):
            assert set(sent[u]) <= set(now.seen_item_ids[r])
            assert now.history_count[r] == counts[u] + 2 and now.n_interactions[r] == counts[u] + 2

    check()
    r = cli_nightly(cfg, kill_at)
    assert r.returncode == -9, r.stdout[-2000:] + r.stderr[-2000:]
    assert read_published(cfg.workdir).run_id == before.run_id
    check()  # whatever the kill left, no event is missing or counted twice
    r = cli_nightly(cfg)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    after = read_published(cfg.workdir)
    assert after.run_id != before.run_id and after.events_until == log.max_seq() and after.counts["events"] == 6
    now = online_now(cfg, users)
    assert (now.events_folded == 0).all()  # the rows include the events themselves now
    check()
    seen = pl.read_parquet(next((cfg.feast_dir / "serve" / "data").glob("user_seen.parquet")))
    for u in users:
        assert set(sent[u]) <= set(seen.filter(pl.col("user_id") == u)["seen_item_ids"][0].to_list())
    # only the three users with events were rewritten online
    assert {k: v for k, v in after.feast["materialized"].items() if k.startswith("user_")} == \
        {k: 3 for k in after.feast["materialized"] if k.startswith("user_")}


def test_embed_exits_non_zero_when_every_item_fails_and_stores_nothing(tmp_path, monkeypatch):
    from tests.fake_gemini import Fault, FakeGemini

    server = FakeGemini()
    try:
        server.faults = [Fault("short")] * 1000  # every answer has too few embeddings
        monkeypatch.setenv("GEMINI_API_KEY", server.api_key)
        toml = tmp_path / "g.toml"
        toml.write_text(f'workdir = "{tmp_path / "w"}"\n[data]\nmax_users = 5\n[embedder]\nbackend = "gemini"\n'
                        f'dim = 128\ngemini_base_url = "{server.url}"\ngemini_max_retries = 0\n')
        result = CliRunner().invoke(cli, ["embed", "--config", str(toml)])
        assert result.exit_code == 3, result.output[-2000:]
        assert "failed to embed" in result.output
        assert not (tmp_path / "w" / "embeddings" / "items.parquet").exists()
    finally:
        server.close()


def test_ray_engine_gives_the_local_engines_vectors(catalog, tmp_path):
    pytest.importorskip("ray")
    from recsys.flows.nightly import run_nightly

    local = config(tmp_path / "local", catalog)
    ray_cfg = config(tmp_path / "ray", catalog, engine="ray", ray_actors=2)
    assert run_nightly(local).exit_code == 0
    s = run_nightly(ray_cfg)
    assert s.exit_code == 0 and s.counts["embedded"] == 64
    a, b = vectors(local), vectors(ray_cfg)
    assert a["item_id"].to_list() == b["item_id"].to_list()
    np.testing.assert_allclose(a["vector"].to_numpy(), b["vector"].to_numpy(), atol=1e-5)


def test_ray_actors_spend_one_gemini_request_budget(catalog, tmp_path, monkeypatch):
    """Two Ray actors, each with a thread pool as large as the whole budget: the server never sees more
    requests in flight than ``gemini_concurrency`` (two separate budgets would reach twice that)."""
    pytest.importorskip("ray")
    from recsys.flows.nightly import run_nightly
    from tests.fake_gemini import FakeGemini

    server = FakeGemini(delay_s=0.15)
    try:
        monkeypatch.setenv("GEMINI_API_KEY", server.api_key)
        cfg = small_config(tmp_path / "w", data={"source": "synthetic", "path": str(catalog)},
                           embedder={"backend": "gemini", "dim": 128, "gemini_base_url": server.url,
                                     "gemini_batch_size": 2, "gemini_concurrency": 3},
                           nightly={"batch_items": 16, "engine": "ray", "ray_actors": 2})
        s = run_nightly(cfg)
        assert s.counts["embedded"] == 64 and s.counts["failed"] == 0
        assert 2 <= server.max_in_flight <= 3, server.max_in_flight
        assert s.counts["budget_max_in_flight"] <= 3
        assert sum(r["n"] for r in server.requests) == 64
    finally:
        server.close()
