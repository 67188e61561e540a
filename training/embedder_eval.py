"""Measuring the local embedder's fusion model on featurized held-out tasks (recsys.embed.tasks): what picks
its checkpoints (:func:`val_score`) in every training stage."""

from __future__ import annotations

import numpy as np
import torch

from recsys.embed.base import truncate_normalize
from recsys.embed.fusion import FusionEncoder
from recsys.embed.local import ModalityCentres, signature
from recsys.embed.tasks import DIGITS, PairTask
from recsys.eval.embedder import chance, nearest_label_accuracy, retrieval_recall


def _torch_segments(segs):
    return [(name, torch.from_numpy(np.asarray(f, dtype=np.float32))) for name, f in segs]



@torch.inference_mode()
def encode(model: FusionEncoder, feats: list, batch: int = 256) -> np.ndarray:
    was = model.training
    model.eval()
    out = [model([_torch_segments(s) for s in feats[i : i + batch]]) for i in range(0, len(feats), batch)]
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.out_dim), np.float32)


def evaluate_tasks(model: FusionEncoder, tasks: dict[str, PairTask], centres: ModalityCentres | None = None,
                   dim: int = 256, memo: dict | None = None) -> dict[str, float]:
    """Held-out metrics: media <-> text retrieval, digit accuracy, part -> item search (over the task's b's and
    its distractors: the rest of the catalog), with chance levels beside them; with ``centres``, on the vectors
    the embedder serves (modality gap corrected). ``memo`` keeps the raw outputs between calls on one model."""
    out: dict[str, float] = {}

    def vectors(task: PairTask, side: str) -> np.ndarray:  # each side with its task prefix
        key = (task.name, side)
        raw = memo[key] if memo is not None and key in memo else encode(model, task.feats[side][1])
        if memo is not None:
            memo[key] = raw
        if centres is None:
            return truncate_normalize(raw, dim)
        contents, t = {"a": (task.a, task.a_task), "b": (task.b, task.b_task),
                       "distractors": (task.distractors, task.b_task)}[side]
        return centres.apply(raw, [signature(c, t) for c in contents], dim)

    for key, task in tasks.items():
        a, b = vectors(task, "a"), vectors(task, "b")
        if "distractors" in task.feats:
            b = np.concatenate([b, vectors(task, "distractors")])
        n = len(b)
        if key == "digit-word":  # val/test words are the bare digit names
            first = [next(i for i, c in enumerate(task.b) if c.text() == w) for w in DIGITS]
            out["digit-word/audio->word acc"] = nearest_label_accuracy(a, b[first], task.groups)
            out["digit-word/chance"] = 0.1
            continue
        t2a, a2t = retrieval_recall(b[: len(task)], a), retrieval_recall(a, b)
        ch = chance(n)  # of a->b, over the b's and the distractors
        name = {"poster-text": ("text->poster", "poster->text"), "synthetic-caption": ("caption->media", "media->caption"),
                "part-item": ("item->part", "part->item")}.get(key, ("b->a", "a->b"))
        for k in (1, 10):
            out[f"{key}/{name[0]} R@{k}"] = t2a[k]
            out[f"{key}/{name[1]} R@{k}"] = a2t[k]
            out[f"{key}/chance R@{k}"] = ch[k]
        if key == "synthetic-caption":  # captions of one cluster are interchangeable: also score by cluster
            top = (a @ b.T).argmax(1)
            out[f"{key}/media->caption same-cluster@1"] = float((task.groups[top] == task.groups).mean())
            out[f"{key}/chance same-cluster@1"] = float(np.mean([(task.groups == g).mean() for g in task.groups]))
    return out


def mlflow_name(key: str) -> str:
    """MLflow metric names take letters, digits, '_', '/', '.', ' ' and '-' only."""
    return key.replace("->", " to ").replace("@", " at ")


def val_score(metrics: dict[str, float]) -> float:
    """What picks checkpoints: the real-data retrieval counts double (text->poster R@10 is the headline)."""
    weights = {"text->poster R@10": 2.0, "audio->word acc": 1.0, "same-cluster@1": 1.0, "part->item R@1": 1.0}
    parts = [(w, metrics[k]) for k in metrics for suffix, w in weights.items() if k.endswith(suffix)]
    return float(sum(w * v for w, v in parts) / sum(w for w, _ in parts)) if parts else 0.0
