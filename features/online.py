"""The online store's fast paths, through Feast's own provider API (SQLite or Redis alike).

Feast's generic conversion (pandas -> arrow -> one ValueProto per cell, python loops) dominates the
cost of writing large vectors. Here the parquet file is streamed in record batches: a first pass over
the (id, time) columns picks the latest row per entity in the window, a second pass turns only those
rows into protos (a vector becomes a FloatList parsed from its raw float32 bytes, no Python floats)
and hands them to ``provider.online_write_batch``, the call Feast's own materialize ends in. Memory
is bounded by one batch. Reads go to ``provider.online_read`` for the one view asked.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import FloatList, StringList, Value
from feast.value_type import ValueType


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


def float_list_values(matrix: np.ndarray) -> list[Value]:
    """(n, d) float32 -> n ``Value(float_list_val=...)``, parsed from bytes (wire format: Value field 16,
    FloatList field 1 packed), which is several times faster than building them float by float."""
    m = np.ascontiguousarray(matrix, dtype="<f4")
    inner = b"\x0a" + _varint(m.shape[1] * 4)
    head = b"\x82\x01" + _varint(len(inner) + m.shape[1] * 4) + inner
    return [Value.FromString(head + row.tobytes()) for row in m]


def latest_rows(path, key: str, start: datetime, end: datetime) -> np.ndarray:
    """Row numbers (in file order) of each entity's latest row with start < event_timestamp <= end."""
    picked = (
        pl.scan_parquet(path).select(key, "event_timestamp").with_row_index("row")
        .filter((pl.col("event_timestamp") > start) & (pl.col("event_timestamp") <= end))
        .sort("event_timestamp", "row").group_by(key).agg(pl.col("row").last())
        .collect()
    )
    return np.sort(picked["row"].to_numpy())


def stream_rows(store, fv, path, start: datetime, end: datetime, chunk_rows: int = 5000, progress: bool = False) -> int:
    """Materialize one view from its parquet file: the latest row per entity in (start, end], in chunks."""
    import pyarrow.parquet as pq

    key = _join_key(store, fv)
    rows = latest_rows(path, key, start, end)
    if rows.size == 0:
        return 0
    features = [(f.name, f.dtype.to_value_type()) for f in fv.features]
    encoders = {name: _encoder(t) for name, t in features if t != ValueType.FLOAT_LIST}
    provider, config = store._get_provider(), store.config
    now = datetime.now(timezone.utc)
    bar = tqdm(total=rows.size, desc=f"materialize {fv.name}", unit="row", disable=not progress)
    offset = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=[key, "event_timestamp", *[n for n, _ in features]]):
        lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
        take = rows[lo:hi] - offset
        offset += batch.num_rows
        if take.size == 0:
            continue
        batch = batch.take(take)
        values: dict[str, list] = {}
        for name, t in features:
            col = batch.column(name)
            if t == ValueType.FLOAT_LIST:
                flat = col.flatten().to_numpy(zero_copy_only=False)
                values[name] = float_list_values(flat.reshape(batch.num_rows, -1))
            else:
                values[name] = [encoders[name](v) for v in col.to_pylist()]
        entities = batch.column(key).to_pylist()
        stamps = batch.column("event_timestamp").to_pylist()
        out = [(EntityKey(join_keys=[key], entity_values=[Value(string_val=str(e))]),
                {name: values[name][r] for name, _ in features}, stamps[r], now) for r, e in enumerate(entities)]
        provider.online_write_batch(config, fv, out, progress=None)
        bar.update(len(out))
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
