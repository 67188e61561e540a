"""The online store's fast paths: bulk writes through Feast's custom online-store API, and direct reads.

Feast's generic path (pandas -> arrow -> one ValueProto per cell -> per-row SQL ``execute`` / per-row
Python loop for Redis) dominates the cost of writing large vectors. Here:

* the parquet file is streamed by row group: a first pass over the (id, time) columns picks the latest
  row per entity in the window, a second pass decodes only the row groups holding those rows and encodes
  only those rows, so memory is bounded by one row group;
* rows are encoded straight into the bytes Feast stores (entity keys in Feast's serialization v3, a
  vector's ``ValueProto`` assembled from its raw float32 bytes), no proto objects for vectors;
* the online stores are Feast's own SQLite and Redis stores, subclassed (Feast's documented custom
  online store mechanism: ``online_store: type: features.online.BulkSqliteOnlineStore``) with one extra
  method, ``write_encoded``: one ``executemany`` upsert per chunk for SQLite, one pipeline per chunk
  for Redis (keeping Redis's "never overwrite a newer row" check). Every read, push and ``feast``
  command still runs Feast's unchanged code on the same tables and keys, which the tests check.

Reads go to ``provider.online_read`` for the one view asked.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from feast.infra.online_stores.helpers import _mmh3, compute_table_id, compute_versioned_name, extract_text_and_num
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig, _quote_id
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import FloatList, StringList, Value
from feast.utils import to_naive_utc
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp


@dataclass
class EncodedRows:
    """One chunk of one view's rows, already in the bytes the online store keeps.

    entity_keys: Feast's serialized entity key per row; values: feature -> serialized ValueProto per row;
    texts: feature -> SQLite's ``value_text`` per row (None for vectors and lists, as Feast writes it);
    event_ts: per row (tz-aware UTC); created_ts: the write time.
    """

    entity_keys: list[bytes]
    values: dict[str, list[bytes]]
    texts: dict[str, list]
    event_ts: list[datetime]
    created_ts: datetime

    def __len__(self) -> int:
        return len(self.entity_keys)


def _sqlite_time(t: datetime) -> int:
    """What Feast's sqlite3 adapter stores for a datetime: epoch seconds of the naive UTC time."""
    return int(to_naive_utc(t).timestamp())


class BulkSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Feast's SQLite online store config; only the type differs."""

    type: Literal["features.online.BulkSqliteOnlineStore"] = "features.online.BulkSqliteOnlineStore"


class BulkSqliteOnlineStore(SqliteOnlineStore):
    """Feast's SQLite online store plus ``write_encoded``: the same upsert as ``online_write_batch``, one
    ``executemany`` per chunk instead of one ``execute`` per row and feature."""

    def supports_encoded(self, config) -> bool:
        o = config.online_store
        return not (o.vector_enabled or getattr(o, "enable_openai_compatible_store", False))

    # One connection per store, used by one thread at a time: Feast keeps one connection for the store, and request
    # threads using it at once failed with SystemError. Reads take ~0.1 ms, so taking turns costs nothing that
    # matters, and a retired snapshot's store closes exactly one connection.
    @property
    def _lock(self) -> threading.RLock:
        return self.__dict__.setdefault("_conn_lock", threading.RLock())

    def _get_conn(self, config):
        """Feast's connection, in WAL mode (readers never wait for the nightly's writes) with a busy timeout."""
        with self._lock:
            if not self._conn:
                conn = super()._get_conn(config)
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA journal_mode = WAL")
            return self._conn

    def online_read(self, *args, **kwargs):
        with self._lock:
            return super().online_read(*args, **kwargs)

    def online_write_batch(self, *args, **kwargs):
        with self._lock:
            return super().online_write_batch(*args, **kwargs)

    def update(self, *args, **kwargs):
        with self._lock:
            return super().update(*args, **kwargs)

    def write_encoded(self, config, table, rows: EncodedRows) -> None:
        with self._lock:
            conn = self._get_conn(config)
            name = compute_table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
            # as Feast's registered sqlite3 adapter writes a datetime, once per distinct time
            epoch = {t: _sqlite_time(t) for t in set(rows.event_ts)}
            stamps = [epoch[t] for t in rows.event_ts]
            created = _sqlite_time(rows.created_ts)
            sql = (f"INSERT INTO {_quote_id(name)} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
                   "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
                   "created_ts = excluded.created_ts;")
            with conn:
                for feature, values in rows.values.items():
                    conn.executemany(sql, zip(rows.entity_keys, [feature] * len(rows), values, rows.texts[feature],
                                              stamps, [created] * len(rows)))

    def close_all(self) -> None:
        """Close the connection (a retired snapshot's store: nothing reads it any more)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class BulkRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Feast's Redis online store config; only the type differs."""

    type: Literal["features.online.BulkRedisOnlineStore"] = "features.online.BulkRedisOnlineStore"


