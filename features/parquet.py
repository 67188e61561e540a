"""Parquet files as Feast's offline store reads them: plain (not "large") string and list types, list fields
named "item", written whole (:func:`write_parquet`) or frame by frame (:class:`ParquetSink`), always into a
temporary file moved into place, so a reader (or a kill) never meets half a file."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

ROW_GROUP = 10_000  # rows per parquet row group: what one streamed read holds in memory


def _plain_type(t):
    import pyarrow as pa

    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain_type(t.value_type))
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """A whole frame as one file (:class:`ParquetSink` with a single write)."""
    with ParquetSink(path) as sink:
        sink.write(frame)


class ParquetSink:
    """A parquet file written frame by frame (row groups of ROW_GROUP), so a writer never holds the whole table:
    plain (not "large") string and list types, list fields named "item" (Feast's type map, 0.67, knows
    ``list<item: string>`` but not the compliant ``list<element: string>``), into a temporary file moved into place on a clean exit (removed on an
    error, leaving the old file as it was).

    ``drop``: (column, values): the file already at ``path`` is carried over first, minus its rows whose column
    holds one of the values, read one row group at a time (the nightly keeps every user it does not rebuild).
    A pyarrow dataset scan did the same with read-ahead that outran the writer: 10 GB resident for an 8.9 GB
    file."""

    def __init__(self, path: Path, drop: tuple[str, list] | None = None):
        self.path, self.drop = path, drop
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def _write(self, table) -> None:
        import pyarrow as pa

        if self.writer is None:
            schema = pa.schema([pa.field(f.name, _plain_type(f.type)) for f in table.schema])
            self.writer = pq.ParquetWriter(self.tmp, schema, use_compliant_nested_type=False)
        self.writer.write_table(table.select(self.writer.schema.names).cast(self.writer.schema), row_group_size=ROW_GROUP)
        self.rows += table.num_rows

    def write(self, frame: pl.DataFrame) -> None:
        self._write(frame.to_arrow())

    def __enter__(self) -> "ParquetSink":
        if self.drop is not None and self.path.exists():
            import pyarrow as pa
            import pyarrow.compute as pc

            column, values = self.drop
            values = pa.array(list(values), pa.string())
            old = pq.ParquetFile(self.path)
            self._write(old.schema_arrow.empty_table())
            for group in range(old.num_row_groups):
                table = old.read_row_group(group)
                kept = table.filter(pc.invert(pc.is_in(table[column], value_set=values)))
                if kept.num_rows:
                    self._write(kept)
                del table, kept
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        if kind is None and self.writer is not None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
