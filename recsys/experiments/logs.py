"""The exposure and outcome logs: what the service showed (one row per request) and what happened after
(one row per interaction), appended as date-partitioned parquet by a background thread so the request path
never waits on a disk.

    <logs>/exposures/date=YYYY-MM-DD/part-<pid>-<n>-<uuid>.parquet
    <logs>/outcomes/date=YYYY-MM-DD/part-<pid>-<n>-<uuid>.parquet   (logs from before the event log)
    <logs>/events.json   where the service's interaction event log is: its events that quote a request id are
                         the outcomes (recsys/events.py)
    <logs>/dropped/<pid>.json  rows a full queue dropped, per kind and arm (the report warns when there are any)
    <logs>/designs.jsonl the experiment's design (name, mode, salt, arms and shares, exploration) each time the
                         service started with a new one; every exposure row names its ``design_id``, so the
                         analysis reads the shares the split was made with, and sees a design changed mid-run

A part file appears complete or not at all (written to a temporary name, then renamed). Several worker
processes write side by side (the pid is in the name). A full queue drops rows and counts them (``dropped``)
rather than block a request.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

EXPOSURE_SCHEMA = {
    "request_id": pl.Utf8, "ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8, "experiment": pl.Utf8,
    "arm": pl.Utf8, "mode": pl.Utf8, "model": pl.Utf8, "known_user": pl.Boolean, "fallback": pl.Utf8,
    "items": pl.List(pl.Utf8),  # shown, in order: position = index + 1
    "scores": pl.List(pl.Float64),
    "propensities": pl.List(pl.Float64),  # P(item in the shown list) under the logging policy (1.0: greedy)
    "teams": pl.List(pl.Utf8),  # interleaving: the arm that contributed each item (else the arm)
    "pool_items": pl.List(pl.Utf8),  # exploration: the candidates it sampled from, with their scores
    "pool_scores": pl.List(pl.Float64),
    "temperature": pl.Float64,  # exploration's softmax temperature (null: greedy)
    "design_id": pl.Utf8,  # the design (designs.jsonl) in force when the reply was made (null: older logs)
    "latency_ms": pl.Float64,  # the arm's own time for this reply (model, features, search; not the HTTP layer)
    "error": pl.Utf8,  # a request the arm failed to answer: the error's type (no items); null for a reply
}
DESIGNS = "designs.jsonl"
DROPPED = "dropped"
OUTCOME_SCHEMA = {
    "request_id": pl.Utf8, "ts": pl.Datetime("us", "UTC"), "user_id": pl.Utf8, "item_id": pl.Utf8,
    "event": pl.Utf8, "value": pl.Float64,
}
KINDS = {"exposures": EXPOSURE_SCHEMA, "outcomes": OUTCOME_SCHEMA}


@dataclass
class LogWriter:
    """Buffers rows per kind and writes a part file every ``flush_rows`` rows or ``flush_s`` seconds."""

    root: Path
    flush_rows: int = 500
    flush_s: float = 5.0
    max_queue: int = 100_000
    dropped: int = 0
    written: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    dropped_by: dict = field(default_factory=dict)  # "<kind>/<arm>" -> rows dropped

    def __post_init__(self):
        self.root = Path(self.root)
        self._q: queue.Queue = queue.Queue(maxsize=self.max_queue)
        self._buf: dict[str, list[dict]] = {k: [] for k in KINDS}
        self._dropped_written: dict = {}  # the drop counts last written (written again only when they change)
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recsys-experiment-log", daemon=True)
        self._thread.start()

    def append(self, kind: str, row: dict) -> None:
        """Queue one row; never blocks (a full queue drops the row and counts it)."""
        try:
            self._q.put_nowait((kind, row))
        except queue.Full:
            self.dropped += 1
            key = f"{kind}/{row.get('arm') or '-'}"
            self.dropped_by[key] = self.dropped_by.get(key, 0) + 1

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            try:
                kind, row = self._q.get(timeout=0.2)
                self._buf[kind].append(row)
            except queue.Empty:
                pass
            due = time.monotonic() - last >= self.flush_s
            if due or any(len(b) >= self.flush_rows for b in self._buf.values()):
                self._flush()
                last = time.monotonic()
            if self._stop.is_set() and self._q.empty():
                self._flush()
                return

    def _flush(self) -> None:
        if self.dropped_by and self.dropped_by != self._dropped_written:  # this process's counts, replaced whole
            self._dropped_written = dict(self.dropped_by)
            from recsys.index import atomic_write_text

            (self.root / DROPPED).mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / DROPPED / f"{os.getpid()}.json", json.dumps(dict(self.dropped_by)))
        for kind, rows in self._buf.items():
            if not rows:
                continue
            self._buf[kind] = []
            frame = pl.DataFrame(rows, schema=KINDS[kind])
            for (day,), part in frame.group_by(pl.col("ts").dt.date(), maintain_order=True):
                folder = self.root / kind / f"date={day}"
                folder.mkdir(parents=True, exist_ok=True)
                self._seq += 1
                name = f"part-{os.getpid()}-{self._seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
                tmp = folder / f".{name}.tmp"
                part.write_parquet(tmp)
                os.replace(tmp, folder / name)
            self.written[kind] += len(rows)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop."""
        self._stop.set()
        self._thread.join(timeout)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(at: datetime | None) -> datetime:
    """``at`` as an aware UTC time (a naive one is taken as UTC); None: now."""
    if at is None:
        return now_utc()
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def design_of(e) -> dict:
    """What decides who sees what (an ExperimentConfig): no experiment is one arm, ``control``, with everyone."""
    arms = [{"name": a.name, "share": a.share, "alias": a.alias, "version": a.version} for a in e.arms] if e.name else \
        [{"name": "control", "share": 1.0, "alias": None, "version": None}]
    plan = {"primary_metric": e.primary_metric, "secondary_metrics": list(e.secondary_metrics), "mde": e.mde,
            "alpha": e.alpha, "power": e.power, "days": e.days, "guardrails": e.guardrails.model_dump()}
    return {"experiment": e.name, "mode": e.mode if e.name else "none", "salt": e.salt if e.name else None, "arms": arms,
            "explore": e.explore, "temperature": e.temperature if e.explore != "none" else None,
            "plan": plan}  # pre-registered: what the report decides on, fixed before the first reply


