"""The online path: request(user) -> Feast online (the user's features only) -> user tower -> FAISS top-N
(seen items excluded inside FAISS) -> reranker -> top-k; or, where the multi-source ranking stage serves
(serve.ranker, recsys/ranking.py), request(user) -> Feast online -> its sources' candidates -> LambdaRank -> top-k.

Everything that changes only daily is loaded once per model version into a Snapshot (serving/snapshot.py)
and swapped atomically on reload: a request takes the current snapshot when it starts and finishes on it,
whatever a reload does meanwhile; a reload's snapshot is built in a low-priority child (serving/prepare.py).
Requests arrive in batches (serving/batching.py): :meth:`Recommender.recommend_many` serves a batch in one pass.
Nothing here imports ``training/``: the user tower is a ``torch.export`` program.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from features.compute import history_sums
from features.inputs import UserInputs, recent_matrix, user_stat_matrix
from features.store import OnlineUsers
from recsys.config import Config
from recsys.content import KINDS
from recsys.events import Appended, Event, EventLog, open_event_log
from recsys.index import IndexInfo
from recsys.manifest import SnapshotError
from recsys.rerank import Candidates
from recsys.registry import no_model_registered
from serving.snapshot import CONTENT_ONLY, LAST_30D, ModelBundle, Snapshot

__all__ = ["CONTENT_ONLY", "ModelBundle", "NoModelError", "NotReadyError", "Query", "RecommendResponse", "Recommendation",
           "Recommender", "Snapshot", "UnknownItemError"]

MODALITY_NAMES = KINDS  # the order of the catalog's modality flags


class UnknownItemError(KeyError):
    pass


class NotReadyError(RuntimeError):
    pass


class NoModelError(RuntimeError):
    """A two-tower answer was asked of a service that has only the catalog's embeddings (content only)."""


@dataclass
class Query:
    """One /recommend request (see :meth:`Recommender.recommend`)."""

    user_id: str
    k: int | None = None  # default serve.k
    exclude: list[str] | None = None
    modalities: list[str] | None = None
    rerank: bool | None = None
    recent_item_ids: list[str] | None = None
    at: float | None = None  # unix seconds the request happens at (a replay's event time); None: now
    ranker: bool | None = None  # the multi-source ranking stage for this request (None: serve.ranker decides)


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float
    retrieval_score: float


@dataclass
class RecommendResponse:
    user_id: str
    items: list[Recommendation]
    known_user: bool
    model: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    reranked: bool = False  # whether the reranker ordered these (else: the retrieval order)
    fallback: str | None = None  # "popularity" (unknown user) or "request_history" (the request's recent items)
    ranked_by: str = "two-tower"  # "two-tower" (retrieval order), "reranker", "ranker" (multi-source) or "popularity"


