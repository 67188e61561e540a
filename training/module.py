"""The math of two-tower training: towers, loss, temperature, and per-epoch ranking validation.

Validation ranks the whole catalog (or the protocol's candidates) for every validation user through
a FAISS index, excluding what they have seen, and logs Recall@10/50 and NDCG@10; early stopping and
the best checkpoint follow ``val/NDCG10``.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch import nn

from recsys.config import TrainConfig
from recsys.eval.evaluate import EvalResult, history_matrix, score_topk
from serving.candidates import CandidateIndex
from training.datamodule import TwoTowerData, ValidationData
from training.inputs import ItemInputs, UserInputs
from training.losses import sampled_softmax_loss
from training.towers import TowerConfig, TwoTower


class TwoTowerModule(L.LightningModule):
    def __init__(self, tower: TowerConfig, cfg: TrainConfig, log_q: torch.Tensor, known: np.ndarray):
        super().__init__()
        self.cfg = cfg
        self.model = TwoTower(tower)
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)),
                                         requires_grad=cfg.learn_temperature)
        self.register_buffer("log_q", log_q if cfg.logq_correction else torch.zeros_like(log_q))
        self.register_buffer("known", torch.from_numpy(np.append(known, False)))  # items whose ids were trained

    @property
    def temperature(self) -> torch.Tensor:
        return 1.0 / self.log_inv_temp.exp().clamp(1.0, 100.0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["recsys"] = {"tower": self.model.cfg.to_dict(), "train": self.cfg.model_dump()}

    @classmethod
    def from_checkpoint(cls, path) -> "TwoTowerModule":
        """Rebuild from a checkpoint written during fit (towers, temperature, logQ table, known ids)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta, state = ckpt["recsys"], ckpt["state_dict"]
        module = cls(TowerConfig(**meta["tower"]), TrainConfig(**meta["train"]), state["log_q"],
                     state["known"].numpy()[:-1])
        module.load_state_dict(state)
        return module.eval()

    # Encoding (also used by evaluation and serving) --------------------------------------------------
    def user_vectors(self, b: dict) -> torch.Tensor:
        return self.model.user(b["u_history"], b["u_recent"], b["u_recent_rows"], b["u_recent_mask"],
                               b["u_recent_id_mask"], b["u_stats"])

    @torch.inference_mode()
    def encode_items(self, items: ItemInputs, batch: int = 8192) -> np.ndarray:
        """(N, vector_dim) item vectors; ids only for items the model was trained on."""
        self.eval()
        c, s, r, k = items.tensors()
        k = k & self.known[r]
        out = [self.model.item(c[i:i + batch], s[i:i + batch], r[i:i + batch], k[i:i + batch]) for i in range(0, len(r), batch)]
        return torch.cat(out).numpy()

    @torch.inference_mode()
    def encode_users(self, users: UserInputs, item_content: np.ndarray, batch: int = 4096) -> np.ndarray:
        """(N, vector_dim) user vectors; ``item_content`` is the (n_items + 1, D) table, last row zeros."""
        self.eval()
        known = self.known.numpy()
        out = []
        for i in range(0, len(users.history), batch):
            part = UserInputs(users.history[i:i + batch], users.recent_rows[i:i + batch], users.recent_mask[i:i + batch],
                              users.stats[i:i + batch])
            t = part.tensors(item_content, known)
            out.append(self.model.user(*t))
        return torch.cat(out).numpy()

    # Training ------------------------------------------------------------------------------------
    def training_step(self, b: dict, batch_idx: int) -> torch.Tensor:
        u = self.user_vectors(b)
        pos = self.model.item(b["p_content"], b["p_stats"], b["p_rows"], b["p_id_mask"])
        neg = self.model.item(b["n_content"], b["n_stats"], b["n_rows"], b["n_id_mask"]) if "n_rows" in b else None
        hard = None
        if "h_rows" in b:
            B, H = b["h_rows"].shape
            hard = self.model.item(b["h_content"].flatten(0, 1), b["h_stats"].flatten(0, 1), b["h_rows"].flatten(),
                                   b["h_id_mask"].flatten()).view(B, H, -1)
        loss = sampled_softmax_loss(
            u, pos, b["p_rows"], self.temperature,
            log_q=self.log_q if self.cfg.logq_correction else None,
            neg_item=neg, neg_ids=b.get("n_rows"), hard_item=hard, hard_ids=b.get("h_rows"),
            remove_accidental_hits=self.cfg.remove_accidental_hits, row_groups=b.get("user"),
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(u))
        self.log("train/temperature", self.temperature, batch_size=len(u))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


