"""The FAISS search: candidate generation by inner product over item vectors.

One class, :class:`CandidateIndex`, used by validation during training, by offline evaluation, by the
nightly job and by the online service (the same code builds the index everywhere). :func:`build_index`
picks the kind by catalog size:

- up to ``exact_below`` items (50,000 by default): exact search (``flat``); at 65 dims a 50k scan is
  ~1 ms on one core, so an approximate index buys nothing there;
- above it: IVF-Flat (inverted lists over k-means cells, CPU), whose ``nprobe`` is tuned at build time on a
  sample of real queries (user-tower outputs) to the smallest value reaching recall@100 >= ``target_recall``
  against exact search; the achieved recall is recorded in :class:`IndexInfo` and saved with the index.
  IVF rather than HNSW because its recall rises to 1.0 as ``nprobe`` rises to ``nlist``, so the target is
  always reachable: on the benchmark's 1M-item catalog HNSW (M 32, efConstruction 80) stopped at recall 0.82
  with efSearch 1024 after a 7-minute build (BENCHMARKS.md); ``kind="hnsw"`` still builds one;
- where faiss sees a GPU (faiss-gpu): exact search on the GPU at any size (a 1M x 65 scan is a
  millisecond there, so exact beats tuning an approximate index).

Exclusions (a user's seen items) are applied inside FAISS with an ID selector on the CPU, so a user
with thousands of seen items still gets exactly ``k`` unseen results; GPU indexes, which take no
selectors, over-fetch by the number of exclusions instead, up to faiss-gpu's k limit (``GPU_MAX_K``); a user
past it is searched with the selector on a CPU copy of the index (made once, on the first such user).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

EXACT_BELOW = 50_000
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
GPU_MAX_K = 2048  # the largest k faiss-gpu searches


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass
class IndexInfo:
    """What was built and how well it searches: saved beside the index, shown in /healthz."""

    kind: str  # flat | hnsw | ivf
    n: int
    dim: int
    on_gpu: bool = False
    params: dict = field(default_factory=dict)  # M, efConstruction, efSearch / nlist, nprobe
    recall_at_100: float | None = None  # vs exact search on ``tuned_on`` queries (1.0 for flat)
    tuned_on: int = 0
    build_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class CandidateIndex:
    """Inner-product search over ``vectors`` (n_items, d); results are catalog rows.

    Args:
        vectors: (n, d) float32 item vectors.
        kind: "flat" (exact), "hnsw" (graph, CPU) or "ivf" (inverted lists; ``nlist`` = 4 sqrt(n)).
        use_gpu: None = when faiss sees a GPU; flat and ivf move to the GPU, hnsw stays on the CPU.
        rows: catalog rows of ``vectors`` (default 0..n-1), e.g. only the cold items.
        params: HNSW ``M``/``efConstruction``/``efSearch``, IVF ``nlist``/``nprobe``.
    """

    def __init__(self, vectors: np.ndarray, kind: str = "flat", use_gpu: bool | None = None,
                 rows: np.ndarray | None = None, params: dict | None = None, index=None):
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, self.dim = x.shape
        self.rows = np.arange(self.n) if rows is None else np.asarray(rows, np.int64)
        self._identity = rows is None or np.array_equal(self.rows, np.arange(self.n))
        self._pos = None  # catalog row -> position, built on first exclusion when rows is a subset
        self._cpu = None  # a CPU copy of a GPU index, for searches past the GPU's k limit
        p = dict(params or {})
        t0 = time.perf_counter()
        kind = "flat" if kind == "auto" else kind  # "auto" is build_index's choice; a direct index is exact
        if index is None:
            if kind == "flat":
                index = faiss.IndexFlatIP(self.dim)
            elif kind == "hnsw":
                p.setdefault("M", 32)
                p.setdefault("efConstruction", 80)
                p.setdefault("efSearch", 128)
                index = faiss.IndexHNSWFlat(self.dim, p["M"], faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = p["efConstruction"]
            elif kind == "ivf":
                p.setdefault("nlist", max(1, int(4 * np.sqrt(self.n))))
                p.setdefault("nprobe", max(1, p["nlist"] // 8))
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, p["nlist"], faiss.METRIC_INNER_PRODUCT)
                index.train(x)
            else:
                raise ValueError(f"unknown index kind {kind!r} (flat, hnsw or ivf)")
            self.on_gpu = bool(gpu_count() > 0 if use_gpu is None else use_gpu) and kind != "hnsw"
            if self.on_gpu:
                index = faiss.index_cpu_to_all_gpus(index)
            index.add(x)
        else:
            self.on_gpu = False
        self.index, self.kind, self.params = index, kind, p
        self.set_search_params(p)
        self.info = IndexInfo(kind, self.n, self.dim, self.on_gpu, p, 1.0 if kind == "flat" else None,
                              build_s=round(time.perf_counter() - t0, 3))

    def set_search_params(self, params: dict) -> None:
        import faiss

        self.params.update(params)
        if self.kind == "hnsw" and "efSearch" in params:
            self.index.hnsw.efSearch = int(params["efSearch"])
        if self.kind == "ivf" and "nprobe" in params:
            target = faiss.extract_index_ivf(self.index) if not self.on_gpu else self.index
            target.nprobe = int(params["nprobe"])

    def _widen(self, params: dict) -> bool:
        """Double the approximate index's search breadth in ``params``; False when it cannot grow."""
        if self.kind == "ivf" and params.get("nprobe", 1) < params.get("nlist", 1):
            params["nprobe"] = min(2 * int(params.get("nprobe", 1)), int(params["nlist"]))
            return True
        if self.kind == "hnsw" and params.get("efSearch", 128) < 8192:
            params["efSearch"] = 2 * int(params.get("efSearch", 128))
            return True
        return False

    def _search_params(self, excluded: np.ndarray, params: dict | None = None):
        """FAISS search parameters with an ID selector that skips ``excluded`` positions."""
        import faiss

        p = params or self.params
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded.astype(np.int64)))
        if self.kind == "hnsw":
            sp = faiss.SearchParametersHNSW(sel=sel, efSearch=int(p.get("efSearch", 128)))
        elif self.kind == "ivf":
            sp = faiss.SearchParametersIVF(sel=sel, nprobe=int(p.get("nprobe", 1)))
        else:
            sp = faiss.SearchParameters(sel=sel)
        sp._keep = sel  # the selector must outlive the call (SWIG does not hold a reference)
        return sp

    def _positions(self, catalog_rows) -> np.ndarray:
        rows = np.fromiter(catalog_rows, np.int64)
        if self._identity:
            return rows[(rows >= 0) & (rows < self.n)]
        if self._pos is None:
            self._pos = {int(r): i for i, r in enumerate(self.rows)}
        return np.array([self._pos[r] for r in rows.tolist() if r in self._pos], np.int64)

    def search(self, queries: np.ndarray, k: int, exclude: sparse.csr_matrix | list | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` catalog rows per query, skipping each query's ``exclude`` rows (e.g. seen items).

        Args:
            queries: (B, d) float32.
            exclude: (B, n_catalog) CSR or a list (one per query) of collections of catalog rows.
        Returns:
            (scores (B, k) float32, rows (B, k) int64); -1 / -inf pad when fewer than k remain.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if exclude is None:
            excl = [()] * len(q)
        elif sparse.issparse(exclude):
            excl = [exclude.indices[exclude.indptr[i]:exclude.indptr[i + 1]] for i in range(len(q))]
        else:
            excl = exclude
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_r = np.full((len(q), k), -1, np.int64)
        fetch = min(self.n, k)
        if fetch <= 0:
            return out_s, out_r
        plain = [i for i in range(len(q)) if len(excl[i]) == 0]
        if plain:
            s, j = self.index.search(q[plain], fetch)
            self._fill(out_s, out_r, plain, s, j)
        rest = [i for i in range(len(q)) if len(excl[i])]
        if not rest:
            return out_s, out_r
        limit = self.fetch_limit
        for i in rest:
            if limit is not None and min(self.n, k + len(excl[i])) <= limit:
                # a GPU index takes no selector: over-fetch by the number of exclusions, then filter
                skip = set(int(r) for r in excl[i])
                s, j = self.index.search(q[i:i + 1], min(self.n, k + len(skip)))
                keep = [(a, b) for a, b in zip(s[0], j[0]) if b >= 0 and int(self.rows[b]) not in skip][:k]
                for c, (a, b) in enumerate(keep):
                    out_s[i, c], out_r[i, c] = a, self.rows[b]
                continue
            # exclusions inside FAISS: exactly k unseen results (on a CPU copy past the GPU's k limit)
            index = self._cpu_index()
            pos = self._positions(excl[i])
            want = min(self.n - len(pos), k)
            s, j = index.search(q[i:i + 1], want or 1, params=self._search_params(pos))
            widen = dict(self.params)
            while (j[0][:want] < 0).any() and self._widen(widen):  # approximate: the probed part ran dry
                s, j = index.search(q[i:i + 1], want, params=self._search_params(pos, widen))
            self._fill(out_s, out_r, [i], s, j)
        return out_s, out_r

    @property
    def fetch_limit(self) -> int | None:
        """The most results one search may fetch before filtering (GPU: faiss-gpu's k limit; CPU: none, the
        selector needs no over-fetch). Settable, so the GPU path runs on a CPU with a small limit (tests)."""
        return getattr(self, "_fetch_limit", GPU_MAX_K if self.on_gpu else None)

    @fetch_limit.setter
    def fetch_limit(self, value: int | None) -> None:
        self._fetch_limit = value

    def _cpu_index(self):
        """The index itself on a CPU; a GPU index's CPU copy (made once)."""
        if not self.on_gpu:
            return self.index
        if self._cpu is None:
            import faiss

            self._cpu = faiss.index_gpu_to_cpu(self.index)
        return self._cpu

    def _fill(self, out_s, out_r, which, s, j) -> None:
        ok = j >= 0
        rows = np.where(ok, self.rows[np.where(ok, j, 0)], -1)
        w = min(s.shape[1], out_s.shape[1])
        out_s[which, :w] = np.where(ok, s, -np.inf)[:, :w]
        out_r[which, :w] = rows[:, :w]

    # Persistence: written to a temporary name, then renamed (a reader never sees half an index) ----------
    def save(self, folder: str | Path) -> Path:
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        tmp = folder / ".items.faiss.tmp"
        faiss.write_index(index, str(tmp))
        os.replace(tmp, folder / "items.faiss")
        atomic_write_text(folder / "index.json", json.dumps({**self.info.to_dict(), "rows_identity": self._identity}, indent=2))
        if not self._identity:
            np.save(folder / "rows.npy", self.rows)
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | None = None) -> "CandidateIndex":
        """Read a saved index (no vectors needed); moved to the GPU where one is seen, for flat/ivf."""
        import faiss

        folder = Path(folder)
        meta = json.loads((folder / "index.json").read_text())
        index = faiss.read_index(str(folder / "items.faiss"))
        out = cls.__new__(cls)
        out.n, out.dim, out.kind, out.params = index.ntotal, index.d, meta["kind"], dict(meta.get("params") or {})
        out._identity = bool(meta.get("rows_identity", True))
        out.rows = np.arange(out.n) if out._identity else np.load(folder / "rows.npy")
        out._pos, out._cpu = None, None
        out.on_gpu = bool(gpu_count() > 0 if use_gpu is None else use_gpu) and out.kind != "hnsw"
        out.index = faiss.index_cpu_to_all_gpus(index) if out.on_gpu else index
        out.set_search_params(out.params)
        out.info = IndexInfo(**{**{k: meta[k] for k in IndexInfo.__dataclass_fields__ if k in meta}, "on_gpu": out.on_gpu})
        return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers see old or new, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k rows that the approximate top-k also holds."""
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, (e >= 0).sum()) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 1.0


def build_index(vectors: np.ndarray, queries: np.ndarray | None = None, kind: str = "auto",
                exact_below: int = EXACT_BELOW, target_recall: float = 0.95, k: int = 100,
                use_gpu: bool | None = None, params: dict | None = None, max_queries: int = 500) -> CandidateIndex:
    """The index serving and the nightly job use: exact for small catalogs (and on a GPU), IVF-Flat above
    ``exact_below`` with ``nprobe`` tuned on ``queries`` to recall@``k`` >= ``target_recall``.

    Args:
        vectors: (n, d) item vectors. queries: (Q, d) real user-tower outputs to tune on (without them,
            the index is tuned on item vectors as queries, a weaker check, and says so: ``tuned_on`` = 0).
        kind: "auto", or force "flat" / "hnsw" / "ivf".
    Returns:
        the index, with ``info.recall_at_100`` measured against exact search on the same queries.
    """
    n = len(vectors)
    gpu = bool(gpu_count() > 0 if use_gpu is None else use_gpu)
    if kind == "auto":
        kind = "flat" if (n <= exact_below or gpu) else "ivf"
    t0 = time.perf_counter()
    index = CandidateIndex(vectors, kind=kind, use_gpu=gpu, params=params)
    if kind == "flat":
        index.info.build_s = round(time.perf_counter() - t0, 3)
        return index
    tuned_on = 0 if queries is None else min(len(queries), max_queries)
    rng = np.random.default_rng(0)
    if queries is None:
        q = np.asarray(vectors, np.float32)[rng.choice(n, min(n, max_queries), replace=False)]
    else:
        q = np.asarray(queries, np.float32)[rng.choice(len(queries), tuned_on, replace=False)]
    kk = min(k, n)
    exact = CandidateIndex(vectors, kind="flat", use_gpu=False).search(q, kk)[1]
    nlist = int(index.params.get("nlist", 1))
    grid = EF_GRID if kind == "hnsw" else tuple(sorted({*(2 ** i for i in range(nlist.bit_length())), nlist}))
    name = "efSearch" if kind == "hnsw" else "nprobe"
    recall = 0.0
    for value in grid:
        index.set_search_params({name: value})
        recall = recall_at(index.search(q, kk)[1], exact)
        if recall >= target_recall:
            break
    index.info.params, index.info.recall_at_100 = dict(index.params), round(recall, 4)
    index.info.tuned_on, index.info.build_s = tuned_on, round(time.perf_counter() - t0, 3)
    return index
