"""Experiments in the service: each user is in one arm by a salted hash, each arm serves its own registered
version, and every reply is logged (exposure log) with its request id, arm, positions, scores and, when the
shown list is sampled (exploration), each item's propensity. In ``interleave`` mode the first two arms' lists
are merged by team draft into one reply and the log says which arm contributed each item.

The policies themselves (assignment, softmax sampling, team draft) are ``recsys.experiments.policy``; the
log format is ``recsys.experiments.logs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

from recsys.config import Config
from recsys.events import log_spec
from recsys.experiments.logs import LogWriter, as_utc, design_of, record_design, write_event_log_pointer
from recsys.experiments.policy import assign, request_rng, softmax_sample, team_draft
from serving.service import Query, RecommendResponse, Recommender


@dataclass
class Served:
    """One reply and what the log and the client need to know about how it was made."""

    response: RecommendResponse
    request_id: str
    experiment: str | None
    arm: str
    teams: list[str]
    propensities: list[float]
    pool: RecommendResponse | None = None  # exploration: the candidates the shown list was sampled from


class ExperimentRouter:
    """Routes /recommend to the user's arm (or interleaves two arms) and writes the exposure log."""

    def __init__(self, cfg: Config, control: Recommender):
        self.cfg, self.e, self.control = cfg, cfg.experiment, control
        self.arms: dict[str, Recommender] = {}
        for arm in self.e.arms if self.e.name else []:
            alias = arm.alias or cfg.serve.model_alias
            same = arm.version is None and alias == cfg.serve.model_alias
            self.arms[arm.name] = control if same else Recommender(cfg, alias=alias, version=arm.version)
        self.writer = LogWriter(cfg.experiment_logs, cfg.experiment.flush_rows, cfg.experiment.flush_s) if self.e.log else None
        self.design_id = None
        if self.writer is not None:  # outcomes are the event log's events that quote a request id
            write_event_log_pointer(cfg.experiment_logs, log_spec(cfg))
            self.design_id = record_design(cfg.experiment_logs, design_of(self.e))  # the shares the split uses

    @property
    def recommenders(self) -> list[Recommender]:
        """Every distinct recommender (the control first), for loading and readiness."""
        out = [self.control]
        for r in self.arms.values():
            if all(r is not o for o in out):
                out.append(r)
        return out

    def arm_of(self, user_id: str) -> str:
        if not self.e.name:
            return "control"
        return assign(user_id, self.e.name, self.e.salt, [(a.name, a.share) for a in self.e.arms])

    def recommend(self, user_id: str, k: int, at: datetime | None = None, **kw) -> Served:
        """The reply for ``user_id`` as its arm (or the interleaved pair) serves it; logged unless off."""
        return self.recommend_many([Query(user_id, k, **kw)], [at])[0]

    def recommend_many(self, queries: list[Query], ats: list[datetime | None] | None = None) -> list[Served]:
        """Replies for a batch of queries (the service's dynamic batcher): each recommender serves its share
        of the batch in one call; each reply is then shaped (sampled, interleaved) and logged on its own."""
        raw = os.urandom(16 * len(queries)).hex()  # random request ids, one system call per batch
        if ats:  # a replay's event time: the user statistics are computed as of it
            queries = [replace(q, at=as_utc(a).timestamp()) if a is not None and q.at is None else q for q, a in zip(queries, ats)]
        ids = [raw[32 * i:32 * (i + 1)] for i in range(len(queries))]
        plan: list[list[tuple[Recommender, Query]]] = []  # per query: the lists it needs, in order
        for q in queries:
            if self.e.name and self.e.mode == "interleave":
                plan.append([(r, q) for r in list(self.arms.values())[:2]])
            else:
                rec = self.arms.get(self.arm_of(q.user_id), self.control)
                explore = self.e.explore == "softmax"
                plan.append([(rec, replace(q, k=max(q.k, self.e.explore_pool)) if explore else q)])
        got: dict[tuple[int, int], RecommendResponse] = {}
        for rec in {id(r): r for p in plan for r, _ in p}.values():
            mine = [(i, j, q) for i, p in enumerate(plan) for j, (r, q) in enumerate(p) if r is rec]
            for (i, j, _), resp in zip(mine, rec.recommend_many([q for _, _, q in mine])):
                got[i, j] = resp
        out = []
        for i, q in enumerate(queries):
            if self.e.name and self.e.mode == "interleave":
                served = self._interleaved(got[i, 0], got[i, 1], q.k, ids[i])
            else:
                served = self._one_arm(self.arm_of(q.user_id), got[i, 0], q.k, ids[i])
            if self.writer is not None:
                self._log(served, (ats or [None] * len(queries))[i])
            out.append(served)
        return out

    def _one_arm(self, arm: str, pool: RecommendResponse, k: int, request_id: str) -> Served:
        if self.e.explore == "softmax":
            scores = np.array([i.score for i in pool.items])
            if len(scores) > k:
                order, props = softmax_sample(scores, k, self.e.temperature, request_rng(request_id))
                shown = replace(pool, items=[pool.items[j] for j in order])
                return Served(shown, request_id, self.e.name, arm, [arm] * len(order), props.tolist(), pool)
            return Served(pool, request_id, self.e.name, arm, [arm] * len(pool.items), [1.0] * len(pool.items))
        return Served(pool, request_id, self.e.name, arm, [arm] * len(pool.items), [1.0] * len(pool.items))

    def _interleaved(self, a: RecommendResponse, b: RecommendResponse, k: int, request_id: str) -> Served:
        na, nb = list(self.arms)[:2]
        by_id = {i.item_id: i for i in [*b.items, *a.items]}
        merged = team_draft([i.item_id for i in a.items], [i.item_id for i in b.items], k, request_rng(request_id))
        items = [by_id[i] for i, _ in merged]
        teams = [na if t == "a" else nb for _, t in merged]
        resp = replace(a, items=items, model=f"{a.model}+{b.model}",
                       timings_ms={"total_ms": a.timings_ms.get("total_ms", 0) + b.timings_ms.get("total_ms", 0)})
        return Served(resp, request_id, self.e.name, "interleaved", teams, [1.0] * len(items))

    def _log(self, s: Served, at: datetime | None) -> None:
        r = s.response
        pool = s.pool
        self.writer.append("exposures", {
            "request_id": s.request_id, "ts": as_utc(at), "user_id": r.user_id, "experiment": s.experiment,
            "arm": s.arm, "mode": self.e.mode if s.experiment else "none", "model": r.model,
            "known_user": r.known_user, "fallback": r.fallback, "items": [i.item_id for i in r.items],
            "scores": [float(i.score) for i in r.items], "propensities": s.propensities, "teams": s.teams,
            "pool_items": [i.item_id for i in pool.items] if pool is not None else None,
            "pool_scores": [float(i.score) for i in pool.items] if pool is not None else None,
            "temperature": self.e.temperature if pool is not None else None, "design_id": self.design_id,
            "latency_ms": float(r.timings_ms.get("total_ms", 0.0)), "error": None})

    def log_failure(self, q: Query, at: datetime | None, exc: BaseException) -> None:
        """A request its arm failed to answer (its final outcome, after the batcher's retry alone): one exposure
        row with no items and the error's type, so the report's error-rate guardrail counts it per arm."""
        if self.writer is None:
            return
        interleaved = self.e.name and self.e.mode == "interleave"
        self.writer.append("exposures", {
            "request_id": os.urandom(16).hex(), "ts": as_utc(at), "user_id": q.user_id, "experiment": self.e.name,
            "arm": "interleaved" if interleaved else self.arm_of(q.user_id), "mode": self.e.mode if self.e.name else "none",
            "items": [], "design_id": self.design_id, "error": type(exc).__name__})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
