"""Two-tower training end to end: Feast point-in-time rows -> Lightning fit with ranking validation,
early stopping and the best checkpoint -> MLflow (params, per-epoch metrics, both towers as logged
models with signatures, the item vectors, a registered model with an alias).

Scale-out is configuration: ``train.strategy="ddp"``, ``train.devices``, ``train.num_nodes``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import torch

from features.store import FeatureRepo
from recsys import contract
from recsys.config import Config
from recsys.data.types import Catalog
from recsys.eval.evaluate import EvalResult, history_matrix, score_topk
from recsys.eval.splits import EvalSet, Split
from recsys.memory import release
from recsys.rerank import Candidates
from training.datamodule import TwoTowerData, ValidationData
from features.inputs import History, ItemInputs, ItemStatsAsOf, TrainingRowsBuilder, UserInputs, eval_inputs
from training.module import RankingValidation, TwoTowerModule, rank_by_time, validate
from training.towers import TowerConfig


@dataclass
class TrainedTwoTower:
    """A fitted two-tower and what serving/evaluation needs to use it."""

    name: str
    module: TwoTowerModule
    content_vectors: np.ndarray  # (n_items, D) the embedder vectors it reads (zeros for the ID-only variant)
    val_results: list[EvalResult] = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    examples: int = 0
    run_id: str | None = None
    model_version: str | None = None
    datamodule: TwoTowerData | None = field(default=None, repr=False)  # the training data it was fit on
    checkpoint: Path | None = None  # the best epoch's Lightning checkpoint
    val_seconds: float = 0.0  # of ``seconds``, the per-epoch ranking validation's share

    def drop_training_data(self) -> None:
        """Let go of the training rows once no fit will resume (evaluation, registering and serving never read
        them): the fit's datamodule, and the Lightning trainer the module points at, which holds it too. At 10M
        interactions that is 3.2 GB that evaluation and the feature writes need not share the machine with."""
        self.datamodule = None
        self.module.trainer = None
        gc.collect()  # the trainer, its callbacks and the datamodule refer to each other: only the collector frees them
        release()

    @property
    def train_examples_per_s(self) -> float:
        """Training throughput alone (the per-epoch validation's time left out)."""
        return self.examples * self.epochs / max(self.seconds - self.val_seconds, 1e-9)

    def register(self, cfg: Config, catalog: Catalog, split: Split, alias: str | None, item_space: str,
                 item_input: str = "fused") -> str:
        """Log both towers to MLflow and register the user tower (``alias`` points at it); ``item_space``: the
        version of the item vectors it reads, ``item_input`` their kind (recsys.embed.item_input)."""
        val = self.inputs(split.val, catalog, cfg)
        queries = self.module.encode_users(val.users, self.item_content)  # real user-tower outputs: the index tunes on them
        self.model_version = log_towers(self, cfg, catalog, val.items, alias, item_space, queries, item_input)
        return self.model_version

    @property
    def item_content(self) -> np.ndarray:
        return np.vstack([self.content_vectors, np.zeros((1, self.content_vectors.shape[1]), np.float32)])

    @property
    def examples_per_s(self) -> float:
        return self.examples * self.epochs / max(self.seconds, 1e-9)

    def inputs(self, es: EvalSet, catalog: Catalog, cfg: Config) -> ValidationData:
        """Tower inputs for an eval set, built from its history as serving would see it."""
        users, items, asof = eval_inputs(es.history, es.users, catalog, self.content_vectors, cfg.features.recent_items,
                                         cfg.embedder.history_half_life, at=es.at)
        return ValidationData(es, users, items, asof, history_matrix(es.history, es.users, catalog.index, len(catalog)))

    def evaluate(self, split: Split, catalog: Catalog, cfg: Config, part: str = "test", n_boot: int = 1000,
                 keep_topk: bool = False, ranked: Candidates | None = None) -> EvalResult:
        """Rank the eval set's users (top 50) and score them. ``ranked``: its :meth:`candidates` (n >= 50) when
        already computed for the reranker: their first 50 are this ranking (the same FAISS search with a larger
        k), so the item tower's per-week passes are not run twice."""
        es = split.test if part == "test" else split.val
        if ranked is not None:
            if len(ranked.rows) != len(es) or ranked.rows.shape[1] < 50:
                raise ValueError(f"ranked candidates of shape {ranked.rows.shape} do not cover {len(es)} users x 50")
            n_cand = es.candidates.size if es.candidates is not None else len(catalog)
            return score_topk(self.name, ranked.rows[:, :50], es, n_cand, split.name, part, n_boot=n_boot, keep_topk=keep_topk)
        return validate(self.module, self.inputs(es, catalog, cfg), self.item_content, catalog.index, split.name,
                        part=part, n_boot=n_boot, name=self.name, kind=cfg.serve.faiss_index, keep_topk=keep_topk)

    def candidates(self, es: EvalSet, catalog: Catalog, cfg: Config, n: int) -> Candidates:
        """Top-``n`` FAISS candidates per user (seen items excluded), with what the reranker reads."""
        data = self.inputs(es, catalog, cfg)
        rows = np.full((len(es), n), -1, np.int64)
        scores = np.full((len(es), n), -np.inf, np.float32)
        stats = np.zeros((len(es), n, len(contract.ITEM_STATS)), np.float32)
        for idx, s, r, table in rank_by_time(self.module, data, self.item_content, catalog.index, n, cfg.serve.faiss_index):
            rows[idx], scores[idx] = r, s
            stats[idx] = table[np.where(r >= 0, r, 0)]
        content = self.content_vectors[np.where(rows >= 0, rows, 0)]
        return Candidates(rows, scores, data.users.history, data.users.stats, stats, content)


def launched_shard() -> tuple[int, int] | None:
    """(rank, world) of a process that torchrun (or any launcher setting RANK and WORLD_SIZE) started as one of
    several; None for a single process (and for ddp_spawn's parent, whose children shard in the datamodule)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def training_rows(repo: FeatureRepo, split: Split, catalog: Catalog, dim: int, recent: int, int8_above: int = 0,
                  shard: tuple[int, int] | None = None):
    """Point-in-time training rows for ``split.train`` from Feast (streamed a batch at a time), the items' stats
    snapshots, and which items have interactions in training (whose ids the model may learn).

    Args:
        int8_above: past this many rows the history vectors are held as int8 (features.inputs.History); 0: never.
        shard: (rank, world): join and hold only rows rank, rank + world, ... (one DDP process's share)."""
    labels = split.train.select("user_id", "item_id", "timestamp")
    item_rows = labels["item_id"].replace_strict(catalog.index, return_dtype=pl.Int64).to_numpy()
    known = np.zeros(len(catalog), bool)
    known[item_rows] = True
    mine = labels if shard is None else labels.gather(np.arange(shard[0], labels.height, shard[1]))
    asof = ItemStatsAsOf(repo.item_stats_snapshots(), catalog)
    builder = TrainingRowsBuilder(mine, catalog, dim, recent, known, int8=0 < int8_above < labels.height, asof=asof)
    for batch in repo.training_batches(mine):
        builder.add(batch)
    rows = builder.done()
    if shard is not None:
        rows.shard, rows.total = shard, labels.height
        rows.item_counts = np.bincount(item_rows, minlength=len(catalog))
    return rows, asof, known


def fit_two_tower(cfg: Config, catalog: Catalog, split: Split, repo: FeatureRepo | None, content_vectors: np.ndarray,
                  name: str = "two-tower", use_ids: bool | None = None, register: bool = False,
                  alias: str | None = None, rows_cache: dict | None = None, max_epochs: int | None = None,
                  resume: TrainedTwoTower | None = None) -> TrainedTwoTower:
    """Train on ``split.train`` (features from ``repo``, built from that same training data), validate on
    ``split.val`` every epoch, keep the best epoch. ``content_vectors`` of zeros gives the ID-only baseline.

    Args:
        max_epochs: stop after this many epochs (default ``cfg.train.max_epochs``); the last epoch is kept
            so that the fit can be resumed (a screening fit, see recsys.flows.protocol.VariantSearch).
        resume: such a stopped fit, continued from its last epoch up to ``cfg.train.max_epochs`` with its data,
            model, optimizer, early-stopping state and MLflow run (``repo`` and ``content_vectors`` unused)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    t = cfg.train
    if resume is not None and register:
        raise ValueError("register a resumed fit with TrainedTwoTower.register (its Feast repo is not passed again)")
    L.seed_everything(t.seed, workers=True)
    if resume is not None:
        dm, module, content_vectors = resume.datamodule, resume.module.train(), resume.content_vectors
        logger = MLFlowLogger(experiment_name=cfg.mlflow_experiment, tracking_uri=cfg.tracking_uri,
                              run_id=resume.run_id, log_model=False)
    else:
        dm, module = _two_tower_data(cfg, catalog, split, repo, content_vectors, use_ids, rows_cache)
        logger = MLFlowLogger(experiment_name=cfg.mlflow_experiment, tracking_uri=cfg.tracking_uri,
                              run_name=f"{name}/{split.name}", log_model=False)
        logger.log_hyperparams({"name": name, "protocol": split.name, "content_dim": content_vectors.shape[1],
                                "embedder": cfg.embedder.backend, **{f"train.{k}": v for k, v in t.model_dump().items()}})
    ckpt_dir = cfg.models_dir / f"{name}-{split.name}"
    validation = RankingValidation(dm, catalog.index, split.name, bucket_s=cfg.train.val_bucket_days * 86400.0,
                                   max_groups=cfg.train.val_max_groups, results=resume.val_results if resume else None)
    callbacks = [validation,
                 EarlyStopping(monitor="val/NDCG10", mode="max", patience=t.patience, check_on_train_epoch_end=True),
                 ModelCheckpoint(dirpath=ckpt_dir, monitor="val/NDCG10", mode="max", save_top_k=1,
                                 save_on_train_epoch_end=True, filename="best", save_last=max_epochs is not None)]
    if t.hard_negatives > 0:
        from training.module import MineHardNegatives

        callbacks.append(MineHardNegatives(dm, t.hard_negatives))
    trainer = L.Trainer(max_epochs=max_epochs or t.max_epochs, accelerator=t.accelerator, devices=t.devices,
                        strategy=t.strategy, num_nodes=t.num_nodes, logger=logger, callbacks=callbacks, deterministic=True,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        limit_train_batches=t.epoch_batches or 1.0, use_distributed_sampler=False,  # rows shard themselves
                        log_every_n_steps=20)
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_dir / "last.ckpt") if resume is not None else None)
    seconds = time.time() - t0 + (resume.seconds if resume else 0.0)
    release()  # the epochs' batches and activations (recsys/memory.py)
    best = callbacks[2].best_model_path
    if best and Path(best).exists():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    module.eval()
    epochs = max(trainer.current_epoch, int(trainer.callback_metrics.get("train/epochs", 0)))
    per_epoch = min(len(dm.rows), t.epoch_batches * t.batch_size) if t.epoch_batches else len(dm.rows)
    out = TrainedTwoTower(name, module, content_vectors.astype(np.float32), validation.results,
                          epochs, seconds, per_epoch, run_id=logger.run_id, datamodule=dm,
                          val_seconds=validation.seconds + (resume.val_seconds if resume else 0.0),
                          checkpoint=Path(best) if best and Path(best).exists() else None)
    if trainer.is_global_zero and register:
        out.register(cfg, catalog, split, alias, repo.views.item_embedding.tags["model_version"])
    return out


def _two_tower_data(cfg: Config, catalog: Catalog, split: Split, repo: FeatureRepo, content_vectors: np.ndarray,
                    use_ids: bool | None, rows_cache: dict | None) -> tuple[TwoTowerData, TwoTowerModule]:
    """The training rows (from Feast), the validation inputs and a fresh model for :func:`fit_two_tower`."""
    t, e = cfg.train.for_protocol(split.name), cfg.embedder
    dim = content_vectors.shape[1]
    key = (split.name, repo.views.item_embedding.name)
    if rows_cache is not None and key in rows_cache:
        rows, asof, known = rows_cache[key]
    else:
        rows, asof, known = training_rows(repo, split, catalog, repo.dim, cfg.features.recent_items, t.int8_history_above,
                                          shard=launched_shard())
        if rows_cache is not None:
            rows_cache[key] = (rows, asof, known)
    if dim != repo.dim:  # a variant that reads other vectors (ID-only: zeros) has zero histories too
        # a new object, never in-place: ``rows`` may be shared through ``rows_cache`` with later fits
        rows = rows.with_history(History.empty(len(rows), dim, int8=False))
    vu, vi, vasof = eval_inputs(split.val.history, split.val.users, catalog, content_vectors, cfg.features.recent_items,
                                e.history_half_life, at=split.val.at)
    seen = history_matrix(split.val.history, split.val.users, catalog.index, len(catalog))
    dm = TwoTowerData(rows, content_vectors, asof, known, ValidationData(split.val, vu, vi, vasof, seen), t)
    tower = TowerConfig(content_dim=dim, n_items=len(catalog), out_dim=t.out_dim, hidden_dim=t.hidden_dim,
                        dropout=t.dropout, use_ids=t.id_choices[0] if use_ids is None else use_ids,
                        recent=cfg.features.recent_items,
                        user_encoder=t.user_encoder, newest_items=min(t.newest_choices[0], cfg.features.recent_items),
                        newest_skip=t.newest_skip, content_match=t.content_match)
    return dm, TwoTowerModule(tower, t, dm.log_q(), known)


def export_user_tower(tower: torch.nn.Module, example: tuple, path: Path) -> Path:
    """The user tower as a ``torch.export`` program (batch dimension dynamic): serving loads it with
    ``torch.export.load`` and needs no class from ``training/``."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    args = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in example)
    program = torch.export.export(tower.eval(), args, dynamic_shapes=tuple({0: batch} for _ in args))
    torch.export.save(program, str(path))
    return path


def log_towers(trained: TrainedTwoTower, cfg: Config, catalog: Catalog, items: ItemInputs, alias: str | None,
               embedder_version: str, queries: np.ndarray | None = None, item_input: str = "fused") -> str:
    """Both towers as MLflow models with signatures, the item vectors and the exported user tower as
    artifacts (with a sample of user-tower outputs, on which serving tunes an approximate index), and the
    user tower registered as ``train.registered_model`` (the alias, e.g. champion, points at it)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    mlflow.set_tracking_uri(cfg.tracking_uri)
    m, tc = trained.module, trained.module.model.cfg
    n = 2  # the signatures' examples: two users with nothing yet, two new items (names and order: recsys.contract)
    user_example = tuple(t.numpy() for t in UserInputs.empty(n, tc.recent, tc.content_dim, tc.n_items).tensors(
        np.zeros((tc.n_items + 1, tc.content_dim), np.float32), np.zeros(tc.n_items + 1, bool)))
    item_example = tuple(t.numpy() for t in ItemInputs(np.zeros((n, tc.content_dim), np.float32),
                                                       np.zeros((n, len(contract.ITEM_STATS)), np.float32),
                                                       np.zeros(n, np.int64), np.zeros(n, bool)).tensors())
    out_spec = Schema([TensorSpec(np.dtype(np.float32), (-1, tc.vector_dim), "vector")])

    def spec(names, example):
        return Schema([TensorSpec(x.dtype, (-1, *x.shape[1:]), nm) for nm, x in zip(names, example)])

    user_sig = ModelSignature(spec(contract.USER_INPUTS, user_example), out_spec)
    item_sig = ModelSignature(spec(contract.ITEM_INPUTS, item_example), out_spec)
    vectors = m.encode_items(items)
    with mlflow.start_run(run_id=trained.run_id):
        for name, tower, example, sig in ((contract.USER_TOWER_MODEL, m.model.user, user_example, user_sig),
                                          (contract.ITEM_TOWER_MODEL, m.model.item, item_example, item_sig)):
            mlflow.pytorch.log_model(tower.eval(), name=name, signature=sig, serialization_format="pickle",
                                     input_example=None, pip_requirements=["torch"])
        with tempfile.TemporaryDirectory() as tmp:
            arrays = {"ids": np.array(catalog.ids), "titles": np.array(catalog.titles), "vectors": vectors,
                      "content": trained.content_vectors, "known": m.known.numpy()[:-1],
                      "temperature": float(m.temperature.detach()),
                      "queries": np.zeros((0, tc.vector_dim), np.float32) if queries is None else queries[:1000]}
            np.savez_compressed(Path(tmp) / contract.ITEM_VECTORS_FILE, **{k: arrays[k] for k in contract.ITEM_VECTOR_ARRAYS})
            export_user_tower(m.model.user, user_example, Path(tmp) / contract.USER_TOWER_FILE)
            match = m.model.user.match  # the learned content-match weight (serving's /similar reads it)
            (Path(tmp) / contract.CONFIG_FILE).write_text(json.dumps({
                "tower": tc.to_dict(), "embedder": cfg.embedder.backend, "embedder_version": embedder_version,
                "dim": tc.content_dim, "embedder_dim": cfg.embedder.dim, "item_input": item_input,
                "name": trained.name, "epochs": trained.epochs, "contract": contract.record(tc.layout),
                **({"content_match_weight": float(match.detach())} if match is not None else {})}, indent=2))
            mlflow.log_artifacts(tmp, artifact_path=contract.ARTIFACT_PATH)
        mlflow.log_metric("train/examples_per_s", trained.examples_per_s)
        model_uri = f"runs:/{trained.run_id}/{contract.USER_TOWER_MODEL}"
    with contextlib.redirect_stderr(io.StringIO()) as said:  # MLflow prints "Successfully registered ..." itself
        version = mlflow.register_model(model_uri, cfg.train.registered_model)
    logging.getLogger(__name__).info(said.getvalue().strip())
    if alias:
        mlflow.tracking.MlflowClient().set_registered_model_alias(cfg.train.registered_model, alias, version.version)
    return str(version.version)


def log_reranker(cfg: Config, run_id: str, reranker) -> None:
    """The fitted reranker beside the towers in the run's artifacts (recsys.contract.RERANKER_FILE)."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        reranker.save(Path(tmp) / contract.RERANKER_FILE)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(Path(tmp) / contract.RERANKER_FILE), artifact_path=contract.ARTIFACT_PATH)