# One round trip per chunk instead of one command per row (redis-py spends ~10 us per pipelined command).
_HGET_MANY = "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('HGET', k, ARGV[1]) end return r"
_HSET_MANY = """
local n = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  local args = {}
  for j = 1, n do
    args[2 * j - 1] = ARGV[1 + j]
    args[2 * j] = ARGV[1 + n + (i - 1) * n + j]
  end
  redis.call('HSET', k, unpack(args))
end
return #KEYS
"""


class BulkRedisOnlineStore(RedisOnlineStore):
    """Feast's Redis online store plus ``write_encoded``: the same hashes as ``online_write_batch`` (key =
    entity key + project, one field per feature, ``_ts:<view>``) and the same rule that a row never
    replaces a newer or equally new one, but one server-side script call per chunk to read the stored
    times and one to write (a pipeline per row on Redis Cluster, where one call cannot span slots)."""

    def supports_encoded(self, config) -> bool:
        return True

    def write_encoded(self, config, table, rows: EncodedRows) -> None:
        o = config.online_store
        client = self._get_client(o)
        view = compute_versioned_name(table, config.registry.enable_online_feature_view_versioning)
        ts_key = f"_ts:{view}"
        project = config.project.encode("utf-8")
        keys = [k + project for k in rows.entity_keys]
        stamp = {}  # event time -> (nanoseconds, serialized Timestamp), once per distinct time
        for t in set(rows.event_ts):
            ts = Timestamp()
            ts.FromDatetime(t if t.tzinfo else t.replace(tzinfo=timezone.utc))
            stamp[t] = (ts.seconds * 1_000_000_000 + ts.nanos, ts.SerializeToString())
        single = o.redis_type == RedisType.redis
        prev = [None] * len(keys)
        if not o.skip_dedup:
            if single:
                prev = client.register_script(_HGET_MANY)(keys=keys, args=[ts_key])
            else:
                with client.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.hget(k, ts_key)
                    prev = pipe.execute()
        latest: dict[bytes, int] = {}
        fields = [ts_key.encode(), *(_mmh3(f"{view}:{f}") for f in rows.values)]
        columns = list(rows.values.values())
        write_keys, values = [], []
        for r, k in enumerate(keys):
            nanos, ts_bytes = stamp[rows.event_ts[r]]
            seen = latest.get(k, 0)
            if prev[r]:
                p = Timestamp.FromString(prev[r])
                seen = max(seen, p.seconds * 1_000_000_000 + p.nanos)
            if seen and nanos <= seen:
                continue
            latest[k] = nanos
            write_keys.append(k)
            values.append(ts_bytes)
            values.extend(col[r] for col in columns)
        if not write_keys:
            return
        if single and not o.key_ttl_seconds:
            client.register_script(_HSET_MANY)(keys=write_keys, args=[len(fields), *fields, *values])
            return
        n = len(fields)
        with client.pipeline(transaction=False) as pipe:
            for i, k in enumerate(write_keys):
                pipe.hset(k, mapping=dict(zip(fields, values[i * n:(i + 1) * n])))
                if o.key_ttl_seconds:
                    pipe.expire(name=k, time=o.key_ttl_seconds)
            pipe.execute()