def record_design(root: str | Path, design: dict) -> str:
    """Append ``design`` to ``<root>/designs.jsonl`` unless it is the last one recorded; returns its id. One
    short line appended in one write (O_APPEND): workers starting together cannot interleave their lines."""
    design_id = hashlib.sha256(json.dumps(design, sort_keys=True).encode()).hexdigest()[:12]
    known = read_designs(root)
    if not known or known[-1]["design_id"] != design_id:
        Path(root).mkdir(parents=True, exist_ok=True)
        line = json.dumps({"design_id": design_id, "since": datetime.now(timezone.utc).isoformat(), **design}) + "\n"
        fd = os.open(Path(root) / DESIGNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    return design_id


def read_designs(root: str | Path) -> list[dict]:
    """The designs recorded beside the logs, oldest first ([] for logs from before design records)."""
    path = Path(root) / DESIGNS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_dropped(root: str | Path) -> dict[str, dict[str, int]]:
    """Rows the writers dropped (full queue), summed over processes: kind -> arm -> count ({} when none)."""
    out: dict[str, dict[str, int]] = {}
    for f in sorted((Path(root) / DROPPED).glob("*.json")):
        for key, n in json.loads(f.read_text()).items():
            kind, _, arm = key.partition("/")
            out.setdefault(kind, {})[arm] = out.get(kind, {}).get(arm, 0) + int(n)
    return out


def read_logs(root: str | Path, kind: str) -> pl.DataFrame:
    """Every part file of one kind (``exposures`` or ``outcomes``) as one frame (empty with the schema if none).

    Outcomes are the interaction event log's events that quote a request id (recsys.events: one mechanism for
    interactions and outcomes, each event once, nothing dropped), found through ``<root>/events.json``, which the
    service writes beside its exposure logs; logs written before that also hold outcome part files."""
    folder = Path(root) / kind
    files = sorted(folder.glob("date=*/part-*.parquet"))
    frames = [pl.read_parquet(f) for f in files]
    if kind == "outcomes" and (Path(root) / "events.json").exists():
        frames.append(outcomes_from_events(json.loads((Path(root) / "events.json").read_text())))
    if not frames:
        return pl.DataFrame(schema=KINDS[kind])
    return pl.concat(frames, how="diagonal_relaxed").select(list(KINDS[kind]))  # older parts: fewer columns


def outcomes_from_events(spec: dict) -> pl.DataFrame:
    """The event log's events that quote a request id, as outcome rows (OUTCOME_SCHEMA)."""
    from recsys.events import open_log

    log = open_log(spec)
    try:
        ev = log.read()
    finally:
        log.close()
    return (ev.filter(pl.col("request_id").is_not_null())
            .select("request_id", pl.col("timestamp").alias("ts"), "user_id", "item_id", "event", pl.col("value").cast(pl.Float64))
            .cast(OUTCOME_SCHEMA))


def write_event_log_pointer(root: str | Path, spec: dict) -> None:
    """``<root>/events.json``: where this service's event log is, so the report reads its outcomes there."""
    from recsys.index import atomic_write_text

    Path(root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(root) / "events.json", json.dumps(spec))
