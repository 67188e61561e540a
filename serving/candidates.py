"""The FAISS search: candidate generation by inner product over item-tower vectors.

One class, :class:`CandidateIndex`, used by validation during training, by offline evaluation and by
the online service. Exact (``flat``) by default, which is what a catalog of this size wants; ``hnsw``
and ``ivf`` by configuration for large catalogs. A GPU index when faiss reports GPUs (faiss-gpu).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class CandidateIndex:
    """Inner-product search over ``vectors`` (n_items, d); results are catalog rows.

    Args:
        vectors: (n, d) float32 item vectors (unit length, so inner product = cosine).
        kind: "flat" (exact), "hnsw" (graph, CPU) or "ivf" (inverted lists; ``nlist`` = 4 sqrt(n)).
        use_gpu: None = when faiss sees a GPU; flat and ivf move to the GPU, hnsw stays on the CPU.
        rows: catalog rows of ``vectors`` (default 0..n-1), e.g. only the cold items.
    """

    def __init__(self, vectors: np.ndarray, kind: str = "flat", use_gpu: bool | None = None,
                 rows: np.ndarray | None = None):
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.n, self.dim = x.shape
        self.rows = np.arange(self.n) if rows is None else np.asarray(rows, np.int64)
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 128
        elif kind == "ivf":
            nlist = max(1, int(4 * np.sqrt(self.n)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = max(1, nlist // 8)
        else:
            raise ValueError(f"unknown index kind {kind!r} (flat, hnsw or ivf)")
        self.on_gpu = bool(gpu_count() > 0 if use_gpu is None else use_gpu) and kind != "hnsw"
        if self.on_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(x)
        self.index, self.kind = index, kind

    def search(self, queries: np.ndarray, k: int, exclude: sparse.csr_matrix | list[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` catalog rows per query, skipping each query's ``exclude`` rows (e.g. seen items).

        Args:
            queries: (B, d) float32.
            exclude: (B, n_catalog) CSR or a list of sets of catalog rows.
        Returns:
            (scores (B, k) float32, rows (B, k) int64); -1 / -inf pad when fewer than k remain.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if exclude is None:
            excl = [()] * len(q)
        elif sparse.issparse(exclude):
            excl = [set(exclude.indices[exclude.indptr[i]:exclude.indptr[i + 1]].tolist()) for i in range(len(q))]
        else:
            excl = exclude
        fetch = min(self.n, k + max((len(e) for e in excl), default=0))
        scores, idx = self.index.search(q, fetch) if fetch > 0 else (np.zeros((len(q), 0)), np.zeros((len(q), 0), int))
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_r = np.full((len(q), k), -1, np.int64)
        for i in range(len(q)):
            found = 0
            for s, j in zip(scores[i], idx[i]):
                if j < 0:
                    break
                row = int(self.rows[j])
                if row in excl[i]:
                    continue
                out_s[i, found], out_r[i, found] = s, row
                found += 1
                if found == k:
                    break
        return out_s, out_r