class RankingValidation(L.Callback):
    """Full-ranking validation at the end of every training epoch; logs val/Recall10, val/Recall50, val/NDCG10."""

    def __init__(self, dm: TwoTowerData, catalog_index: dict[str, int], protocol: str, every: int = 1):
        self.dm, self.index, self.protocol, self.every = dm, catalog_index, protocol, every
        self.results: list[EvalResult] = []

    def on_train_epoch_start(self, trainer, module):
        self.dm.epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, module):
        if self.dm.val is None or (trainer.current_epoch + 1) % self.every:
            return
        result = validate(module, self.dm.val, self.dm.item_content, self.index, self.protocol, n_boot=1)
        self.results.append(result)
        # MLflow metric names allow no "@": val/Recall10, val/Recall50, val/NDCG10
        module.log_dict({f"val/{m.replace('@', '')}": result.estimates[m].mean for m in ("Recall@10", "Recall@50", "NDCG@10")},
                        prog_bar=True)
        module.train()


def validate(module: TwoTowerModule, val: ValidationData, item_content: np.ndarray, catalog_index: dict[str, int],
             protocol: str, part: str = "val", n_boot: int = 1000, name: str = "two-tower", kind: str = "flat",
             keep_topk: bool = False) -> EvalResult:
    """Rank with the model through FAISS and score the rankings (see recsys.eval)."""
    es = val.eval_set
    items = module.encode_items(val.items)
    cand = es.candidates if es.candidates is not None else np.arange(len(items))
    index = CandidateIndex(items[cand], kind=kind, rows=cand)
    users = module.encode_users(val.users, item_content)
    seen = history_matrix(es.history, es.users, catalog_index, len(items))
    _, rows = index.search(users, 50, exclude=seen)
    return score_topk(name, rows, es, cand.size, protocol, part, n_boot=n_boot, keep_topk=keep_topk)


class MineHardNegatives(L.Callback):
    """Before every epoch after the first: for each training row, ``per_row`` items that the current model
    ranks high for that user (ranks 5..top, skipping the positive: the very top are often unseen positives)."""

    def __init__(self, dm: TwoTowerData, per_row: int, top: int = 50, skip: int = 5):
        self.dm, self.per_row, self.top, self.skip = dm, per_row, top, skip

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 0:
            return
        dm = self.dm
        rng = np.random.default_rng([dm.cfg.seed, trainer.current_epoch])
        items = ItemInputs(dm.item_content[:-1], dm.asof.all_at(float(dm.rows.times.max()) + 1),
                           np.arange(dm.n_items, dtype=np.int64), dm.known[:-1])
        index = CandidateIndex(module.encode_items(items))
        _, cand = index.search(module.encode_users(dm.rows.users, dm.item_content), self.top)
        pick = rng.integers(self.skip, self.top - 1, size=(len(cand), self.per_row))
        hard = np.take_along_axis(cand, pick, axis=1)
        clash = hard == dm.rows.items.rows[:, None]
        hard[clash] = np.take_along_axis(cand, pick + 1, axis=1)[clash]
        dm.hard = np.where(hard < 0, rng.integers(0, dm.n_items, hard.shape), hard)
        module.train()
