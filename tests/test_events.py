"""The interaction event log, hammered as the service uses it: many threads and several processes appending at
once (one user, repeated event ids), on SQLite and on a real redis-server; what the nightly and training read."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from recsys.events import Event, RedisEventLog, SqliteEventLog, with_events

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "redis"])
def make_log(request, tmp_path):
    """A function opening one more handle on the same log (as each worker process does)."""
    if request.param == "sqlite":
        return lambda: SqliteEventLog(tmp_path / "events.db")
    conn, prefix = request.getfixturevalue("redis_connection"), f"test:{uuid.uuid4().hex[:8]}"
    return lambda: RedisEventLog(conn, prefix)


def _append_many(args) -> list[tuple[int, bool]]:
    kind, where, prefix, ids = args
    log = SqliteEventLog(where) if kind == "sqlite" else RedisEventLog(where, prefix)
    out = [(a.seq, a.new) for a in (log.append(Event.new("u1", f"item{i % 7}", T0 - timedelta(seconds=i), event_id=e))
                                    for i, e in ids)]
    log.close()
    return out


def test_concurrent_appends_keep_every_event_exactly_once(make_log):
    log = make_log()
    ids = [(i, f"e{i % 300}") for i in range(600)]  # every event id sent twice, in shuffled threads
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda x: log.append(Event.new("u1", f"item{x[0] % 7}", T0 + timedelta(seconds=x[0] % 50),
                                                               event_id=x[1])), ids))
    assert sum(r.new for r in results) == 300
    seqs = {}
    for (_, e), r in zip(ids, results):
        assert seqs.setdefault(e, r.seq) == r.seq  # a retry answers the first append's sequence
    frame = log.read()
    assert frame.height == 300 and frame["event_id"].n_unique() == 300 and frame["seq"].is_unique().all()
    assert log.max_seq() == frame["seq"].max()
    # the user's events come back in the order they happened (out-of-order arrivals included)
    evs = log.user_events(["u1", "nobody"], {})["u1"]
    assert len(evs) == 300 and [e.timestamp for _, e in evs] == sorted(e.timestamp for _, e in evs)
    after = sorted(seqs.values())[150]
    assert all(s > after for s, _ in log.user_events(["u1"], {"u1": after})["u1"])
    assert log.read(after=after).height == 300 - 151 and log.read(until=after).height == 151


def test_worker_processes_share_one_log(make_log, tmp_path, request):
    log = make_log()
    kind = "sqlite" if isinstance(log, SqliteEventLog) else "redis"
    where = str(log.path) if kind == "sqlite" else request.getfixturevalue("redis_connection")
    prefix = getattr(log, "prefix", "")
    chunks = [[(i, f"p{i % 200}") for i in range(w, 400, 4)] for w in range(4)]  # ids repeat across processes
    with mp.get_context("spawn").Pool(4) as pool:
        results = [r for chunk in pool.map(_append_many, [(kind, where, prefix, c) for c in chunks]) for r in chunk]
    assert sum(new for _, new in results) == 200
    frame = log.read()
    assert frame.height == 200 and sorted(frame["event_id"].to_list()) == sorted(f"p{i}" for i in range(200))


def test_the_dataset_plus_the_log_counts_each_event_once(synthetic, tmp_path):
    log = SqliteEventLog(tmp_path / "events.db")
    items = synthetic.catalog.ids
    log.append(Event.new("u-new", items[0], T0, event_id="a"))
    log.append(Event.new("u-new", items[1], T0 + timedelta(hours=1), event_id="b"))
    log.append(Event.new("u-new", items[1], T0 + timedelta(hours=1), event_id="b"))  # a retry
    log.append(Event.new("u-new", "no-such-item", T0, event_id="c"))
    ds, n = with_events(synthetic, log)
    assert n == 2 and ds.report.count("events for items not in the catalog (left out)") == 1
    f = ds.interactions.frame
    assert f.height == synthetic.interactions.frame.height + 2
    mine = f.filter(pl.col("user_id") == "u-new")
    assert mine["item_id"].to_list() == items[:2] and mine["seq"].to_list() == [1, 2]
    assert f.filter(pl.col("user_id") != "u-new")["seq"].max() == 0
    assert with_events(synthetic, log, until=1)[1] == 1
