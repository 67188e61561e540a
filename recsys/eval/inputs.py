"""What the models read on one evaluation protocol: user tags limited to its training window, every item as a
brand-new item looks (COLD), the embedder-overlap check, and which protocols a dataset can form at all."""

from __future__ import annotations

import json

import numpy as np

from recsys.config import Config
from recsys.content import ContentError
from recsys.data import Dataset
from recsys.embed import item_embedder
from recsys.embed.catalog import EmbeddingFailures, ItemVectors, with_cold
from recsys.errors import DataError
from recsys.progress import console


def tags_in_training_window(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> tuple[Dataset, ItemVectors]:
    """``ds`` and ``iv`` with the items' user tags limited to ``split``'s training window: a user's tags count
    only before the time they are asked at validation (and none after the training data ends), so no item
    content carries a tag its author applied later (TEMPORAL: a third of MovieLens's tags fall after the cut).
    Only the items whose content changes are embedded again."""
    from datetime import timedelta

    if ds.tags is None or split.train.is_empty():
        return ds, iv
    end = split.train["timestamp"].max() + timedelta(seconds=1)
    limit = {u: min(a, end) for u, a in zip(split.val.users, split.val.at) if a is not None}
    pds, changed, dropped = ds.with_tags_before(limit, end)
    if not changed:
        return pds, iv
    res = item_embedder(cfg, iv.item_input).embed_many([pds.catalog.content(r) for r in changed], task="document",
                                                       dim=cfg.embedder.dim)
    if res.errors:
        raise EmbeddingFailures({e.item_id or str(e.index): e.message for e in res.errors}, len(changed), 0.0)
    vectors = iv.vectors.copy()
    vectors[changed] = res.vectors
    console.print(f"{split.name}: user tags limited to the training window: {dropped:,} of {ds.tags.height:,} tags left "
                  f"out, {len(changed):,} items embedded again")
    return pds, ItemVectors(iv.ids, vectors, iv.backend, iv.model_version, iv.dim, iv.failed, iv.cold,
                            item_input=iv.item_input)


def new_item_vectors(cfg: Config, ds: Dataset, iv: ItemVectors) -> np.ndarray:
    """(n_items, D): every item as a brand-new item would look, its own content without user-derived parts (tags):
    rows with such parts take their cold version (``iv.cold``, else embedded now), the others keep ``iv.vectors``.
    An item whose content without them does not embed (nothing but tags) keeps its vector, and is named."""
    rows = [r for r, parts in enumerate(ds.catalog.items["parts"].to_list()) if any(p["source"] == "user" for p in parts)]
    missing = [r for r in rows if r not in iv.cold]
    vectors = with_cold(iv.vectors, iv.cold, np.array(rows, dtype=np.int64))
    contents, kept = [], {}  # kept: item id -> why it keeps its tagged vector
    for r in missing:
        try:
            contents.append((r, ds.catalog.content(r, cold=True)))
        except ContentError as exc:  # nothing of its own but tags
            kept[ds.catalog.ids[r]] = exc.problem
    if contents:
        res = item_embedder(cfg, iv.item_input).embed_many([c for _, c in contents], task="document",
                                                           dim=cfg.embedder.dim)
        done = np.array([r for r, _ in contents])[res.ok]
        vectors[done] = res.vectors[res.ok]
        kept |= {e.item_id or str(e.index): e.message for e in res.errors}
    if kept:
        console.print(f"[yellow]{len(kept)} item(s) have no content of their own that embeds without their user tags "
                      f"and keep their tagged vectors[/yellow], e.g. " + "; ".join(f"{i}: {m}" for i, m in list(kept.items())[:5]))
    return vectors


def protocol_vectors(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> tuple[Dataset, ItemVectors, np.ndarray]:
    """What the two-tower reads on ``split``: the dataset and item vectors with user tags limited to the training
    window (:func:`tags_in_training_window`) and the (n_items, D) matrix it trains and is scored on. On COLD the
    cold items take their new-item version, and with ``train.cold.item_content`` "new" every item does."""
    pds, tiv = tags_in_training_window(cfg, ds, iv, split)
    if split.name != "cold":
        return pds, tiv, tiv.vectors
    if cfg.train.cold.item_content == "new":
        return pds, tiv, new_item_vectors(cfg, ds, iv)
    return pds, tiv, tiv.with_cold(split.cold_items)


def embedder_trained_test_users(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> set[str]:
    """The test users of a warm ``split`` whose target the local embedder's weights trained on (a LOO tie draw
    other than the one the weights were trained with holds out another of the same-second interactions): a
    benchmark that varies the draw leaves them out (:meth:`recsys.eval.splits.Split.without_test_users`) rather
    than let :func:`check_embedder_overlap` refuse the split. Empty for other embedders and other data."""
    from recsys.embed.provenance import trained_test_interactions

    data = _weights_training_data(cfg, ds, iv)
    if data is None or split.name == "cold":
        return set()
    return set(trained_test_interactions(data, ds, split)["user_id"].to_list())


def embedder_trained_cold_items(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> list[str]:
    """The items a COLD ``split`` hides that the local embedder's weights trained on (another draw of the cold
    items than the weights were trained with): a benchmark over draws records them, as such a draw's figures
    are not comparable. Empty for other embedders and other data."""
    from recsys.embed.provenance import trained_cold_items

    data = _weights_training_data(cfg, ds, iv)
    return [] if data is None or split.name != "cold" else trained_cold_items(data, ds, split)


def _weights_training_data(cfg: Config, ds: Dataset, iv: ItemVectors) -> dict | None:
    """The installed local weights' record of their training data, where ``iv`` comes from them and they trained
    on ``ds``; None otherwise."""
    if iv.backend != "local":
        return None
    from recsys.embed.local import DEFAULT_WEIGHTS
    from recsys.embed.provenance import dataset_hash

    manifest = json.loads(((cfg.embedder.local_weights or DEFAULT_WEIGHTS) / "manifest.json").read_text())
    data = manifest.get("training_data")
    if manifest.get("version") != iv.weights_version or not data or data.get("dataset_hash") != dataset_hash(ds):
        return None
    return data


def check_embedder_overlap(cfg: Config, ds: Dataset, iv: ItemVectors, split) -> None:
    """Refuse (DataError) to evaluate ``split`` with local embedder weights that trained on its test items or
    interactions (recsys.embed.provenance); print what was checked."""
    if iv.backend != "local":
        return
    from recsys.embed.local import DEFAULT_WEIGHTS
    from recsys.embed.provenance import check_overlap

    manifest = json.loads(((cfg.embedder.local_weights or DEFAULT_WEIGHTS) / "manifest.json").read_text())
    if manifest.get("version") != iv.weights_version:
        console.print(f"[yellow]the item vectors come from {iv.model_version}, not the installed weights "
                      f"{manifest.get('version')}: overlap not checked[/yellow]")
        return
    console.print(f"[dim]{check_overlap(manifest.get('training_data'), ds, split)}[/dim]")


def feasible_protocols(cfg: Config, ds: Dataset) -> list[str]:
    """Print the data report and return the configured protocols this dataset can form; none -> DataError
    (nothing is trained, so nothing is registered from a run that could not be evaluated)."""
    from recsys.data.check import check_dataset

    check = check_dataset(ds, cfg.eval)
    console.print(check.table())
    ok = check.feasible(list(cfg.eval.protocols))
    if not ok:
        reasons = "; ".join(f"{p.protocol}: {p.reason}" for p in check.protocols)
        raise DataError(f"no evaluation protocol can be formed on {ds.name} ({reasons}); "
                        "see `recsys data check`")
    for p in check.protocols:
        if not p.ok:
            console.print(f"[yellow]protocol {p.protocol} skipped: {p.reason}[/yellow]")
    return ok
