"""What makes the nightly safe to run every night: one run at a time (a lock), the dead letters of items that
failed, the quarantine of items that fail run after run, and the named checkpoints the crash tests kill the job
at (recsys/flows/nightly.py uses them)."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime, timezone
from pathlib import Path

from recsys.config import Config


def checkpoint(name: str) -> None:
    """A named point between stages. ``RECSYS_NIGHTLY_KILL_AT=name`` SIGKILLs the process there (the
    crash tests use it to kill the job at an exact stage; nothing else reads it)."""
    if os.environ.get("RECSYS_NIGHTLY_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def dead_letter_path(cfg: Config) -> Path:
    return cfg.workdir / "nightly" / "dead_letters.jsonl"


def read_dead_letters(cfg: Config) -> dict[str, dict]:
    path = dead_letter_path(cfg)
    if not path.exists():
        return {}
    return {d["item_id"]: d for d in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def write_dead_letters(cfg: Config, failed: dict[str, str], run_id: str, stage: str = "embed",
                       hashes: dict[str, str] | None = None, keep: dict[str, dict] | None = None) -> Path:
    """One line per failed item: id, stage, reason, attempts in a row with this content, its content hash,
    whether it is quarantined; ``keep``: quarantined items not retried this run (kept as they are). Items that
    now succeed drop out."""
    old = read_dead_letters(cfg)
    path = dead_letter_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = dict(keep or {})
    for i, why in failed.items():
        prev = old.get(i, {})
        h = (hashes or {}).get(i)
        attempts = (prev.get("attempts", 0) if prev.get("content_hash") in (None, h) else 0) + 1
        rows[i] = {"item_id": i, "stage": stage, "reason": why, "attempts": attempts, "content_hash": h,
                   "quarantined": attempts >= cfg.nightly.quarantine_after, "run_id": run_id,
                   "at": datetime.now(timezone.utc).isoformat()}
    from recsys.index import atomic_write_text

    lines = [json.dumps(r) for r in rows.values()]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return path


def quarantined(cfg: Config, ids: list[str], hashes: list[str], rows: list[int]) -> dict[str, dict]:
    """The dead letters of ``rows`` that are quarantined with the content they have now (not retried)."""
    dead = read_dead_letters(cfg)
    out = {}
    for r in rows:
        d = dead.get(ids[r])
        if d and d.get("quarantined") and d.get("content_hash") == hashes[r]:
            out[ids[r]] = d
    return out


class NightlyLock:
    """One nightly per work directory: an exclusive ``flock`` on ``<workdir>/nightly/lock`` (released by the
    kernel when the process dies, so a killed run never leaves it held)."""

    def __init__(self, cfg: Config):
        self.path = cfg.workdir / "nightly" / "lock"
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """None when taken; else who holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            return holder or "another process"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
