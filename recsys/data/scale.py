"""Large synthetic interaction logs for scale runs (``python -m benchmarks.run scale``): 100k-item catalogs and
millions of interactions, generated in seconds with numpy, never one Python object per interaction.

The shape follows real logs: item popularity is a power law (Zipf), each user favours one or two of
``n_clusters`` latent clusters and picks from them most of the time, histories are heavy-tailed (log-normal
lengths) and come in sessions (a few items minutes apart, sessions days apart). Items carry a title only; their
content vectors come from the same cluster model (a centre per cluster plus noise, L2-normalised), standing in
for the embedder's output: embedding 100k items is the nightly's Ray-scaled job, measured on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import polars as pl

from recsys.data.types import PART_DTYPE, Catalog, Dataset, Interactions, LoadReport

START = datetime(2025, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ScaleSpec:
    n_interactions: int = 1_000_000
    n_items: int = 100_000
    per_user: float = 10.0  # mean history length: n_users = n_interactions / per_user
    n_clusters: int = 50
    zipf: float = 1.0  # popularity exponent: item of popularity rank r is drawn with weight r^-zipf
    own_cluster: float = 0.8  # share of a user's picks from their own clusters (the rest: global popularity)
    session_items: float = 3.0  # mean items per session
    days: float = 365.0
    dim: int = 256
    noise: float = 0.6  # content-vector noise around the cluster centre (per coordinate, times 1/sqrt(dim))
    seed: int = 0

    @property
    def n_users(self) -> int:
        return max(1, int(round(self.n_interactions / self.per_user)))


def _histories(spec: ScaleSpec, rng: np.random.Generator) -> np.ndarray:
    """(n_users,) history lengths >= 3, log-normal beyond that, summing to ``n_interactions`` exactly."""
    extra = max(spec.n_interactions - 3 * spec.n_users, 0)
    raw = rng.lognormal(0.0, 1.0, spec.n_users)
    n = 3 + np.floor(raw / raw.sum() * extra).astype(np.int64)
    n += rng.multinomial(spec.n_interactions - int(n.sum()), raw / raw.sum()) if spec.n_interactions > n.sum() else 0
    return n


def generate(spec: ScaleSpec = ScaleSpec()) -> tuple[Dataset, np.ndarray]:
    """The dataset and its items' content vectors ((n_items, dim) float32, unit rows), in catalog order."""
    rng = np.random.default_rng(spec.seed)
    n_items, k = spec.n_items, spec.n_clusters
    cluster = rng.integers(0, k, n_items)
    weight = 1.0 / np.arange(1, n_items + 1) ** spec.zipf  # popularity by rank; ranks shuffled over the catalog
    weight = weight[rng.permutation(n_items)]
    by_cluster = [np.flatnonzero(cluster == c) for c in range(k)]
    cum = [np.cumsum(weight[ix]) / weight[ix].sum() for ix in by_cluster]
    global_cum = np.cumsum(weight) / weight.sum()

    lengths = _histories(spec, rng)
    user = np.repeat(np.arange(spec.n_users), lengths)
    n = len(user)
    favourite = rng.integers(0, k, (spec.n_users, 2))
    second = rng.random(spec.n_users) < 0.5  # half the users have a second favourite cluster
    pick = favourite[user, (rng.random(n) < 0.3).astype(np.int64) * second[user]]
    own = rng.random(n) < spec.own_cluster
    items = np.searchsorted(global_cum, rng.random(n))  # the global-popularity picks
    u = rng.random(n)
    for c in range(k):  # within-cluster picks, by popularity
        sel = np.flatnonzero(own & (pick == c))
        items[sel] = by_cluster[c][np.minimum(np.searchsorted(cum[c], u[sel]), len(cum[c]) - 1)]
    items = np.minimum(items, n_items - 1)

    # time: sessions of a few items minutes apart, sessions days apart, each user's first at a random day
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    pos = np.arange(n) - np.repeat(first, lengths)
    new_session = (pos == 0) | (rng.random(n) < 1.0 / spec.session_items)
    gaps = np.where(new_session, rng.exponential(spec.days / 40 * 86400, n), rng.exponential(300, n))
    gaps[pos == 0] = rng.uniform(0, spec.days * 0.5 * 86400, spec.n_users)
    seconds = np.empty(n, np.float64)
    csum = np.cumsum(gaps)
    seconds[:] = csum - np.repeat(csum[first] - gaps[first], lengths)
    t0 = int(START.timestamp() * 1e6)
    timestamps = (t0 + (seconds * 1e6).astype(np.int64))

    width_u, width_i = len(str(spec.n_users)), len(str(n_items))
    frame = pl.DataFrame({"u": user, "i": items, "timestamp": timestamps, "value": np.ones(n, np.float32)}).select(
        pl.format("u{}", pl.col("u").cast(pl.Utf8).str.zfill(width_u)).alias("user_id"),
        pl.format("i{}", pl.col("i").cast(pl.Utf8).str.zfill(width_i)).alias("item_id"),
        pl.col("timestamp").cast(pl.Datetime("us", "UTC")), "value")
    ids = pl.Series("item_id", np.arange(n_items)).cast(pl.Utf8).str.zfill(width_i)
    catalog = pl.DataFrame({"item_id": "i" + ids, "cluster": cluster}).with_columns(
        pl.format("item {} of cluster {}", pl.col("item_id"), pl.col("cluster")).alias("title"))
    catalog = catalog.with_columns(pl.concat_list(pl.struct(
        pl.lit("text").alias("kind"), pl.col("title").alias("text"), pl.lit(None, pl.Utf8).alias("path"),
        pl.lit("content").alias("source"))).cast(pl.List(PART_DTYPE)).alias("parts")).select(
        "item_id", "title", "parts", "cluster")

    centres = rng.normal(size=(k, spec.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = centres[cluster] + rng.normal(0, spec.noise / np.sqrt(spec.dim), (n_items, spec.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    report = LoadReport(f"synthetic scale ({spec.n_interactions:,} interactions)")
    report.loaded = {"items": n_items, "interactions": n, "users": spec.n_users}
    return Dataset("scale", Catalog(catalog), Interactions(frame), report), vectors.astype(np.float32)
