"""Paired data for training the local embedder's fusion model, and its held-out evaluation sets.

Every task is a list of (a, b) Content pairs with a group id (pairs of one group are not negatives
of each other). Stage 1 aligns modalities on real pairs; stage 2 adds item-item co-engagement.

- posters <-> "title | genres"       (MovieLens posters; the COLD protocol's test movies are held out;
                                       mirrored posters as a second view; posters <-> their genres too)
- spoken digit <-> the digit's word  (FSDD; one speaker held out for test, one for validation)
- synthetic video/image/audio <-> caption (volume for the modalities MovieLens lacks)
- co-engaged items <-> each other    (stage 2; only interactions every protocol trains on)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys.config import EvalConfig
from recsys.content import Content, Part
from recsys.data import Dataset
from recsys.data.movielens import item_text
from recsys.data.synthetic import SyntheticSpec, generate, load_folder
from recsys.eval.splits import cold_split, shared_training_interactions

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("{w}", "the number {w}", "someone saying {w}", "spoken digit {w}")


@dataclass
class PairTask:
    """Pairs for one task. ``hard`` (optional) holds, per pair, the index of a mined hard-negative b."""

    name: str
    a: list[Content]
    b: list[Content]
    groups: np.ndarray
    weight: float = 1.0
    a_task: str = "document"
    b_task: str = "query"
    hard: np.ndarray | None = None
    a_augmented: list[Content] | None = None  # another view of each a (e.g. the mirrored poster), drawn half the time
    # held-out evaluation: b-side contents that are nobody's pair, ranked with the b's for a->b (part->item
    # search over the whole catalog, where the items that fool a one-part query are)
    distractors: list[Content] | None = None

    def __len__(self) -> int:
        return len(self.a)


@dataclass
class EmbedderData:
    """Training tasks per stage and the held-out sets (val for model choice, test for the report)."""

    stage1: list[PairTask] = field(default_factory=list)
    stage2: list[PairTask] = field(default_factory=list)
    val: dict[str, PairTask] = field(default_factory=dict)
    test: dict[str, PairTask] = field(default_factory=dict)
    sources: dict[str, object] = field(default_factory=dict)  # what went in (for the manifest)
    part_item: PairTask | None = None  # stage 2: one part of an item <-> the whole item
    provenance: dict | None = None  # the dataset and split it learned from (checked before any evaluation)


def _mirrored(path: str) -> Content:
    import io

    from PIL import Image, ImageOps

    buf = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buf, format="PNG")
    return Content((Part("image", data=buf.getvalue(), mime_type="image/png"),))


def poster_tasks(ds: Dataset, cfg: EvalConfig, own_val: float | None = None) -> tuple[PairTask, PairTask, PairTask]:
    """(train, val, test) poster <-> text pairs; test is the COLD protocol's test movies.

    Args:
        own_val: None: val is the COLD protocol's validation movies. A share (e.g. 0.1): val is that share of the
            other poster movies (seeded), and the COLD validation movies are left out altogether, so the
            embedder's checkpoint choice and the two-tower's COLD validation share no item."""
    split = cold_split(ds, cfg)
    test_rows, val_rows = set(split.test.candidates.tolist()), set(split.val.candidates.tolist())
    items = ds.catalog.items
    has_image = ds.catalog.modalities[:, 1]
    out: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    draw = np.random.default_rng([cfg.seed, 11]).random(len(ds.catalog))
    for row in np.flatnonzero(has_image):
        if own_val is None:
            part = "test" if row in test_rows else "val" if row in val_rows else "train"
        elif row in val_rows:
            continue
        else:
            part = "test" if row in test_rows else "val" if draw[row] < own_val else "train"
        poster = next(p for p in items["parts"][int(row)] if p["kind"] == "image")
        title, genres = items["title"][int(row)], items["genres"][int(row)].to_list()
        item_id = ds.catalog.ids[int(row)]
        out[part][0].append(Content((Part.of_file("image", poster["path"]),), item_id=item_id))
        out[part][1].append(Content.of(item_text(title, genres), item_id=item_id))
    return tuple(PairTask(f"poster-text/{k}", a, b, np.arange(len(a))) for k, (a, b) in out.items())  # type: ignore[return-value]


def poster_genre_task(ds: Dataset, train: PairTask) -> PairTask:
    """Training posters <-> their genre list (what a poster can show); one group per genre set."""
    genres = dict(zip(ds.catalog.ids, ds.catalog.items["genres"].to_list()))
    texts = [", ".join(genres[c.item_id]) or "no genres" for c in train.a]
    codes = {t: i for i, t in enumerate(sorted(set(texts)))}
    return PairTask("poster-genres", list(train.a), [Content.of(f"a {t} movie") for t in texts],
                    np.array([codes[t] for t in texts]), weight=0.3, a_augmented=train.a_augmented)


def digit_tasks(fsdd_dir: Path, test_speaker: str = "theo", val_speaker: str = "jackson",
                rng: np.random.Generator | None = None) -> tuple[PairTask, PairTask, PairTask]:
    """(train, val, test) spoken digit <-> word; speakers never cross splits. Groups = the digit."""
    rng = rng or np.random.default_rng(0)
    split: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "val": ([], [], []), "test": ([], [], [])}
    for wav in sorted(Path(fsdd_dir).glob("*.wav")):
        digit, speaker, _ = wav.stem.split("_")
        part = "test" if speaker == test_speaker else "val" if speaker == val_speaker else "train"
        template = DIGIT_TEMPLATES[0] if part != "train" else DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
        a, b, g = split[part]
        a.append(Content((Part.of_file("audio", wav),), item_id=wav.stem))
        b.append(Content.of(template.format(w=DIGITS[int(digit)])))
        g.append(int(digit))
    return tuple(PairTask(f"digit-word/{k}", a, b, np.array(g)) for k, (a, b, g) in split.items())  # type: ignore[return-value]


def synthetic_tasks(folder: Path, n_items: int = 600, seed: int = 1) -> tuple[PairTask, PairTask, PairTask]:
    """(train, val, test) synthetic media <-> caption pairs (70/15/15 by item). Groups = the cluster."""
    if not (folder / "items.jsonl").exists():
        generate(folder, SyntheticSpec(n_items=n_items, n_users=10, n_clusters=12, seed=seed, share_audio=0.25,
                                       share_video=0.35, share_interleaved=0.0, share_media_only=0.0))
    ds = load_folder(folder, name="synthetic-captions")
    rng = np.random.default_rng(seed)
    clusters = ds.catalog.items["cluster"].to_numpy()
    which = rng.choice(["train", "val", "test"], size=len(ds.catalog), p=[0.7, 0.15, 0.15])
    split: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "val": ([], [], []), "test": ([], [], [])}
    for row in range(len(ds.catalog)):
        c = ds.catalog.content(row)
        media = [p for p in c.parts if p.kind != "text"]
        caption = next((p for p in c.parts if p.kind == "text"), None)
        if not media or caption is None:
            continue
        a, b, g = split[str(which[row])]
        a.append(Content((media[0],), item_id=c.item_id))
        b.append(Content((caption,), item_id=c.item_id))
        g.append(int(clusters[row]))
    return tuple(PairTask(f"synthetic-caption/{k}", a, b, np.array(g)) for k, (a, b, g) in split.items())  # type: ignore[return-value]


def coengagement_task(ds: Dataset, frame: pl.DataFrame, max_pairs: int = 40000, window: int = 3,
                      per_item_cap: int = 30, seed: int = 0) -> PairTask:
    """Pairs of items one user engaged with within ``window`` steps of each other. Each item keeps at
    most ``per_item_cap`` pairs as anchor, so popular items don't drown the rest. Item contents drop
    user-derived parts half of the time, so the fused vector also works for brand-new items."""
    rng = np.random.default_rng(seed)
    index = ds.catalog.index
    seqs = frame.sort(["user_id", "timestamp"], maintain_order=True).group_by("user_id", maintain_order=True).agg("item_id")
    pairs = set()
    for items in seqs["item_id"].to_list():
        idx = [index[i] for i in items]
        for d in range(1, window + 1):
            for x, y in zip(idx[:-d], idx[d:]):
                if x != y:
                    pairs.add((x, y) if rng.random() < 0.5 else (y, x))
    arr = np.array(sorted(pairs), dtype=np.int64)
    arr = arr[rng.permutation(len(arr))]
    kept, count = [], {}
    for x, y in arr:
        if count.get(x, 0) < per_item_cap:
            count[x] = count.get(x, 0) + 1
            kept.append((x, y))
        if len(kept) >= max_pairs:
            break
    a = [ds.catalog.content(int(x), cold=bool(rng.random() < 0.5)) for x, _ in kept]
    b = [ds.catalog.content(int(y), cold=bool(rng.random() < 0.5)) for _, y in kept]
    return PairTask("coengagement", a, b, np.array([x for x, _ in kept]), a_task="document", b_task="document")


def part_item_task(ds: Dataset, rows: list[int], name: str = "part-item", seed: int | None = 0) -> PairTask:
    """One part of an item (its poster alone, or its title alone) as a query <-> the whole item as a document,
    for the given movies (training: never the COLD protocol's held-out ones; a movie without a poster gives its
    title alone). Teaches search to find an item from
    any one of its parts, whatever else the catalog's items carry. With a ``seed`` (training), the whole item
    drops its user-derived parts half of the time (a brand-new item has none); without one (held-out
    evaluation), it never has them."""
    rng = np.random.default_rng(seed) if seed is not None else None
    a, b, g = [], [], []
    for row in rows:
        item = ds.catalog.content(row, cold=rng is None or bool(rng.random() < 0.5))
        for q in ds.catalog.one_part_queries(row).values():
            a.append(q)
            b.append(item)
            g.append(row)
    return PairTask(name, a, b, np.array(g), a_task="query", b_task="document")


def training_provenance(ds: Dataset, cfg: EvalConfig) -> dict:
    """What the embedder's weights learned from, for the evaluation's overlap check (recsys.embed.provenance):
    the dataset's content hash, the split settings, and the items and interactions it held out."""
    from recsys.embed.provenance import dataset_hash

    split = cold_split(ds, cfg)
    held_items = sorted(np.array(ds.catalog.ids)[split.cold_items].tolist())
    return {"dataset": ds.name, "dataset_hash": dataset_hash(ds),
            "split": {"seed": cfg.seed, "cold_fraction": cfg.cold_fraction, "cold_pool": cfg.cold_pool,
                      "temporal_quantile": cfg.temporal_quantile, "loo_ties": "seeded"},
            "held_out_items": held_items,
            "interactions": "shared_training_interactions: not a LOO validation/test row, not a held-out item's, "
                            "before the TEMPORAL validation cut"}


