"""The online store's fast paths, through Feast's own provider API (SQLite or Redis alike).

Feast's generic conversion (pandas -> arrow -> one ValueProto per cell, python loops) dominates the
cost of writing large vectors. Here a chunk of a polars frame becomes protos directly (a vector
becomes one FloatList from a list of floats) and goes to ``provider.online_write_batch``, the
call Feast's materialize ends in. Reads go to ``provider.online_read`` for the one view asked.
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


def write_rows(store, fv, frame: pl.DataFrame, chunk_rows: int = 5000, progress: bool = False) -> int:
    """Write ``frame`` (join key, event_timestamp, feature columns) to the online store in chunks."""
    if frame.height == 0:
        return 0
    key = _join_key(store, fv)
    features = [(f.name, _encoder(f.dtype.to_value_type())) for f in fv.features]
    provider = store._get_provider()
    config = store.config
    bar = tqdm(total=frame.height, desc=f"materialize {fv.name}", unit="row", disable=not progress)
    now = datetime.now(timezone.utc)
    for start in range(0, frame.height, chunk_rows):
        part = frame.slice(start, chunk_rows)
        cols = {name: part[name].to_list() for name, _ in features}
        rows = []
        for r, (entity, ts) in enumerate(zip(part[key].to_list(), part["event_timestamp"].to_list())):
            ek = EntityKey(join_keys=[key], entity_values=[Value(string_val=str(entity))])
            rows.append((ek, {name: enc(cols[name][r]) for name, enc in features}, ts, now))
        provider.online_write_batch(config, fv, rows, progress=None)
        bar.update(part.height)
    bar.close()
    return frame.height


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


def read_rows(store, view_name: str, key: str, ids: list[str], features: list[str]) -> dict[str, list]:
    """{feature: [value or None per id]}; an unknown id gives None (an explicit miss), never an error."""
    fv = store.get_feature_view(view_name, allow_registry_cache=True) if hasattr(store, "get_feature_view") else None
    provider = store._get_provider()
    keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=str(i))]) for i in ids]
    result = provider.online_read(config=store.config, table=fv, entity_keys=keys, requested_features=features)
    out: dict[str, list] = {f: [] for f in features}
    for _, values in result:
        for f in features:
            out[f].append(_decode(values[f]) if values and f in values else None)
    return out
