"""The generic format: bring your own catalog.

A folder with three things (see README, "Bring your own data"):

``items.jsonl`` (or ``items.csv`` / ``items.parquet``)
    One item per row. ``item_id`` is required, ``title`` optional. Content is either
    - a ``parts`` list, in order (JSONL): ``[{"text": "..."}, {"image": "posters/1.jpg"}, {"text": "...", "source": "user"}]``,
    - or the columns ``text``, ``image``, ``audio``, ``video`` (CSV), taken in that order.
    Any other column is kept as item metadata.
``interactions.csv`` (or ``.parquet``)
    ``user_id,item_id,timestamp[,value]``; timestamp in Unix seconds or ISO 8601.
``media/``
    Media files; paths in the items file are relative to it (absolute paths also work).

Bad rows are reported in the :class:`LoadReport` and skipped: unknown item ids, unparseable
timestamps, missing media files (the part is dropped; the item stays if it keeps any part).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from recsys.content import KINDS
from recsys.data.types import ITEM_SCHEMA, Catalog, Dataset, Interactions, LoadReport
from recsys.errors import DataError
from recsys.media import check_media_file


def _find(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"{folder} has no {stem}{{{','.join(suffixes)}}}")


def _read_table(path: Path) -> pl.DataFrame:
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    if path.suffix == ".csv":
        return pl.read_csv(path, infer_schema=False)
    raise DataError(f"unsupported table format: {path} (use .csv or .parquet)")


def _read_items(path: Path, report: LoadReport) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append(row)
            except ValueError as exc:
                report.add("item lines that are not JSON objects (skipped)", f"line {lineno}: {exc}")
        return rows
    return _read_table(path).to_dicts()


def _parts_of(row: dict) -> list[dict]:
    """Normalise either form (a ``parts`` list or per-kind columns) to [{kind, text|path, source}]."""
    raw = row.get("parts")
    if isinstance(raw, str) and raw.strip():
        raw = json.loads(raw)
    if raw:
        parts = []
        for p in raw:
            kinds = [k for k in KINDS if p.get(k)]
            if len(kinds) != 1:
                raise ValueError(f"part {p} must have exactly one of {KINDS}")
            parts.append({"kind": kinds[0], "value": p[kinds[0]], "source": p.get("source", "content")})
        return parts
    return [{"kind": k, "value": row[k], "source": "content"} for k in KINDS if row.get(k)]


def load_generic(
    items_path: str | Path,
    interactions_path: str | Path,
    media_dir: str | Path | None = None,
    name: str = "generic",
    check_media: bool = True,
) -> Dataset:
    """Load an items file, an interactions file and a media folder (see the module docstring)."""
    items_path, interactions_path = Path(items_path), Path(interactions_path)
    media = Path(media_dir) if media_dir is not None else items_path.parent
    report = LoadReport(source=f"{name}:{items_path.parent}")

    # Items ------------------------------------------------------------------------------------
    records: list[dict] = []
    seen: set[str] = set()
    for row in _read_items(items_path, report):
        item_id = row.get("item_id")
        if item_id is None or str(item_id).strip() == "":
            report.add("items without an item_id (skipped)", str(row)[:80])
            continue
        item_id = str(item_id).strip()
        if item_id in seen:
            report.add("duplicate item ids (later rows skipped)", item_id)
            continue
        try:
            raw_parts = _parts_of(row)
        except ValueError as exc:
            report.add("items with malformed parts (skipped)", f"{item_id}: {exc}")
            continue
        parts = []
        for p in raw_parts:
            if p["kind"] == "text":
                parts.append({"kind": "text", "text": str(p["value"]), "path": None, "source": p["source"]})
                continue
            file = Path(p["value"])
            file = file if file.is_absolute() else media / file
            if not file.is_file():
                report.add("missing media files (part dropped)", f"{item_id}: {file}")
                continue
            problem = check_media_file(file, p["kind"]) if check_media else None
            if problem:  # the item keeps its other parts; the broken one is reported, not embedded
                report.add("media parts that do not decode (part dropped)", f"{item_id}: {file.name}: {problem}")
                continue
            parts.append({"kind": p["kind"], "text": None, "path": str(file), "source": p["source"]})
        if not parts:
            report.add("items with no usable part (skipped)", item_id)
            continue
        seen.add(item_id)
        meta = {k: v for k, v in row.items() if k not in ("item_id", "title", "parts", *KINDS)}
        first_text = next((p["text"] for p in parts if p["kind"] == "text"), item_id)
        records.append({"item_id": item_id, "title": str(row.get("title") or first_text[:80]), "parts": parts, **meta})
    if not records:
        raise DataError(f"{items_path}: no usable items ({report.render()})")
    items = pl.DataFrame(records, schema_overrides=ITEM_SCHEMA, infer_schema_length=None)

    # Interactions -----------------------------------------------------------------------------
    raw = _read_table(interactions_path)
    missing = {"user_id", "item_id", "timestamp"} - set(raw.columns)
    if missing:
        raise DataError(f"{interactions_path} lacks columns {sorted(missing)}")
    raw = raw.with_columns(pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8).str.strip_chars(),
                           pl.col("timestamp").cast(pl.Utf8).str.strip_chars())
    if "value" not in raw.columns:
        raw = raw.with_columns(pl.lit(None, dtype=pl.Float32).alias("value"))
    parsed = raw.with_columns(_parse_time(pl.col("timestamp")).alias("ts"), _epoch_unit(pl.col("timestamp")).alias("unit"),
                              pl.col("value").cast(pl.Float32, strict=False))

    def examples(frame: pl.DataFrame) -> list[str]:
        return [f"user {u}, item {i}, timestamp {t!r}" for u, i, t in frame.select("user_id", "item_id", "timestamp").head(5).iter_rows()]

    for unit in ("ms", "us", "ns"):  # not an error, but worth saying: 1.7e12 read as seconds is the year 55,000
        conv = parsed.filter(pl.col("unit") == unit)
        report.add(f"epoch timestamps read as {UNIT_NAMES[unit]} (from their size)", examples(conv), conv.height)
    bad_ts = parsed.filter(pl.col("ts").is_null())
    report.add("interactions with an unparseable timestamp (skipped)", examples(bad_ts), bad_ts.height)
    implausible = parsed.filter(pl.col("ts").is_not_null() & ~pl.col("ts").is_between(EARLIEST, _latest()))
    report.add(f"interactions dated before {EARLIEST.year} or in the future (skipped)", examples(implausible),
               implausible.height)
    parsed = parsed.with_columns(pl.when(pl.col("ts").is_between(EARLIEST, _latest())).then(pl.col("ts")).alias("ts"))
    unknown = parsed.filter(pl.col("ts").is_not_null() & ~pl.col("item_id").is_in(list(seen)))
    report.add("interactions with unknown item ids (skipped)", examples(unknown), unknown.height)
    no_user = parsed.filter(pl.col("user_id").is_null())
    report.add("interactions without a user (skipped)", examples(no_user), no_user.height)
    good = parsed.filter(pl.col("ts").is_not_null() & pl.col("item_id").is_in(list(seen)) & pl.col("user_id").is_not_null())
    interactions = Interactions(good.select("user_id", "item_id", pl.col("ts").alias("timestamp"), "value"))
    catalog = Catalog(items)
    report.loaded = {"items": len(catalog), "interactions": len(interactions), "users": interactions.n_users}
    return Dataset(name, catalog, interactions, report)


EARLIEST = datetime(1970, 1, 2, tzinfo=timezone.utc)
UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def _latest() -> datetime:
    return datetime.now(timezone.utc) + timedelta(days=1)


def _epoch_unit(col: pl.Expr) -> pl.Expr:
    """The unit of an epoch timestamp from its size (seconds up to 1e11, i.e. the year 5138; then ms, us,
    ns); null for a value that is not an integer (ISO 8601 text)."""
    v = col.cast(pl.Int64, strict=False).abs()
    return (pl.when(v.is_null()).then(None).when(v < 10**11).then(pl.lit("s")).when(v < 10**14).then(pl.lit("ms"))
            .when(v < 10**17).then(pl.lit("us")).otherwise(pl.lit("ns")))


def _parse_time(col: pl.Expr) -> pl.Expr:
    """Epoch seconds, milliseconds, microseconds or nanoseconds (told apart by size) or ISO 8601 -> UTC."""
    v = col.cast(pl.Int64, strict=False)
    unit = _epoch_unit(col)
    micros = (pl.when(unit == "s").then(v * 1_000_000).when(unit == "ms").then(v * 1_000)
              .when(unit == "us").then(v).otherwise(v // 1_000))
    iso = col.str.to_datetime(time_zone="UTC", strict=False, time_unit="us")
    return pl.when(v.is_not_null()).then(pl.from_epoch(micros, time_unit="us").dt.replace_time_zone("UTC")).otherwise(iso)


def load_folder(folder: str | Path, name: str | None = None, check_media: bool = True) -> Dataset:
    """Load a folder in the generic format (items.*, interactions.*, media/); ``check_media``: check each
    media file's header (and an image's end marker) at load, dropping parts that would not decode."""
    folder = Path(folder)
    items = _find(folder, "items", (".jsonl", ".csv", ".parquet"))
    interactions = _find(folder, "interactions", (".csv", ".parquet"))
    media = folder / "media" if (folder / "media").is_dir() else folder
    return load_generic(items, interactions, media, name=name or folder.name, check_media=check_media)
