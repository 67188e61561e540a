"""The interaction event log: the source of truth for every interaction the service accepts.

Each event the service accepts is appended durably (committed and synced before the 2xx) with an event id
(the client's idempotency key, or a generated one), and gets a sequence number ``seq`` (increasing in the order
events were accepted; not dense: a refused duplicate may use one up). Everything downstream reads this log:

- serving folds a user's events newer than their stored feature row (``events_seq`` on each user row) into
  the features it reads, so an accepted event is in the user's seen set and history at once, and no request
  ever read-modify-writes a feature row (nothing to lose under concurrent pushes);
- the nightly and ``recsys train`` read the dataset plus the log (deduplicated by event id), and the nightly
  records the highest ``seq`` it folded in as its watermark.

Two implementations behind one interface:

- :class:`SqliteEventLog` (embedded default, ``<workdir>/events/events.db``): one SQLite table in WAL mode,
  ``synchronous=FULL``; an append is one transaction, so it is there whole or not at all; the event id is a
  UNIQUE key, so a retried event is stored once, whichever worker process takes the retry.
- :class:`RedisEventLog` (teams past one machine): a Redis Stream (``XADD`` with the sequence as its id) plus a
  per-user sorted set and an idempotency key, all written by one server-side script, so the same rules hold
  across machines. Durability is the Redis server's (``appendonly yes``, ``appendfsync always`` for the same
  guarantee as SQLite's).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import polars as pl

EVENT_SCHEMA = {
    "seq": pl.Int64, "event_id": pl.Utf8, "user_id": pl.Utf8, "item_id": pl.Utf8, "event": pl.Utf8,
    "value": pl.Float32, "timestamp": pl.Datetime("us", "UTC"), "received_at": pl.Datetime("us", "UTC"),
    "request_id": pl.Utf8,
}


def _us(t: datetime) -> int:
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    return int(round(t.timestamp() * 1_000_000))


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, timezone.utc)


@dataclass(frozen=True)
class Event:
    """One accepted interaction. ``timestamp`` is when it happened (the client's), ``received_at`` when the
    service took it; an experiment outcome is an event that quotes the ``request_id`` of a /recommend reply."""

    event_id: str
    user_id: str
    item_id: str
    timestamp: datetime
    event: str = "click"
    value: float | None = None
    request_id: str | None = None
    received_at: datetime | None = None

    @classmethod
    def new(cls, user_id: str, item_id: str, timestamp: datetime | None = None, event_id: str | None = None,
            **kw) -> "Event":
        now = datetime.now(timezone.utc)
        ts = timestamp or now
        ts = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
        return cls(event_id or uuid.uuid4().hex, user_id, item_id, ts.astimezone(timezone.utc), received_at=now, **kw)


@dataclass(frozen=True)
class Appended:
    """What an append did: the event's sequence number, and whether it was new (False: a retry, stored once)."""

    seq: int
    new: bool


class EventLog(Protocol):
    def append(self, event: Event) -> Appended: ...

    def user_events(self, user_ids: list[str], after: dict[str, int]) -> dict[str, list[tuple[int, Event]]]: ...

    def read(self, after: int = 0, until: int | None = None) -> pl.DataFrame: ...

    def max_seq(self) -> int: ...

    def close(self) -> None: ...


# SQLite ----------------------------------------------------------------------------------------------------------
_DDL = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event TEXT NOT NULL,
    value REAL,
    ts_us INTEGER NOT NULL,
    received_us INTEGER NOT NULL,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
"""


class SqliteEventLog:
    """The embedded event log: one SQLite file shared by every worker process and thread (one connection per
    thread; SQLite's own locking serializes writers across processes)."""

    def __init__(self, path: str | Path, sync: bool = True, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync, self.busy_timeout_s = sync, busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn:
            conn.executescript(_DDL)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.sync else 'NORMAL'}")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def append(self, event: Event) -> Appended:
        """Store ``event`` unless its id is already there; committed (and synced) when this returns."""
        conn = self._conn()
        received = event.received_at or datetime.now(timezone.utc)
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (event_id, user_id, item_id, event, value, ts_us, received_us, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (event.event_id, event.user_id, event.item_id, event.event, event.value, _us(event.timestamp),
                 _us(received), event.request_id))
            if cur.rowcount == 1:
                out = Appended(int(cur.lastrowid), True)
            else:
                row = conn.execute("SELECT seq FROM events WHERE event_id = ?", (event.event_id,)).fetchone()
                out = Appended(int(row[0]), False)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def user_events(self, user_ids: list[str], after: dict[str, int]) -> dict[str, list[tuple[int, Event]]]:
        """Each user's events with ``seq`` above ``after[user]`` (0 when absent), in the order they happened."""
        conn = self._conn()
        out: dict[str, list[tuple[int, Event]]] = {}
        for u in dict.fromkeys(user_ids):
            rows = conn.execute(
                "SELECT seq, event_id, user_id, item_id, event, value, ts_us, received_us, request_id FROM events "
                "WHERE user_id = ? AND seq > ? ORDER BY ts_us, seq", (u, int(after.get(u, 0)))).fetchall()
            if rows:
                out[u] = [(r[0], _event(r[1:])) for r in rows]
        return out

    def read(self, after: int = 0, until: int | None = None) -> pl.DataFrame:
        """Events with ``after < seq <= until`` as a frame (EVENT_SCHEMA), in sequence order."""
        conn = self._conn()
        rows = conn.execute(
            "SELECT seq, event_id, user_id, item_id, event, value, ts_us, received_us, request_id FROM events "
            "WHERE seq > ? AND seq <= ? ORDER BY seq", (int(after), int(until if until is not None else 2**62))).fetchall()
        return _frame(rows)

    def max_seq(self) -> int:
        row = self._conn().execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
        self._local = threading.local()


def _event(r) -> Event:
    event_id, user_id, item_id, event, value, ts_us, received_us, request_id = r
    return Event(event_id, user_id, item_id, _dt(ts_us), event, value, request_id, _dt(received_us))


def _frame(rows: list) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=EVENT_SCHEMA)
    cols = list(zip(*rows))
    return pl.DataFrame({
        "seq": cols[0], "event_id": cols[1], "user_id": cols[2], "item_id": cols[3], "event": cols[4],
        "value": pl.Series(cols[5], dtype=pl.Float64),
        "timestamp": pl.Series(cols[6], dtype=pl.Int64), "received_at": pl.Series(cols[7], dtype=pl.Int64),
        "request_id": pl.Series(cols[8], dtype=pl.Utf8),
    }).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")), pl.col("received_at").cast(pl.Datetime("us", "UTC")),
                    pl.col("value").cast(pl.Float32)).select(list(EVENT_SCHEMA))


