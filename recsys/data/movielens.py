"""MovieLens (ml-latest-small layout) loader.

Item content, in order: a text part "Title (year) | genres", the poster image when a poster folder
has ``<movieId>.jpg``, then a text part with the most frequent user tags (marked ``source="user"``
so cold-start evaluation can drop it). Every rating is one implicit interaction.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.config import BUNDLED_MOVIELENS
from recsys.data.types import ITEM_SCHEMA, Catalog, Dataset, Interactions, LoadReport, tag_text, top_tags

_YEAR = r"\((\d{4})\)\s*$"
# The ids of the 2,947 movies that have a poster in ../shared/data/movielens-posters (ids only, no images):
# the COLD protocol draws its cold items from them, with or without the posters at hand.
POSTER_IDS_FILE = Path(__file__).resolve().parent / "movielens_poster_ids.txt"


def _read_csv(path: Path) -> pl.DataFrame:
    # Everything as text first, so a bad value becomes a reported null instead of a failed load.
    return pl.read_csv(path, infer_schema=False, quote_char='"')


def _examples(frame: pl.DataFrame, n: int = 5) -> list[str]:
    return [", ".join(f"{k}={v}" for k, v in row.items()) for row in frame.head(n).iter_rows(named=True)]


def item_text(title: str, genres: list[str]) -> str:
    return f"{title} | {', '.join(genres) if genres else 'no genres'}"


def load_movielens(
    path: str | Path | None = None,
    posters: str | Path | None = None,
    max_tags_per_item: int = 10,
) -> Dataset:
    """Load ml-latest-small (or any folder with the same CSV layout).

    Args:
        path: folder with movies.csv, ratings.csv and (optionally) tags.csv; default: the bundled copy.
        posters: folder of ``<movieId>.jpg`` posters, attached as image parts where present.
        max_tags_per_item: most frequent tags kept per movie.
    """
    root = Path(path) if path is not None else BUNDLED_MOVIELENS
    report = LoadReport(source=f"movielens:{root}")
    if not (root / "movies.csv").exists() or not (root / "ratings.csv").exists():
        raise FileNotFoundError(f"{root} lacks movies.csv or ratings.csv (expected the ml-latest-small layout)")

    # Movies ---------------------------------------------------------------------------------
    movies = _read_csv(root / "movies.csv").with_columns(
        pl.col("movieId").str.strip_chars().alias("item_id"),
        pl.col("title").str.strip_chars(),
    )
    bad_id = movies.filter(pl.col("item_id").cast(pl.Int64, strict=False).is_null() | pl.col("title").is_null())
    report.add("movies with a bad id or no title (skipped)", _examples(bad_id), bad_id.height)
    movies = movies.join(bad_id.select("item_id"), on="item_id", how="anti").unique("item_id", keep="first", maintain_order=True)
    movies = movies.with_columns(
        pl.col("title").str.extract(_YEAR, 1).cast(pl.Int32, strict=False).alias("year"),
        pl.when(pl.col("genres") == "(no genres listed)")
        .then(pl.lit([], dtype=pl.List(pl.Utf8)))
        .otherwise(pl.col("genres").str.split("|"))
        .alias("genres"),
    )
    known = set(movies["item_id"].to_list())

    # Tags (user-derived text) -------------------------------------------------------------------
    tags_by_item: dict[str, list[str]] = {}
    tags_path = root / "tags.csv"
    if tags_path.exists():
        tags = _read_csv(tags_path).with_columns(pl.col("tag").str.strip_chars().str.to_lowercase())
        unknown = tags.filter(~pl.col("movieId").is_in(list(known)))
        report.add("tags on unknown movies (skipped)", _examples(unknown), unknown.height)
        tag_events = tags.filter(pl.col("movieId").is_in(list(known)) & pl.col("tag").is_not_null()).select(
            pl.col("movieId").str.strip_chars().alias("item_id"), pl.col("userId").str.strip_chars().alias("user_id"),
            "tag", pl.from_epoch(pl.col("timestamp").cast(pl.Int64, strict=False).fill_null(0), time_unit="s")
            .dt.replace_time_zone("UTC").alias("timestamp"))
        tags_by_item = top_tags(tag_events, max_tags_per_item)

    # Parts ----------------------------------------------------------------------------------
    poster_dir = Path(posters) if posters is not None else None
    if poster_dir is not None and not poster_dir.is_dir():
        report.add("poster folder missing (no images attached)", str(poster_dir))
        poster_dir = None
    poster_files = {p.stem for p in poster_dir.glob("*.jpg")} if poster_dir is not None else set()
    stray = sorted(poster_files - known, key=lambda s: (len(s), s))
    report.add("poster files for unknown movies (ignored)", stray[:5], len(stray))

    parts_col = []
    for item_id, title, genres in movies.select("item_id", "title", "genres").iter_rows():
        parts = [{"kind": "text", "text": item_text(title, genres), "path": None, "source": "content"}]
        if item_id in poster_files:
            parts.append({"kind": "image", "text": None, "path": str(poster_dir / f"{item_id}.jpg"), "source": "content"})
        if tags_by_item.get(item_id):
            parts.append({"kind": "text", "text": tag_text(tags_by_item[item_id]), "path": None, "source": "user"})
        parts_col.append(parts)
    items = movies.select("item_id", "title", "year", "genres").with_columns(
        pl.Series("parts", parts_col, dtype=ITEM_SCHEMA["parts"])
    )

    # Ratings -> interactions ----------------------------------------------------------------
    ratings = _read_csv(root / "ratings.csv").with_columns(
        pl.col("userId").str.strip_chars().alias("user_id"),
        pl.col("movieId").str.strip_chars().alias("item_id"),
        pl.col("timestamp").cast(pl.Int64, strict=False).alias("ts"),
        pl.col("rating").cast(pl.Float32, strict=False).alias("value"),
    )
    bad_ts = ratings.filter(pl.col("ts").is_null() | (pl.col("ts") < 0))
    report.add("ratings with an unparseable timestamp (skipped)", _examples(bad_ts.select("userId", "movieId", "timestamp")), bad_ts.height)
    unknown_item = ratings.filter(~pl.col("item_id").is_in(list(known)))
    report.add("ratings of unknown movies (skipped)", _examples(unknown_item.select("userId", "movieId")), unknown_item.height)
    no_user = ratings.filter(pl.col("user_id").is_null() | (pl.col("user_id") == ""))
    report.add("ratings without a user (skipped)", _examples(no_user.select("userId", "movieId")), no_user.height)
    good = ratings.filter(
        pl.col("ts").is_not_null() & (pl.col("ts") >= 0) & pl.col("item_id").is_in(list(known))
        & pl.col("user_id").is_not_null() & (pl.col("user_id") != "")
    )
    frame = good.select(
        "user_id",
        "item_id",
        pl.from_epoch("ts", time_unit="s").dt.replace_time_zone("UTC").alias("timestamp"),
        "value",
    )
    interactions = Interactions(frame)
    report.loaded = {"items": items.height, "interactions": len(interactions), "users": interactions.n_users,
                     "posters": len(poster_files & known)}
    return Dataset("movielens", Catalog(items), interactions, report,
                   tags=tag_events if tags_path.exists() else None, max_tags_per_item=max_tags_per_item)
