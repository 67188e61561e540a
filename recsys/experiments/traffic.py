"""Real service traffic for experiments: users who come back over several days, see several lists, and click
with a position-biased model, sent to a running `recsys serve` over HTTP. The service assigns the arms and
writes the exposure and outcome logs exactly as in production; only the users are simulated.

Each user gets a propensity to click (Beta-distributed: users differ, so their requests are correlated, which
is what makes request-level intervals too narrow) and a number of requests over the period (1 to
``max_requests``, heavy-tailed), spread over the days from a random first day. On each reply the user examines
position p with probability 1 / p^eta and clicks an examined item with their propensity, times
``1 + effect[arm]`` (a planted effect; none by default, an A/A world). Request times are the simulated ones
(``at``), so days of traffic take seconds; several users are in flight at once.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np


@dataclass
class TrafficSpec:
    users: int = 500
    days: int = 14
    mean_requests: float = 4.0  # per user over the period (geometric, clipped to 1..max_requests)
    max_requests: int = 20
    k: int = 10
    eta: float = 1.0  # position bias: position p is examined with probability 1 / p^eta
    click_alpha: float = 2.0  # users' click propensities ~ Beta(click_alpha, click_beta): mean 0.1 by default
    click_beta: float = 18.0
    effect: dict[str, float] = field(default_factory=dict)  # arm -> relative change of the click probability
    start: str = "2026-11-01T00:00:00+00:00"
    seed: int = 0
    concurrency: int = 8
    user_prefix: str = "t"


@dataclass
class TrafficRun:
    spec: TrafficSpec
    requests: int = 0
    clicks: int = 0
    errors: int = 0
    arms: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": asdict(self.spec)}


def schedule(spec: TrafficSpec) -> dict[str, tuple[float, list[datetime]]]:
    """user id -> (click propensity, request times in order)."""
    rng = np.random.default_rng(spec.seed)
    start = datetime.fromisoformat(spec.start).astimezone(timezone.utc)
    p = 1.0 / max(spec.mean_requests, 1.0)
    out = {}
    for u in range(spec.users):
        n = int(min(rng.geometric(p), spec.max_requests))
        first = rng.uniform(0, spec.days)
        offsets = np.sort(np.concatenate([[first], rng.uniform(first, spec.days, n - 1)]))
        times = [start + timedelta(days=float(o)) for o in offsets]
        out[f"{spec.user_prefix}{u:06d}"] = (float(rng.beta(spec.click_alpha, spec.click_beta)), times)
    return out


def clicks_for(user: str, request_index: int, n_shown: int, propensity: float, lift: float, eta: float,
               seed: int) -> list[int]:
    """Positions (0-based) this user clicks on this reply: examined with 1 / p^eta, clicked with propensity x
    (1 + lift). Seeded by (seed, user, request), so a rerun clicks the same way on the same arm."""
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(user.encode()).digest()[:4], "little"), request_index])
    pos = np.arange(1, n_shown + 1)
    examine = rng.random(n_shown) < 1.0 / pos ** eta
    click = rng.random(n_shown) < min(1.0, propensity * (1.0 + lift))
    return np.flatnonzero(examine & click).tolist()


def drive(base_url: str, spec: TrafficSpec, headers: dict | None = None, out: Path | None = None) -> TrafficRun:
    """Send the schedule to the service at ``base_url``; each user's requests in order, ``spec.concurrency``
    users at once. With ``out``, the spec and the counts are written to ``out/traffic.json``."""
    import httpx

    run = TrafficRun(spec)
    plan = schedule(spec)

    def one_user(client: httpx.Client, user: str) -> tuple[int, int, int, dict]:
        propensity, times = plan[user]
        n = c = e = 0
        arms: dict[str, int] = {}
        for j, at in enumerate(times):
            r = client.post("/recommend", json={"user_id": user, "k": spec.k, "at": at.isoformat()})
            n += 1
            if r.status_code != 200:
                e += 1
                continue
            body = r.json()
            arm = body.get("arm") or "none"
            arms[arm] = arms.get(arm, 0) + 1
            shown = [i["item_id"] for i in body["items"]]
            for pos in clicks_for(user, j, len(shown), propensity, spec.effect.get(arm, 0.0), spec.eta, spec.seed):
                ok = client.post("/interactions", json={
                    "user_id": user, "item_id": shown[pos], "request_id": body["request_id"],
                    "timestamp": (at + timedelta(seconds=pos + 1)).isoformat()})
                c += ok.status_code == 202
                e += ok.status_code != 202
        return n, c, e, arms

    with httpx.Client(base_url=base_url, headers=headers or {}, timeout=60,
                      limits=httpx.Limits(max_connections=spec.concurrency)) as client:
        with ThreadPoolExecutor(spec.concurrency) as pool:
            for n, c, e, arms in pool.map(lambda u: one_user(client, u), list(plan)):
                run.requests += n
                run.clicks += c
                run.errors += e
                for a, m in arms.items():
                    run.arms[a] = run.arms.get(a, 0) + m
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "traffic.json").write_text(json.dumps(run.to_dict(), indent=2))
    return run
