"""A Feast offline store: Feast's DuckDB store with point-in-time joins done as ASOF joins.

Feast's DuckDB store (through ibis) joins each feature view to the entity rows with an inequality
join and then keeps the newest match per row with a window function: it materialises every
(entity row, older feature row) pair, which for per-interaction user snapshots is quadratic in a
user's history length (~90 s for ml-latest-small's 100k labels here). DuckDB's ASOF JOIN finds the
newest older row directly (about 1 s). Same semantics: for every entity row, the feature row with
the greatest ``timestamp_field <= event_timestamp`` and equal join keys, dropped if older than the
view's ttl. Everything else (reading sources, pulling for materialization, writing) is Feast's.

Selected in ``feature_store.yaml`` with ``offline_store: {type: features.offline_store.AsofDuckDBOfflineStore}``.
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from pathlib import Path
from typing import List, Literal, Union

import ibis
import pandas as pd
import pyarrow as pa
from ibis.expr import datatypes as dt
from ibis.expr import operations as ops
from ibis.expr.types import Table

from feast import FileSource
from feast.feature_view import FeatureView
from feast.types import Array
from feast.infra.offline_stores import offline_utils
from feast.infra.offline_stores.duckdb import (
    DuckDBOfflineStore,
    DuckDBOfflineStoreConfig,
    _read_data_source,
    _write_data_source,
)
from feast.infra.offline_stores.ibis import (
    IbisRetrievalJob,
    _get_entity_df_event_timestamp_range,
    _get_entity_schema,
    _to_utc,
)
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    type: Literal["features.offline_store.AsofDuckDBOfflineStore"] = "features.offline_store.AsofDuckDBOfflineStore"
    # DuckDB's own default is 80% of the machine; joins past this spill to a temporary folder instead
    memory_limit: str | None = "2GB"


class AsofRetrievalJob(IbisRetrievalJob):
    """Feast's retrieval job, plus the result as a stream of Arrow record batches: a training set of 10M rows
    (each with a 256-d history vector) is read a batch at a time, never as one pandas frame."""

    def to_arrow_batches(self, rows: int = 100_000):
        """Yields pyarrow RecordBatches of at most ``rows`` rows, in no particular order."""
        if self.on_demand_feature_views:  # Feast applies those to a whole pandas frame: the result, then cut
            yield from self.to_arrow().to_batches(rows)
            return
        backend = self.table._find_backend()
        backend._run_pre_execute_hooks(self.table)  # registers the entity rows (a memtable) with DuckDB
        try:
            # ibis' own to_pyarrow_batches calls DuckDB's fetch_record_batch, which DuckDB 2 renamed; a relation's
            # reader streams without the extra copy a cursor's makes
            relation = backend.con.sql(backend.compile(self.table))
            yield from relation.to_arrow_reader(rows)
        finally:
            self.forget_entity_rows()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        try:
            return super()._to_df_internal(timeout)
        finally:
            self.forget_entity_rows()

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        try:
            return super()._to_arrow_internal(timeout)
        finally:
            self.forget_entity_rows()

    def forget_entity_rows(self) -> None:
        """Unregister the entity rows from DuckDB once read. ibis keeps every memtable it has registered until
        the process exits (and the frame with it): each training set's labels stayed resident, about 0.5 GB after a
        join of 8M labels. They go once the result has been read (a second read registers them again)."""
        backend = self.table._find_backend()
        for op in self.table.op().find(ops.InMemoryTable):
            if op in getattr(backend, "_memtables", ()):
                backend.con.unregister(op.name)
                backend._memtables.discard(op)


def _job_backend(config: RepoConfig, views: List[FeatureView]):
    """A DuckDB database of the job's own when every view reads a local parquet file (else None: Feast's reader on
    ibis' default backend, which other jobs share). Closed with the job, it gives back everything the join held:
    on the default backend DuckDB's allocator kept 0.8 GB after a join of 8M labels had been read. Queries past
    ``memory_limit`` spill to a folder of the repository (not the process's working directory)."""
    local = all(isinstance(fv.batch_source, FileSource) and str(fv.batch_source.path).endswith(".parquet")
                and "://" not in str(fv.batch_source.path) for fv in views)
    limit = getattr(config.offline_store, "memory_limit", None)
    settings = {"memory_limit": limit, "temp_directory": str(Path(config.repo_path or ".").resolve() / "data" / ".duckdb-spill")}
    if local:
        return ibis.duckdb.connect(**(settings if limit else {}))
    if limit:
        shared = ibis.get_backend()
        for k, v in settings.items():
            shared.raw_sql(f"SET {k} = '{v}'")
    return None


def asof_join(entity: Table, features: Table, ts: str, event_ts: str, keys: dict[str, str],
              columns: list[str], ttl: timedelta | None, ranges: dict | None = None) -> Table:
    """Left ASOF join of one view's rows onto the entity rows (newest feature row at or before ``event_ts``).

    ``ranges``: feature key -> (lowest, highest) value among the entity rows: feature rows outside cannot match,
    and the filter reaches the parquet scan, which skips row groups by their statistics (a chunk of users reads
    its part of a user-sorted file, not all of it)."""
    tag = "__f"
    for k, (lo, hi) in (ranges or {}).items():
        features = features.filter(features[k].between(lo, hi))
    right = features.select(*[features[k].name(f"{k}{tag}") for k in keys], features[ts].name(f"{ts}{tag}"), *columns)
    predicates = [entity[entity_key] == right[f"{k}{tag}"] for k, entity_key in keys.items()]
    joined = entity.asof_join(right, on=entity[event_ts] >= right[f"{ts}{tag}"], predicates=predicates)
    if ttl and ttl.total_seconds() > 0:
        fresh = joined[f"{ts}{tag}"] >= joined[event_ts] - ibis.interval(seconds=int(ttl.total_seconds()))
        joined = joined.mutate(**{c: ibis.ifelse(fresh, joined[c], ibis.null().cast(joined[c].type())) for c in columns})
    return joined.drop(*[f"{k}{tag}" for k in keys], f"{ts}{tag}")


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: List[FeatureView],
        feature_refs: List[str],
        entity_df: Union[pd.DataFrame, str],
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        if not isinstance(entity_df, pd.DataFrame):
            raise TypeError("AsofDuckDBOfflineStore takes the entity rows as a pandas DataFrame")
        schema = _get_entity_schema(entity_df=entity_df)
        event_ts = offline_utils.infer_event_timestamp_from_entity_df(entity_schema=schema)
        ts_range = _get_entity_df_event_timestamp_range(entity_df, event_ts)
        entity_df = _to_utc(entity_df, event_ts)
        table = ibis.memtable(entity_df)
        con = _job_backend(config, feature_views)
        all_features: list[str] = []
        # views with vector (list) features joined last: every ASOF join sorts the rows it is given, so the
        # wide columns are carried through one join, not all of them (the output keeps Feast's column order)
        order = sorted(feature_views, key=lambda fv: any(isinstance(f.dtype, Array) for f in fv.features))
        for fv in order:
            if fv.batch_source is None:
                raise ValueError(f"Feature view '{fv.name}' has no batch_source and cannot be queried.")
            source = fv.batch_source
            rows = con.read_parquet(source.path) if con is not None else _read_data_source(source, str(config.repo_path))
            for old, new in source.field_mapping.items():
                if old in rows.columns:
                    rows = rows.rename({new: old})
            rows = rows.mutate(**{source.timestamp_field: rows[source.timestamp_field].cast(dt.Timestamp(timezone="UTC"))})
            prefix = fv.projection.name_to_use()
            refs = [r.split(":")[1] for r in feature_refs if r.startswith(f"{prefix}:")]
            base = fv.projection.name_alias or fv.name
            if full_feature_names:
                rows = rows.rename({f"{base}__{f}": f for f in refs})
                refs = [f"{base}__{f}" for f in refs]
            keys = fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns}
            ranges = {k: (entity_df[ek].min(), entity_df[ek].max()) for k, ek in keys.items()
                      if ek in entity_df.columns and len(entity_df)}
            table = asof_join(table, rows, source.timestamp_field, event_ts, keys, refs, fv.ttl, ranges)
            all_features.extend(refs)
        wanted = [r.replace(":", "__") if full_feature_names else r.split(":")[1] for r in feature_refs]
        table = table.select(*[c for c in table.columns if c not in set(wanted)], *[c for c in wanted if c in table.columns])
        odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
        for odfv in [o for o in odfvs if o.mode == "substrait"]:
            table = odfv.transform_ibis(table, full_feature_names)
        job = AsofRetrievalJob(
            table,
            [o for o in odfvs if o.mode != "substrait"],
            full_feature_names,
            metadata=RetrievalMetadata(features=feature_refs, keys=list(set(entity_df.columns) - {event_ts}),
                                       min_event_timestamp=ts_range[0], max_event_timestamp=ts_range[1]),
            data_source_writer=_write_data_source,
            staging_location=config.offline_store.staging_location,
            staging_location_endpoint_override=config.offline_store.staging_location_endpoint_override,
            repo_path=str(config.repo_path),
        )
        if con is not None:  # the job's own database goes when the job does (its memory with it)
            weakref.finalize(job, con.disconnect)
        return job