def entity_key_bytes(key: str, ids: list, version: int = 3) -> list[bytes]:
    """Feast's ``serialize_entity_key`` for one string join key, for many ids at once (tested equal)."""
    if version != 3:
        return [serialize_entity_key(EntityKey(join_keys=[key], entity_values=[Value(string_val=str(i))]), version)
                for i in ids]
    k = key.encode("utf8")
    head = struct.pack("<III", 1, ValueType.STRING.value, len(k)) + k + struct.pack("<I", ValueType.STRING.value)
    out = []
    for i in ids:
        b = str(i).encode("utf8")
        out.append(head + struct.pack("<I", len(b)) + b)
    return out


def _join_key(store, fv) -> str:
    return store.get_entity(fv.entities[0]).join_key


def _encoder(value_type: ValueType):
    """A function python value -> ValueProto for one feature's type (None -> an empty Value)."""
    if value_type == ValueType.FLOAT_LIST:
        return lambda v: Value(float_list_val=FloatList(val=v)) if v is not None else Value()
    if value_type == ValueType.STRING_LIST:
        return lambda v: Value(string_list_val=StringList(val=v)) if v is not None else Value()
    if value_type == ValueType.INT64:
        return lambda v: Value(int64_val=int(v)) if v is not None else Value()
    if value_type == ValueType.FLOAT:
        return lambda v: Value(float_val=float(v)) if v is not None else Value()
    if value_type == ValueType.DOUBLE:
        return lambda v: Value(double_val=float(v)) if v is not None else Value()
    if value_type == ValueType.STRING:
        return lambda v: Value(string_val=str(v)) if v is not None else Value()
    if value_type == ValueType.UNIX_TIMESTAMP:
        return lambda v: Value(unix_timestamp_val=int(v.timestamp())) if v is not None else Value()
    raise TypeError(f"no encoder for {value_type}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def float_list_bytes(matrix: np.ndarray) -> list[bytes]:
    """(n, d) float32 -> n serialized ``Value(float_list_val=...)``, assembled from the raw bytes (wire
    format: Value field 16, FloatList field 1 packed): no Python floats, no proto objects."""
    m = np.ascontiguousarray(matrix, dtype="<f4")
    inner = b"\x0a" + _varint(m.shape[1] * 4)
    head = b"\x82\x01" + _varint(len(inner) + m.shape[1] * 4) + inner
    return [head + row.tobytes() for row in m]


def latest_rows(path, key: str, start: datetime, end: datetime, keys: set[str] | None = None) -> np.ndarray:
    """Row numbers (in file order) of each entity's latest row with start < event_timestamp <= end (of the
    entities in ``keys`` only, when given)."""
    window = (pl.col("event_timestamp") > start) & (pl.col("event_timestamp") <= end)
    if keys is not None:
        window = window & pl.col(key).is_in(list(keys))
    picked = (
        pl.scan_parquet(path).select(key, "event_timestamp").with_row_index("row")
        .filter(window)
        .sort("event_timestamp", "row").group_by(key).agg(pl.col("row").last())
        .collect()
    )
    return np.sort(picked["row"].to_numpy())


def encode_batch(batch, key: str, features: list[tuple[str, ValueType]], version: int, now: datetime) -> EncodedRows:
    """An arrow record batch (key, event_timestamp, features) -> EncodedRows."""
    values, texts = {}, {}
    for name, t in features:
        col = batch.column(name)
        if t == ValueType.FLOAT_LIST and col.null_count == 0:
            flat = col.flatten().to_numpy(zero_copy_only=False)
            values[name] = float_list_bytes(flat.reshape(batch.num_rows, -1))
            texts[name] = [None] * batch.num_rows
        else:
            enc = _encoder(t)
            protos = [enc(v) for v in col.to_pylist()]
            values[name] = [p.SerializeToString() for p in protos]
            texts[name] = [extract_text_and_num(p, False)[0] for p in protos]
    return EncodedRows(entity_key_bytes(key, batch.column(key).to_pylist(), version), values, texts,
                       _datetimes(batch.column("event_timestamp")), now)


def _datetimes(col) -> list[datetime]:
    """A timestamp column -> datetimes, converting each distinct time once (snapshots share few times)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    micros = pc.cast(col.cast(pa.timestamp("us", "UTC")), pa.int64()).to_numpy(zero_copy_only=False)
    distinct, which = np.unique(micros, return_inverse=True)
    as_dt = [datetime.fromtimestamp(0, timezone.utc) + timedelta(microseconds=int(u)) for u in distinct]
    return [as_dt[i] for i in which]


def stream_rows(store, fv, path, start: datetime, end: datetime, chunk_rows: int = 5000, progress: bool = False,
                bulk: bool = True, keys: set[str] | None = None) -> int:
    """Materialize one view from its parquet file: the latest row per entity in (start, end], in chunks.

    With ``bulk`` (and a Bulk* online store) each chunk goes to ``write_encoded``; otherwise protos go to
    Feast's ``online_write_batch`` (any online store)."""
    import pyarrow.parquet as pq

    key = _join_key(store, fv)
    rows = latest_rows(path, key, start, end, keys)
    if rows.size == 0:
        return 0
    features = [(f.name, f.dtype.to_value_type()) for f in fv.features]
    provider, config = store._get_provider(), store.config
    online = provider.online_store
    bulk = bulk and hasattr(online, "write_encoded") and online.supports_encoded(config)
    version = config.entity_key_serialization_version
    now = datetime.now(timezone.utc)
    bar = tqdm(total=rows.size, desc=f"materialize {fv.name}", unit="row", disable=not progress)
    # One row group at a time (pyarrow's iter_batches keeps the decoded file in its pool: 300+ MB for 100k
    # 768-d rows); a row group holding none of the picked rows is not even decoded (incremental runs).
    parquet = pq.ParquetFile(path)
    columns = [key, "event_timestamp", *[n for n, _ in features]]
    offset = 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(rows, [offset, offset + size])
        take = rows[lo:hi] - offset
        offset += size
        if take.size == 0:
            continue
        picked = parquet.read_row_group(group, columns=columns).take(take)
        for batch in picked.to_batches(max_chunksize=chunk_rows):
            encoded = encode_batch(batch, key, features, version, now)
            if bulk:
                online.write_encoded(config, fv, encoded)
            else:
                out = [(EntityKey(join_keys=[key], entity_values=[Value(string_val=str(e))]),
                        {name: Value.FromString(encoded.values[name][r]) for name, _ in features}, encoded.event_ts[r], now)
                       for r, e in enumerate(batch.column(key).to_pylist())]
                provider.online_write_batch(config, fv, out, progress=None)
            bar.update(len(encoded))
        del picked
    bar.close()
    return int(rows.size)


def _decode(v: Value):
    kind = v.WhichOneof("val")
    if kind is None:
        return None
    if kind == "float_list_val":
        return np.asarray(v.float_list_val.val, dtype=np.float32)
    if kind == "string_list_val":
        return list(v.string_list_val.val)
    if kind == "unix_timestamp_val":
        return datetime.fromtimestamp(v.unix_timestamp_val, tz=timezone.utc)
    return getattr(v, kind)


def read_rows(store, view, key: str, ids: list[str], features: list[str]) -> dict[str, list]:
    """{feature: [value or None per id]}; an unknown id gives None (an explicit miss), never an error.

    ``view`` is a FeatureView or its name; pass the object on hot paths (a registry lookup costs ~0.8 ms,
    five times the SQLite read itself)."""
    fv = store.get_feature_view(view, allow_registry_cache=True) if isinstance(view, str) else view
    provider = store._get_provider()
    keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=str(i))]) for i in ids]
    result = provider.online_read(config=store.config, table=fv, entity_keys=keys, requested_features=features)
    out: dict[str, list] = {f: [] for f in features}
    for _, values in result:
        for f in features:
            out[f].append(_decode(values[f]) if values and f in values else None)
    return out