def build(ds: Dataset | None, cfg: EvalConfig, fsdd_dir: Path | None, synthetic_dir: Path,
          coengagement_pairs: int = 40000, titles_without_posters: bool = False,
          own_val: float | None = None) -> EmbedderData:
    """Every task the data at hand allows; sources that are absent are left out (and say so).

    Args:
        own_val: the poster validation set (checkpoint choice): None, the COLD protocol's validation movies (the
            installed weights); a share, that share of the other poster movies (see poster_tasks).
        titles_without_posters: the part-item task also pairs the title of every movie without a poster (not
            held out) with its item. Off: with share 0.2 it moved title-alone R@1 from 0.839 to 0.846 and cost
            poster-alone R@1 (0.947 -> 0.922; BENCHMARKS.md, search by one part)."""
    data = EmbedderData()
    if ds is not None and ds.catalog.modalities[:, 1].any():
        tr, va, te = poster_tasks(ds, cfg, own_val)
        tr.a_augmented = [_mirrored(c.parts[0].path) for c in tr.a]
        data.stage1 += [tr, poster_genre_task(ds, tr)]
        data.val["poster-text"], data.test["poster-text"] = va, te
        index = ds.catalog.index
        rows = [index[c.item_id] for c in tr.a]
        held = set(cold_split(ds, cfg).cold_items.tolist())
        if titles_without_posters:
            rows += [int(r) for r in np.flatnonzero(~ds.catalog.modalities[:, 1]) if int(r) not in held]
        data.part_item = part_item_task(ds, rows)
        for part, pt in (("val", va), ("test", te)):
            own = [index[c.item_id] for c in pt.a]
            task = data.val if part == "val" else data.test
            task["part-item"] = part_item_task(ds, own, f"part-item/{part}", seed=None)
            # the rest of the catalog as distractors (validation: never an item the COLD protocol holds out)
            skip = set(own) | (held if part == "val" else set())
            others = [r for r in range(len(ds.catalog)) if r not in skip]
            task["part-item"].distractors = [ds.catalog.content(r, cold=True) for r in others]
        data.sources["posters"] = {"train": len(tr), "val": len(va), "test (held out)": len(te),
                                   "val from": "COLD validation movies" if own_val is None else
                                   f"{own_val:g} of the other poster movies (COLD validation movies left out)"}
    else:
        data.sources["posters"] = "absent"
    if fsdd_dir is not None and Path(fsdd_dir).is_dir():
        tr, va, te = digit_tasks(Path(fsdd_dir))
        tr.weight = 0.5
        data.stage1.append(tr)
        data.val["digit-word"], data.test["digit-word"] = va, te
        data.sources["fsdd"] = {"train": len(tr), "val speaker": "jackson", "test speaker": "theo"}
    else:
        data.sources["fsdd"] = "absent"
    tr, va, te = synthetic_tasks(synthetic_dir)
    tr.weight = 0.5
    data.stage1.append(tr)
    data.val["synthetic-caption"], data.test["synthetic-caption"] = va, te
    data.sources["synthetic"] = {"train": len(tr), "val": len(va), "test": len(te)}
    if ds is not None:
        co = coengagement_task(ds, shared_training_interactions(ds, cfg), max_pairs=coengagement_pairs)
        data.stage2 = [*data.stage1, co] + ([data.part_item] if data.part_item is not None else [])
        co.weight = 2.0
        data.sources["part-item"] = len(data.part_item) if data.part_item is not None else "absent"
        data.provenance = training_provenance(ds, cfg)
        data.sources["coengagement"] = {"pairs": len(co), "from": "interactions shared by the LOO, COLD and TEMPORAL training sets"}
    else:
        data.stage2 = list(data.stage1)
    return data