class Recommender:
    """Online recommendations; ``snapshot`` is swapped atomically by :meth:`reload`."""

    def __init__(self, cfg: Config, snapshot: Snapshot | None = None, alias: str | None = None,
                 version: str | None = None):
        """``alias`` / ``version``: what this recommender serves (default: serve.model_alias); an experiment's
        arm pins its own."""
        self.cfg = cfg
        self.alias, self.version = alias, version
        self.snapshot = snapshot
        self.reloads = 0
        self.reload_error: str | None = None
        self.last_load: dict | None = None  # where the last snapshot was built, and what it cost this process
        self.fallback: str | None = None  # why the snapshot in use is not the published state, if it is not
        self._reload_lock = threading.Lock()
        self._events: EventLog | None = None
        self._retired: Snapshot | None = None  # the snapshot the last reload replaced; closed at the next one

    @classmethod
    def load(cls, cfg: Config, alias: str | None = None, version: str | None = None) -> "Recommender":
        return cls(cfg, Snapshot.build(cfg, ModelBundle.from_mlflow(cfg, alias=alias, version=version)))

    def current(self) -> Snapshot:
        snap = self.snapshot
        if snap is None:
            raise NotReadyError("the model is still loading")
        return snap

    def reload(self, alias: str | None = None, version: str | None = None) -> Snapshot:
        """Build the snapshot for the version the alias points to now (or ``version``), then swap it in.
        One reload at a time; requests keep using the old snapshot until the assignment."""
        with self._reload_lock:
            if alias is None and version is None:
                alias, version = self.alias, self.version
            wall, cpu = time.perf_counter(), time.thread_time()
            child = self.snapshot is not None and self.cfg.serve.reload_in_child
            try:
                if child:
                    from serving.prepare import prepare_in_child  # built at nice 19: requests keep the cores

                    snap = prepare_in_child(self.cfg, alias, version)
                else:
                    snap = Snapshot.build(self.cfg, ModelBundle.from_mlflow(self.cfg, alias=alias, version=version))
                self.fallback = None
            except Exception as exc:
                if self.snapshot is not None or not (isinstance(exc, (SnapshotError, OSError)) or no_model_registered(exc)):
                    raise  # keep serving what is in; the loader reports why
                if no_model_registered(exc):  # nothing registered: the catalog's embeddings alone, if there are any
                    if not (self.cfg.workdir / "embeddings" / "manifest.json").exists():
                        raise
                    snap = Snapshot.build(self.cfg, ModelBundle.content_only(self.cfg))
                    self.fallback = (f"no registered model ({exc}); serving the catalog's embeddings alone: /search, "
                                     "similar items by content, popularity")
                    return self._swap(snap, child=False, wall=wall, cpu=cpu)
                # a fresh worker: the registry's own artifacts for that version, rather than never becoming ready
                snap = Snapshot.build(self.cfg, ModelBundle.from_mlflow(self.cfg, alias=alias, version=version,
                                                                        published=False))
                self.fallback = f"published state refused ({type(exc).__name__}: {exc}); serving the registry's artifacts"
            return self._swap(snap, child, wall, cpu)

    def _swap(self, snap: Snapshot, child: bool, wall: float, cpu: float) -> Snapshot:
        self.last_load = {"built_in": "child" if child else "this process", "seconds": round(time.perf_counter() - wall, 2),
                          "cpu_s_here": round(time.thread_time() - cpu, 3)}  # CPU this serving process spent
        self.reloads += self.snapshot is not None  # the start-up load is not a reload
        if self._retired is not None:  # retired one reload ago: no request reads it any more
            self._retired.repo.close()
        self._retired = self.snapshot
        self.snapshot = snap  # one reference assignment: requests in flight keep the snapshot they took
        return snap

    # Recommendations ---------------------------------------------------------------------------------
    def recommend(self, user_id: str, k: int | None = None, exclude: list[str] | None = None,
                  modalities: list[str] | None = None, rerank: bool | None = None,
                  recent_item_ids: list[str] | None = None) -> RecommendResponse:
        """Top-k items for ``user_id``, never one they interacted with (one :class:`Query`; see
        :meth:`recommend_many`).

        Args:
            exclude: item ids never to return (everything the user has seen is always excluded).
            modalities: keep only items that have all of these parts (e.g. ["video"]).
            recent_item_ids: the user's latest items, newest first, for a user the store does not know yet.
        Returns:
            the reply; ``fallback`` says when the answer is popularity (unknown user, no recent items) or
            built from the request's recent items.
        """
        return self.recommend_many([Query(user_id, k, exclude, modalities, rerank, recent_item_ids)])[0]

    @torch.inference_mode()
    def recommend_many(self, queries: list[Query]) -> list[RecommendResponse]:
        """Serve a batch of queries in one pass: one online read (store + event log) for all users, one
        user-tower forward of shape (B, ...) for those the tower serves, one FAISS call per distinct fetch
        size. Every reply is what :meth:`recommend` would give for its query alone; the stage timings are the
        batch's (``batch`` in them says how many shared it)."""
        snap = self.current()
        t0 = time.perf_counter()
        users = self.user_features(snap, [q.user_id for q in queries])
        t_features = (time.perf_counter() - t0) * 1000
        model = f"{self.cfg.train.registered_model}/{snap.model}"
        # user statistics as of each request's time: a replayed request's own event time, not the wall clock
        now = np.array([q.at if q.at is not None else time.time() for q in queries], np.float64)
        known_stats = user_stat_matrix(users.n_interactions, users.mean_value, users.first_seen, now)
        out: list[RecommendResponse | None] = [None] * len(queries)
        tower: list[int] = []  # queries the user tower serves
        recents, histories, stats, skips, ranked = [], [], [], {}, []
        for b, q in enumerate(queries):
            known = bool(users.found[b])
            asked = q.recent_item_ids or []
            recent_ids = users.recent_item_ids[b] if known else [i for i in asked if i in snap.index_of]
            skip = set(map(snap.index_of.get, chain(users.seen_item_ids[b], recent_ids, asked, q.exclude or ())))
            skip.discard(None)  # ids the catalog does not hold
            if q.modalities:
                want = [MODALITY_NAMES.index(m) for m in q.modalities]
                skip |= set(np.flatnonzero(~snap.modalities[:, want].all(1)).tolist())
            if (known or recent_ids) and self._use_ranker(snap, q):
                n = int(users.n_interactions[b]) if known else len(recent_ids)
                ranked.append((b, recent_ids, list(chain(users.seen_item_ids[b], asked)), n, skip, known))
                continue
            if (not known and not recent_ids) or snap.bundle.user_tower is None:
                out[b] = self._popular(snap, q, skip, model, {"features_user_ms": t_features}, t0, known)
                continue
            if known:
                histories.append(users.history_vector[b])
                stats.append(known_stats[b])
            else:  # the request's recent items stand in for the features the store does not have yet
                chron = np.array([snap.index_of[i] for i in recent_ids[::-1]], np.int64)
                h = history_sums(chron, snap.content_table, self.cfg.embedder.history_half_life)[-1]
                histories.append((h / max(float(np.linalg.norm(h)), 1e-12)).astype(np.float32))
                stats.append(user_stat_matrix([len(recent_ids)], [0.0], [0.0], now[b])[0])
            tower.append(b)
            recents.append(recent_ids)
            skips[b] = skip
        if ranked:
            self._ranked(snap, queries, ranked, now, model, {"features_user_ms": t_features}, t0, out)
        if not tower:
            return out
        rows, mask = recent_matrix(recents, snap.index_of, snap.recent, snap.n_items)
        history, stat = np.stack(histories).astype(np.float32), np.stack(stats).astype(np.float32)
        inputs = UserInputs(history, rows, mask, stat)  # assembled as training and evaluation assemble them
        t1 = time.perf_counter()
        vecs = snap.bundle.user_tower(*inputs.tensors(snap.content_table, snap.known)).numpy()
        t_tower = (time.perf_counter() - t1) * 1000
        reranker = snap.bundle.reranker
        fitted = bool(reranker is not None and reranker.fitted)
        uses = [fitted and (queries[b].rerank if queries[b].rerank is not None else self.cfg.serve.rerank and reranker.helps)
                for b in tower]
        fetches = [max(self.cfg.serve.candidates, self._k(queries[b])) if u else self._k(queries[b])
                   for b, u in zip(tower, uses)]
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        t2 = time.perf_counter()
        for fetch in sorted(set(fetches)):  # one FAISS call per fetch size (usually one for the whole batch)
            at = [t for t, f in enumerate(fetches) if f == fetch]
            scores, cand = snap.index.search(vecs[at], fetch, exclude=[skips[tower[t]] for t in at])
            for j, t in enumerate(at):
                found[t] = (scores[j:j + 1], cand[j:j + 1])
        t_faiss = (time.perf_counter() - t2) * 1000
        for t, b in enumerate(tower):
            q, (scores, cand) = queries[b], found[t]
            k = self._k(q)
            timings = {"features_user_ms": t_features, "user_tower_ms": t_tower, "faiss_ms": t_faiss}
            keep = cand[0] >= 0
            cand, scores = cand[:, keep], scores[:, keep]
            use = uses[t] and cand.shape[1] > 0
            if use:
                c = Candidates(cand, scores, history[t:t + 1], stat[t:t + 1], snap.item_stats[cand[0]][None],
                               snap.bundle.content[cand[0]][None])
                t3 = time.perf_counter()
                top, top_scores = reranker.rerank(c, k)
                timings["rerank_ms"] = (time.perf_counter() - t3) * 1000
            else:
                top, top_scores = cand[:, :k], scores[:, :k]
            retrieval = dict(zip(cand[0].tolist(), scores[0].tolist()))
            items = [Recommendation(snap.bundle.item_ids[r], snap.bundle.titles[r], float(s), float(retrieval.get(int(r), s)))
                     for r, s in zip(top[0], top_scores[0]) if r >= 0]
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            known = bool(users.found[b])
            out[b] = RecommendResponse(q.user_id, items, known, model, timings, reranked=bool(use),
                                       fallback=None if known else "request_history",
                                       ranked_by="reranker" if use else "two-tower")
        return out

    def _use_ranker(self, snap: Snapshot, q: Query) -> bool:
        """The request's own choice, else serve.ranker: "on", or "auto" where validation chose the ranker."""
        if snap.ranker is None:
            return False
        if q.ranker is not None:
            return q.ranker
        mode = self.cfg.serve.ranker
        return mode == "on" or (mode == "auto" and snap.ranker.chosen)

    def _ranked(self, snap: Snapshot, queries: list[Query], ranked: list[tuple], now: np.ndarray, model: str,
                timings: dict, t0: float, out: list) -> None:
        """The multi-source ranking stage (recsys/ranking.py) for the batch's users it serves, in one pass: each
        user's recent items (newest first) as the sequence, everything they had as the seen set, the request's
        exclusions blocked. Items the ranker was not fitted on (newer than its fit) are not among its candidates.

        Args:
            ranked: (position in the batch, recent ids, seen ids, interactions, skipped snapshot rows, known).
        """
        from recsys.ranking import RankRequest

        to_ranker, requests = snap.ranker_of, []
        for b, recent_ids, seen_ids, n, skip, _ in ranked:
            seq = to_ranker[[snap.index_of[i] for i in reversed(recent_ids) if i in snap.index_of]]
            seen = to_ranker[[snap.index_of[i] for i in chain(seen_ids, recent_ids) if i in snap.index_of]]
            block = np.zeros(snap.ranker.n_items, bool)
            if skip:
                mapped = to_ranker[list(skip)]
                block[mapped[mapped >= 0]] = True
            requests.append(RankRequest(seq[seq >= 0], seen[seen >= 0], n, float(now[b]), self._k(queries[b]), block))
        answers, spent = snap.ranker.rank_many(requests)
        spent.pop("ranker_candidates", None)  # a count, not a stage time (/metrics observes every *_ms)
        for (b, _, _, _, _, known), (rows, scores) in zip(ranked, answers):
            rows = snap.ranker_rows[rows]
            items = [Recommendation(snap.bundle.item_ids[r], snap.bundle.titles[r], float(p), float(p))
                     for r, p in zip(rows, scores) if r >= 0]
            out[b] = RecommendResponse(queries[b].user_id, items, known, model,
                                       {**timings, **spent, "total_ms": (time.perf_counter() - t0) * 1000}, reranked=True,
                                       fallback=None if known else "request_history", ranked_by="ranker")

    def _k(self, q: Query) -> int:
        return q.k or self.cfg.serve.k

    def _popular(self, snap: Snapshot, q: Query, skip: set[int], model: str, timings: dict, t0: float,
                 known: bool = False) -> RecommendResponse:
        """An unknown user with no recent items, or any user of a content-only service: the most popular items
        they may see (vectorised: no Python loop over the catalog)."""
        allowed = np.ones(snap.n_items, bool)
        allowed[list(skip)] = False
        rows = snap.popular[allowed[snap.popular]][:self._k(q)].tolist()
        out = [Recommendation(snap.bundle.item_ids[r], snap.bundle.titles[r], float(snap.item_stats[r, LAST_30D]),
                              float(snap.item_stats[r, LAST_30D])) for r in rows]
        return RecommendResponse(q.user_id, out, known, model, {**timings, "total_ms": (time.perf_counter() - t0) * 1000},
                                 False, fallback="popularity", ranked_by="popularity")

    def similar(self, item_id: str, k: int, space: str = "two-tower") -> tuple[list[Recommendation], Snapshot]:
        """Items nearest to ``item_id`` in the two-tower space (item-tower vectors) or the embedder's."""
        snap = self.current()
        if item_id not in snap.index_of:
            raise UnknownItemError(item_id)
        r = snap.index_of[item_id]
        if space != "content" and snap.bundle.user_tower is None:
            raise NoModelError("no two-tower model is trained on this catalog (content only): use space=content")
        index, vectors = (snap.content_index, snap.bundle.content) if space == "content" else (snap.index, snap.bundle.item_vectors)
        q = vectors[r:r + 1].astype(np.float32)
        if space != "content":  # an item's vector as a query: the layout (recsys.contract) says how
            q = snap.bundle.layout.item_as_query(q, snap.bundle.config.get("content_match_weight", 1.0))
        scores, rows = index.search(q, k, exclude=[{r}])
        return [Recommendation(snap.bundle.item_ids[j], snap.bundle.titles[j], float(s), float(s))
                for s, j in zip(scores[0], rows[0]) if j >= 0], snap

    def query_space(self) -> tuple[str, int]:
        """(item input mode, width) of the content vectors /search queries must be embedded into."""
        snap = self.current()
        return (snap.bundle.config.get("item_input", "fused"),
                int(snap.bundle.config.get("embedder_dim", snap.bundle.content.shape[1])))

    def search_vector(self, q: np.ndarray, k: int) -> tuple[list[Recommendation], Snapshot]:
        """The ``k`` items whose content vectors are nearest the (1, D) query vector ``q``."""
        snap = self.current()
        scores, rows = snap.content_index.search(q, k)
        return [Recommendation(snap.bundle.item_ids[j], snap.bundle.titles[j], float(s), float(s))
                for s, j in zip(scores[0], rows[0]) if j >= 0], snap

    @property
    def events(self) -> EventLog:
        """The interaction event log (recsys.events), opened on first use."""
        if self._events is None:
            with self._reload_lock:
                if self._events is None:
                    self._events = open_event_log(self.cfg)
        return self._events

    def user_features(self, snap: Snapshot, user_ids: list[str]) -> OnlineUsers:
        """The users' online rows (Feast) plus their events the rows do not include yet (the event log)."""
        content, index_of = snap.bundle.content, snap.index_of
        return snap.repo.online_users_now(user_ids, self.events, lambda i: content[index_of[i]] if i in index_of else None)

    def record_interaction(self, event: Event) -> Appended:
        """Append an accepted interaction to the event log (durable when this returns); the user's next request
        folds it in. Unknown items are refused before anything is written."""
        snap = self.current()
        if event.item_id not in snap.index_of:
            raise UnknownItemError(event.item_id)
        return self.events.append(event)

    def ready(self) -> tuple[bool, str]:
        """Model, index and feature store loaded and answering (one online read)."""
        snap = self.snapshot
        if snap is None:
            return False, self.reload_error or "the model is still loading"
        try:
            snap.repo.online_users(["__readiness_probe__"])
        except Exception as exc:  # the store is down: not ready (the reason is the reply)
            return False, f"feature store not answering: {type(exc).__name__}: {exc}"
        return True, "ready"

    def index_info(self) -> IndexInfo | None:
        return self.snapshot.index.info if self.snapshot is not None else None