# Redis -------------------------------------------------------------------------------------------------------------
_APPEND = """
local existing = redis.call('GET', KEYS[1])
if existing then return {tonumber(existing), 0} end
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], seq)
redis.call('XADD', KEYS[3], seq .. '-1', 'e', ARGV[1])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
return {seq, 1}
"""


class RedisEventLog:
    """The event log on Redis: stream ``<prefix>:stream`` (id ``<seq>-1``, field ``e``: the event as JSON), a
    sorted set per user (score = seq) for the serving-side fold, ``<prefix>:seq`` and ``<prefix>:id:<event id>``."""

    def __init__(self, connection: str, prefix: str = "recsys:events"):
        import redis

        host, _, rest = connection.partition(":")
        port = int(rest.split(",")[0] or 6379) if rest else 6379
        self.client = redis.Redis(host=host or "localhost", port=port)
        self.prefix = prefix
        self._append = self.client.register_script(_APPEND)

    def _user_key(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def append(self, event: Event) -> Appended:
        e = asdict(event)
        e["timestamp"], e["received_at"] = _us(event.timestamp), _us(event.received_at or datetime.now(timezone.utc))
        payload = json.dumps(e, separators=(",", ":"))
        seq, new = self._append(keys=[f"{self.prefix}:id:{event.event_id}", f"{self.prefix}:seq", f"{self.prefix}:stream",
                                      self._user_key(event.user_id)], args=[payload])
        return Appended(int(seq), bool(new))

    def user_events(self, user_ids: list[str], after: dict[str, int]) -> dict[str, list[tuple[int, Event]]]:
        users = list(dict.fromkeys(user_ids))
        with self.client.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.zrangebyscore(self._user_key(u), f"({int(after.get(u, 0))}", "+inf", withscores=True)
            replies = pipe.execute()
        out = {}
        for u, rows in zip(users, replies):
            if rows:
                evs = [(int(s), _from_json(m)) for m, s in rows]
                out[u] = sorted(evs, key=lambda x: (x[1].timestamp, x[0]))
        return out

    def read(self, after: int = 0, until: int | None = None) -> pl.DataFrame:
        rows, start = [], f"({int(after)}-1" if after else "-"
        end = f"{int(until)}-1" if until is not None else "+"
        while True:
            chunk = self.client.xrange(f"{self.prefix}:stream", start, end, count=10_000)
            if not chunk:
                break
            for sid, fields in chunk:
                e = json.loads(fields[b"e"])
                rows.append((int(sid.split(b"-")[0]), e["event_id"], e["user_id"], e["item_id"], e["event"], e["value"],
                             e["timestamp"], e["received_at"], e["request_id"]))
            start = "(" + chunk[-1][0].decode()
        return _frame(rows)

    def max_seq(self) -> int:
        return int(self.client.get(f"{self.prefix}:seq") or 0)

    def close(self) -> None:
        self.client.close()


def _from_json(m: bytes) -> Event:
    e = json.loads(m)
    return Event(e["event_id"], e["user_id"], e["item_id"], _dt(e["timestamp"]), e["event"], e["value"], e["request_id"],
                 _dt(e["received_at"]))


def log_spec(cfg) -> dict:
    """Where ``cfg.events`` puts the log, resolved (an absolute path, the Redis connection): what a reader in
    another process or folder needs to open it (e.g. the experiment report, through the logs' events.json)."""
    ev = cfg.events
    if ev.backend == "redis":
        return {"backend": "redis", "redis_connection": ev.redis_connection or cfg.features.redis_connection,
                "redis_prefix": ev.redis_prefix}
    return {"backend": "sqlite", "path": str(Path(ev.path or cfg.workdir / "events" / "events.db").resolve()), "sync": ev.sync}


def open_log(spec: dict) -> EventLog:
    """The event log a :func:`log_spec` describes."""
    if spec["backend"] == "redis":
        return RedisEventLog(spec["redis_connection"], spec["redis_prefix"])
    return SqliteEventLog(spec["path"], sync=spec.get("sync", True))


def open_event_log(cfg) -> EventLog:
    """The event log ``cfg.events`` names (a :class:`recsys.config.Config`)."""
    return open_log(log_spec(cfg))


def as_interactions(events: pl.DataFrame, items: set[str] | None = None) -> tuple[pl.DataFrame, int]:
    """Events -> interaction rows (user_id, item_id, timestamp, value, seq), one per event id (the log stores each
    once; a frame assembled from several reads may repeat one). ``items``: keep only those item ids.

    Returns:
        (rows, number of events dropped for an item outside ``items``)."""
    rows = events.unique("event_id", keep="first", maintain_order=True)
    dropped = 0
    if items is not None:
        keep = rows["item_id"].is_in(list(items))
        dropped = int((~keep).sum())
        rows = rows.filter(keep)
    return rows.select("user_id", "item_id", "timestamp", "value", "seq"), dropped



def with_events(ds, log: EventLog, until: int | None = None):
    """The dataset plus the log's events up to ``until`` (all: None) as interactions, each event id once, with
    their ``seq`` (the dataset's own rows get 0); events whose item the catalog no longer has are left out and
    reported. Returns (dataset, events added)."""
    ev, dropped = as_interactions(log.read(0, until), set(ds.catalog.ids))
    if dropped:
        ds.report.add("events for items not in the catalog (left out)", [], count=dropped)
    if ev.height == 0:
        return ds, 0
    frame = pl.concat([ds.interactions.frame.with_columns(pl.lit(0, pl.Int64).alias("seq")),
                       ev.with_columns(pl.col("value").cast(pl.Float32))], how="vertical_relaxed")
    return ds._like(ds.catalog, frame), ev.height
