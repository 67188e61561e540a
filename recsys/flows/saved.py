"""`recsys evaluate models`: the two-tower checkpoints a run kept, reloaded with the item vectors they were
trained on, scored again beside the baselines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from recsys.config import Config
from recsys.data import Dataset, load_dataset
from recsys.embed.catalog import ItemVectors, aligned, embed_catalog, item_input_candidates, load_item_vectors
from recsys.eval import make_split
from recsys.eval.compare import ProtocolRun, baseline_results, results_table
from recsys.eval.inputs import check_embedder_overlap, protocol_vectors, tags_in_training_window
from recsys.progress import console


def keep_checkpoint(cfg: Config, trained, protocol: str, item_input: str) -> Path | None:
    """Copy the kept model's best checkpoint to ``models/two-tower-<protocol>/best.ckpt`` with the item input it
    reads beside it (``recsys evaluate`` reloads both)."""
    folder = cfg.models_dir / f"two-tower-{protocol}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "item_input.json").write_text(json.dumps({"item_input": item_input}))
    if trained.checkpoint is None:
        return None
    target = folder / "best.ckpt"
    if Path(trained.checkpoint).resolve() != target.resolve():
        shutil.copyfile(trained.checkpoint, target)
    return target


def kept_two_tower(cfg: Config, ds: Dataset, iv: ItemVectors, split):
    """The two-tower checkpoint kept for ``split``'s protocol (:func:`keep_checkpoint`) with the item vectors it
    was trained on (:func:`protocol_vectors`): its item input, user tags in the training window, on COLD the
    new-item versions (``train.cold.item_content``).

    Returns:
        (TrainedTwoTower, item input, the ItemVectors it reads)."""
    from training.module import TwoTowerModule
    from training.train import TrainedTwoTower

    ckpt = cfg.models_dir / f"two-tower-{split.name}" / "best.ckpt"
    mode_file = ckpt.parent / "item_input.json"
    mode = json.loads(mode_file.read_text())["item_input"] if mode_file.exists() else iv.item_input
    civ = iv if mode == iv.item_input else item_input_candidates(cfg.with_item_input("auto"), ds, iv)[mode]
    _, tiv, tvec = protocol_vectors(cfg, ds, civ, split)
    return TrainedTwoTower("two-tower", TwoTowerModule.from_checkpoint(ckpt), tvec), mode, tiv


def kept_two_tower_scorer(cfg: Config, ds: Dataset, protocol: str = "loo", held_out: int = 2):
    """The two-tower kept for ``protocol`` (the one `recsys demo` / `recsys train` registers) as a rival in the
    ranking stage's verdict (recsys.ranking.fit ``rivals``, :func:`recsys.ranking.against_rival`). It learned
    from all but each user's last ``held_out`` interactions (LOO: validation and test), so of a
    :class:`~recsys.eval.splits.Rounds` block that ends at each user's last interaction (the fit for serving) it
    is scored on those last questions only, each with its own history, as the evaluation scores any eval set.

    Returns:
        (scorer or None where no checkpoint was kept or the catalog has no saved vectors, ``ds`` with the rows the
        vectors have: the ranker must fit on the same rows, or the questions' targets would not line up)."""
    from recsys.eval.splits import RoundsSplit

    ckpt = cfg.models_dir / f"two-tower-{protocol}" / "best.ckpt"
    if not ckpt.exists() or not (cfg.workdir / "embeddings" / "manifest.json").exists():
        return None, ds
    iv = load_item_vectors(cfg)
    ds = aligned(ds, iv)

    def score(r):
        """(which, result): the questions at each user's last ``held_out`` positions (LOO trained on the rest),
        and the two-tower's per-question result on them."""
        pos = pl.DataFrame({"owner": r.owner, "pos": [int(q.rsplit("#", 1)[1]) for q in r.questions.users]})
        which = np.flatnonzero(pos.select(pl.col("pos").rank("ordinal", descending=True).over("owner") <= held_out)
                               .to_series().to_numpy())
        sub = r.subset(which)
        split = RoundsSplit(protocol, sub.questions, sub.questions, fit=r.fit)
        trained, _, _ = kept_two_tower(cfg, ds, iv, split)
        pds, _ = tags_in_training_window(cfg, ds, iv, split)
        return which, trained.evaluate(split, pds.catalog, cfg, part="val", n_boot=1)

    return score, ds


def evaluate_saved(cfg: Config, baselines: tuple[str, ...] = ("popularity", "ease")) -> list[ProtocolRun]:
    """Re-evaluate the two-tower checkpoints of a previous `recsys train` beside the baselines."""
    iv = load_item_vectors(cfg)
    ds = aligned(load_dataset(cfg), iv)
    runs = []
    for protocol in cfg.eval.protocols:
        ckpt = cfg.models_dir / f"two-tower-{protocol}" / "best.ckpt"
        if not ckpt.exists():
            console.print(f"[yellow]no checkpoint for {protocol} at {ckpt}: run `recsys train` first[/yellow]")
            continue
        split = make_split(protocol, ds, cfg.eval)
        check_embedder_overlap(cfg, ds, iv, split)
        if protocol == "cold":
            iv.cold = embed_catalog(cfg, ds, cold=True, save=False)[0].cold
        trained, mode, tiv = kept_two_tower(cfg, ds, iv, split)
        pds, piv = tags_in_training_window(cfg, ds, iv, split)  # the content baselines' vectors
        vectors = piv.with_cold(split.cold_items) if protocol == "cold" else piv.vectors
        console.print(f"{protocol}: the two-tower reads the {mode} item vectors ({tiv.model_version})")
        results = [trained.evaluate(split, pds.catalog, cfg, n_boot=cfg.eval.bootstrap),
                   *baseline_results(cfg, pds, piv, split, vectors, baselines)]
        runs.append(ProtocolRun(protocol, results, trained, split))
    console.print(results_table(runs))
    return runs
