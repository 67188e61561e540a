"""Typed containers for a catalog, its interactions, and what went wrong while loading them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import numpy as np
import polars as pl

from recsys.content import KINDS, Content, Part
from recsys.errors import DataError

PART_DTYPE = pl.Struct({"kind": pl.Utf8, "text": pl.Utf8, "path": pl.Utf8, "source": pl.Utf8})
ITEM_SCHEMA = {"item_id": pl.Utf8, "title": pl.Utf8, "parts": pl.List(PART_DTYPE)}
INTERACTION_SCHEMA = {
    "user_id": pl.Utf8,
    "item_id": pl.Utf8,
    "timestamp": pl.Datetime("us", "UTC"),
    "value": pl.Float32,
}


@dataclass
class Problem:
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """Counts of what was loaded and of every kind of bad row, with a few examples of each.

    Bad rows are skipped (or the bad part dropped) and recorded here; they never stop the load.
    """

    source: str
    loaded: dict[str, int] = field(default_factory=dict)
    problems: dict[str, Problem] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, problem: str, examples: list[str] | str, count: int | None = None) -> None:
        examples = [examples] if isinstance(examples, str) else list(examples)
        n = len(examples) if count is None else count
        if n == 0:
            return
        entry = self.problems.setdefault(problem, Problem())
        entry.count += n
        room = self.max_examples - len(entry.examples)
        entry.examples.extend(examples[: max(room, 0)])

    def count(self, problem: str) -> int:
        return self.problems[problem].count if problem in self.problems else 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        loaded = ", ".join(f"{v:,} {k}" for k, v in self.loaded.items())
        lines = [f"{self.source}: loaded {loaded}"]
        for name, p in self.problems.items():
            lines.append(f"  ! {p.count:,} {name}, e.g. {'; '.join(p.examples)}")
        return "\n".join(lines)


@dataclass
class Catalog:
    """Items, each an ordered list of parts.

    ``items`` columns: ``item_id`` (str), ``title`` (str), ``parts`` (list of struct kind/text/path/source),
    plus any metadata columns a loader adds (year, genres, cluster, ...).
    """

    items: pl.DataFrame

    def __post_init__(self) -> None:
        missing = [c for c in ITEM_SCHEMA if c not in self.items.columns]
        if missing:
            raise DataError(f"catalog frame lacks columns {missing}")
        if self.items["item_id"].is_duplicated().any():
            dup = self.items.filter(pl.col("item_id").is_duplicated())["item_id"].head(5).to_list()
            raise DataError(f"catalog has duplicate item ids, e.g. {dup}")

    def __len__(self) -> int:
        return self.items.height

    @cached_property
    def ids(self) -> list[str]:
        return self.items["item_id"].to_list()

    @cached_property
    def index(self) -> dict[str, int]:
        """item_id -> row position (the dense index every model uses)."""
        return {item_id: i for i, item_id in enumerate(self.ids)}

    @cached_property
    def titles(self) -> list[str]:
        return self.items["title"].to_list()

    def content(self, row: int, cold: bool = False) -> Content:
        """The item at ``row`` as a Content; ``cold`` drops user-derived parts (tags)."""
        parts = []
        for p in self.items["parts"][row]:
            if cold and p["source"] == "user":
                continue
            if p["kind"] == "text":
                parts.append(Part.of_text(p["text"], source=p["source"] or "content"))
            else:
                parts.append(Part(p["kind"], path=p["path"], source=p["source"] or "content"))
        return Content(tuple(parts), item_id=self.ids[row])

    def one_part_queries(self, row: int) -> dict[str, Content]:
        """Queries made of one part of the item at ``row``: its first image alone (when it has one) and its title
        alone. What search by any one part is trained on (recsys/embed/tasks.py) and measured with
        (recsys/eval/embedder_report.py part_to_item)."""
        item_id = self.ids[row]
        image = next((p for p in self.content(row).parts if p.kind == "image"), None)
        out = {"image alone": Content((image,), item_id=item_id)} if image is not None else {}
        out["title alone"] = Content.of(self.titles[row], item_id=item_id)
        return out

    def contents(self, rows: list[int] | None = None, cold_rows: set[int] | frozenset[int] = frozenset()) -> list[Content]:
        rows = range(len(self)) if rows is None else rows
        return [self.content(r, cold=r in cold_rows) for r in rows]

    @cached_property
    def modalities(self) -> np.ndarray:
        """(n_items, 4) bool: which of text/image/audio/video each item has."""
        kinds = self.items.select(pl.col("parts").list.eval(pl.element().struct.field("kind")))["parts"]
        out = np.zeros((len(self), len(KINDS)), dtype=bool)
        for i, ks in enumerate(kinds.to_list()):
            for k in ks:
                out[i, KINDS.index(k)] = True
        return out


@dataclass
class Interactions:
    """(user, item, timestamp, optional value[, seq]) rows, sorted by user then time."""

    frame: pl.DataFrame

    def __post_init__(self) -> None:
        # ``seq``: an event-log row's sequence (recsys.events; 0 for the dataset's own rows), kept when present
        extra = [pl.col("seq").fill_null(0).cast(pl.Int64)] if "seq" in self.frame.columns else []
        self.frame = self.frame.select(
            [pl.col(c).cast(t) for c, t in INTERACTION_SCHEMA.items()] + extra
        ).sort(["user_id", "timestamp"], maintain_order=True)  # ties keep the file's order

    def __len__(self) -> int:
        return self.frame.height

    @property
    def n_users(self) -> int:
        return self.frame["user_id"].n_unique()


@dataclass
class Dataset:
    """A catalog, its interactions, and the report of what loading them found."""

    name: str
    catalog: Catalog
    interactions: Interactions
    report: LoadReport
    tags: pl.DataFrame | None = None  # user-derived text events (item_id, user_id, tag, timestamp): MovieLens tags
    max_tags_per_item: int = 10

    def _like(self, catalog: Catalog, frame: pl.DataFrame) -> "Dataset":
        return Dataset(self.name, catalog, Interactions(frame), self.report, self.tags, self.max_tags_per_item)

    def with_tags_before(self, limit: dict[str, datetime], default: datetime) -> tuple["Dataset", list[int], int]:
        """The dataset whose items' tag parts count only tags applied before their author's limit (``limit``
        per user, else ``default``): an evaluation protocol's training window, so no item's content carries a
        tag from after the time a model is asked about its author.

        Returns:
            (that dataset, catalog rows whose content changed, number of tags left out)."""
        if self.tags is None or self.tags.is_empty():
            return self, [], 0
        lim = pl.DataFrame({"user_id": list(limit), "limit": list(limit.values())},
                           schema={"user_id": pl.Utf8, "limit": self.tags.schema["timestamp"]})
        kept = self.tags.join(lim, on="user_id", how="left").filter(
            pl.col("timestamp") < pl.col("limit").fill_null(default)).drop("limit")
        by_item = top_tags(kept, self.max_tags_per_item)
        parts_col, changed = [], []
        for row, (item_id, parts) in enumerate(self.catalog.items.select("item_id", "parts").iter_rows()):
            new = [p for p in parts if p["source"] != "user"]
            if by_item.get(item_id):
                new.append({"kind": "text", "text": tag_text(by_item[item_id]), "path": None, "source": "user"})
            if new != parts:
                changed.append(row)
            parts_col.append(new)
        items = self.catalog.items.with_columns(pl.Series("parts", parts_col, dtype=self.catalog.items.schema["parts"]))
        return self._like(Catalog(items), self.interactions.frame), changed, self.tags.height - kept.height

    def with_users(self, max_users: int | None) -> "Dataset":
        """A slice: the first ``max_users`` users (by id order) and all items."""
        if max_users is None:
            return self
        users = self.interactions.frame["user_id"].unique(maintain_order=True).head(max_users)
        frame = self.interactions.frame.filter(pl.col("user_id").is_in(users.implode()))
        return self._like(self.catalog, frame)

    def without_items(self, item_ids: list[str] | set[str], problem: str) -> "Dataset":
        """The dataset minus ``item_ids`` and their interactions, recorded in the report under ``problem``
        (e.g. items that failed to embed: they get no vector at all, never a stand-in)."""
        drop = set(item_ids)
        if not drop:
            return self
        items = self.catalog.items.filter(~pl.col("item_id").is_in(list(drop)))
        frame = self.interactions.frame.filter(~pl.col("item_id").is_in(list(drop)))
        self.report.add(problem, sorted(drop)[:5], count=len(drop))
        return self._like(Catalog(items), frame)


def top_tags(tag_events: pl.DataFrame, max_tags_per_item: int) -> dict[str, list[str]]:
    """(item_id, user_id, tag, timestamp) rows -> each item's ``max_tags_per_item`` most frequent tags."""
    top = (tag_events.group_by(["item_id", "tag"]).len()
           .sort(["item_id", "len", "tag"], descending=[False, True, False])
           .group_by("item_id", maintain_order=True).agg(pl.col("tag").head(max_tags_per_item)))
    return dict(zip(top["item_id"].to_list(), top["tag"].to_list()))


def tag_text(tags: list[str]) -> str:
    return "tags: " + ", ".join(tags)
