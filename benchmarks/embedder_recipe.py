"""Which image path aligns posters with their text? Stage-1-only fusion runs on the poster tasks.

Each variant trains the fusion model from the same start, with the shipped recipe, on the training posters
(poster <-> "title | genres" and poster <-> genres) for ``steps`` steps, validates every ``val_every`` on the
COLD validation movies, and reports held-out (COLD test movies) text->poster and poster->text R@10 at the
step that was best on validation and at the last step. Only the image path changes between variants:

- tokens only: the EfficientNet global + 2x2 grid tokens (what feat-v1 gave), no image anchor;
- + style token: the per-stage channel mean/std statistics as one more token;
- + style + image anchor: the shipped model (an MLP from [style, global] straight to the output).
"""

from __future__ import annotations

import copy
from pathlib import Path


def _strip_style(task) -> None:
    for side, (plain, prefixed) in task.feats.items():
        task.feats[side] = tuple([[s for s in segs if s[0] != "image_style"] for segs in feats] for feats in (plain, prefixed))


def image_path_ablation(workdir: Path, posters: str, steps: int = 400, val_every: int = 50, seed: int = 0) -> dict:
    import lightning as L

    from recsys.config import Config
    from recsys.data.movielens import load_movielens
    from recsys.embed.backbones import Backbones, Featurizer
    from recsys.embed.fusion import FusionConfig
    from recsys.embed import tasks as ed
    from training.embedder import EmbedderTrainConfig, FusionModule, _fit, featurize_tasks, init_from_data
    from training.embedder_eval import evaluate_tasks

    cfg = Config.load(None, workdir=str(workdir), data={"posters": posters})
    ds = load_movielens(posters=posters)
    train, val, test = ed.poster_tasks(ds, cfg.eval)
    train.a_augmented = [ed._mirrored(c.parts[0].path) for c in train.a]
    genres = ed.poster_genre_task(ds, train)
    featurizer = Featurizer(Backbones(), cache_dir=cfg.cache_dir, memory_items=100_000)
    for task in (train, genres, val, test):
        featurize_tasks([task], featurizer)

    variants = {  # name: (keep the style token, fusion config)
        "tokens only (global + 2x2 grid)": (False, FusionConfig(image_anchor_hidden=0)),
        "+ style token": (True, FusionConfig(image_anchor_hidden=0)),
        "+ style token + image anchor (shipped)": (True, FusionConfig()),
    }
    base = EmbedderTrainConfig(stage1_steps=steps, val_every=val_every, seed=seed)
    out = {"train_posters": len(train), "val_posters": len(val), "test_posters": len(test), "steps": steps,
           "lr": base.lr, "weight_decay": base.weight_decay, "variants": {}}
    for name, (style, fusion) in variants.items():
        tasks = [copy.copy(t) for t in (train, genres, val, test)]
        for t in tasks:
            t.feats = dict(t.feats)
            if not style:
                _strip_style(t)
        tr, ge, va, te = tasks
        L.seed_everything(seed, workers=True)
        module = FusionModule(fusion, base, steps)
        init_from_data(module.model, [tr, ge])
        v = _fit(module, [tr, ge], steps, base, {"poster-text": va}, False, seed)
        rows = []
        for step, score, state in v.history:
            module.model.load_state_dict(state)
            m = evaluate_tasks(module.model, {"poster-text": te})
            rows.append({"step": step, "val text->poster R@10": score,
                         "test text->poster R@10": m["poster-text/text->poster R@10"],
                         "test poster->text R@10": m["poster-text/poster->text R@10"]})
        best = max(rows, key=lambda r: r["val text->poster R@10"])
        out["variants"][name] = {"at best validation step": best, "at last step": rows[-1], "history": rows}
        print(name, best, rows[-1], flush=True)
    out["chance R@10"] = 10 / len(test)
    return out
