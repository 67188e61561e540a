"""The math of two-tower training: towers, loss, temperature, and per-epoch ranking validation.

Validation ranks the whole catalog (or the protocol's candidates) for every validation user through
a FAISS index, excluding what they have seen, and logs Recall@10/50 and NDCG@10; early stopping and
the best checkpoint follow ``val/NDCG10``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch import nn

from recsys.config import TrainConfig
from recsys.contract import ITEM_INPUTS, USER_INPUTS
from recsys.eval.evaluate import EvalResult, history_matrix, score_topk
from recsys.index import CandidateIndex
from recsys.memory import release
from training.datamodule import TwoTowerData, ValidationData
from features.inputs import ItemInputs, UserInputs
from training.losses import sampled_softmax_loss
from training.towers import TowerConfig, TwoTower, stats_encoder


MATCH_LR = 1e-2  # the content-match weight's learning rate (towers.TowerConfig.content_match)


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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # dropout's randomness from (seed, epoch, batch, rank), like the batches' own: a fit resumed from its
        # last epoch (recsys.flows.protocol's variant screening) continues exactly as an uninterrupted one would
        torch.manual_seed(((self.cfg.seed * 100_003 + self.current_epoch) * 100_003 + batch_idx) * 64 + self.global_rank)

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
        """The user tower on a batch's ``u_<input>`` tensors (recsys.contract.USER_INPUTS), by name."""
        return self.model.user(**{k: b[f"u_{k}"] for k in USER_INPUTS})

    @torch.inference_mode()
    def encode_items(self, items: ItemInputs, batch: int = 8192) -> np.ndarray:
        """(N, vector_dim) item vectors; ids only for items the model was trained on."""
        self.eval()
        x = dict(zip(ITEM_INPUTS, items.tensors()))
        x["id_mask"] = x["id_mask"] & self.known[x["ids"]]
        n = len(items.rows)
        out = [self.model.item(**{k: v[i:i + batch] for k, v in x.items()}) for i in range(0, n, batch)]
        return torch.cat(out).numpy()

    def item_encoder(self, content: np.ndarray, rows: np.ndarray, known: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """``encode_items`` for the same items under many statistics tables (one per time bucket): the parts
        that do not depend on the statistics are computed once (ItemTower.with_fixed).

        Returns:
            stats (N, N_ITEM_STATS) -> (N, vector_dim) item vectors."""
        self.eval()
        return stats_encoder(self.model.item, content, rows, known & self.known.numpy()[rows])

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
        if self.model.user.match is not None:
            self.log("train/content_match_weight", self.model.user.match, batch_size=len(u))
        return loss

    def configure_optimizers(self):
        """AdamW; the id table in a group of its own at ``id_lr`` when set (its rows are each updated only when
        their item is in the batch, and start near zero: the towers' rate leaves them there), the content-match
        weight in one at MATCH_LR (a single scalar from zero: at the towers' rate it would barely move)."""
        table, match = self.model.id_table, self.model.user.match
        groups = []
        if table is not None and self.cfg.id_lr is not None:
            groups.append({"params": list(table.parameters()), "lr": self.cfg.id_lr})
        if match is not None:
            groups.append({"params": [match], "lr": MATCH_LR, "weight_decay": 0.0})
        own = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in self.parameters() if id(p) not in own]
        return torch.optim.AdamW([{"params": rest}, *groups], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


class RankingValidation(L.Callback):
    """Full-ranking validation at the end of every training epoch; logs val/Recall10, val/Recall50, val/NDCG10."""

    def __init__(self, dm: TwoTowerData, catalog_index: dict[str, int], protocol: str, every: int = 1,
                 bucket_s: float = 4 * 7 * 86400.0, max_groups: int | None = 32, results: list[EvalResult] | None = None):
        """Args: bucket_s: users asked within one bucket share the item statistics as of its earliest time;
        coarser than the final evaluation's week (fewer item-tower passes), which is fine for model selection;
        max_groups: at most this many buckets (LOO asks users over 20 years: 250 four-week buckets cost
        more than the epoch's training); results: earlier epochs' results (a resumed fit)."""
        self.dm, self.index, self.protocol, self.every, self.bucket_s = dm, catalog_index, protocol, every, bucket_s
        self.max_groups = max_groups
        self.results: list[EvalResult] = list(results or [])
        self.seconds = 0.0  # spent validating (training throughput leaves it out)

    def on_train_epoch_start(self, trainer, module):
        self.dm.epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, module):
        module.log("train/epochs", float(trainer.current_epoch + 1))  # survives spawn-based DDP (callback_metrics)
        if self.dm.val is None or (trainer.current_epoch + 1) % self.every:
            return
        t0 = time.perf_counter()
        result = validate(module, self.dm.val, self.dm.item_content, self.index, self.protocol, n_boot=1,
                          bucket_s=self.bucket_s, max_groups=self.max_groups)
        self.seconds += time.perf_counter() - t0
        self.results.append(result)
        # MLflow metric names allow no "@": val/Recall10, val/Recall50, val/NDCG10
        module.log_dict({f"val/{m.replace('@', '')}": result.estimates[m].mean for m in ("Recall@10", "Recall@50", "NDCG@10")},
                        prog_bar=True)
        module.train()


class MineHardNegatives(L.Callback):
    """Hard negatives mined with FAISS before every epoch after the first.

    Each training example gets ``per_example`` items that the current towers rank high for its user but
    that are not its positive, drawn from ranks [skip, skip + pool): the very top ranks are left out, as
    they hold most of the false negatives (items the user would also like). Item vectors use statistics
    as of the middle of the training period; the batches then read ``dm.hard`` (see datamodule).
    """

    def __init__(self, dm: TwoTowerData, per_example: int, pool: int = 100, skip: int = 10):
        self.dm, self.per_example, self.pool, self.skip = dm, per_example, pool, skip

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 0:
            return  # nothing learned yet to mine with
        dm, rows = self.dm, self.dm.rows
        stats = dm.asof.all_at(float(np.median(rows.times)))
        items = module.encode_items(ItemInputs(dm.item_content[:-1], stats, np.arange(dm.n_items), dm.known[:-1]))
        users = np.concatenate([module.encode_users(rows.users(slice(s, s + 65536)), dm.item_content)
                                for s in range(0, len(rows), 65536)])  # a chunk of inputs at a time
        k = min(self.skip + self.pool, dm.n_items)
        _, cand = CandidateIndex(items, kind="flat").search(users, k)
        cand = cand[:, min(self.skip, k - 1):]
        rng = np.random.default_rng([dm.cfg.seed, trainer.current_epoch, 7])
        hard = np.take_along_axis(cand, rng.integers(0, cand.shape[1], (len(cand), self.per_example)), 1)
        positive = rows.item_rows[:, None]
        bad = (hard == positive) | (hard < 0)
        while bad.any():  # never the positive: redraw those uniformly
            hard = np.where(bad, rng.integers(0, dm.n_items, hard.shape), hard)
            bad = (hard == positive) | (hard < 0)
        dm.hard = hard.astype(np.int64)
        module.train()


WEEK = 7 * 86400.0


def rank_by_time(module: TwoTowerModule, val: ValidationData, item_content: np.ndarray, catalog_index: dict[str, int],
                 n: int, kind: str = "flat", bucket_s: float = WEEK, max_groups: int | None = None):
    """FAISS top-``n`` per user, seen items excluded. Users are grouped by the week (``bucket_s``) they were
    asked in; each group's item vectors use item statistics as of the group's earliest time (never later
    than any member's), as serving would have computed them then.

    Yields:
        (user indices, scores (g, n), rows (g, n), item stats table (n_items, 7)) per group.

    ``max_groups`` bounds the item-tower passes (one per group): past it, users are split by time into that
    many groups of equal size instead (per-epoch validation, where the cost matters more than staleness).
    """
    es = val.eval_set
    users = module.encode_users(val.users, item_content)
    seen = val.seen if val.seen is not None else history_matrix(es.history, es.users, catalog_index, len(val.items.rows))
    cand = es.candidates if es.candidates is not None else np.arange(len(val.items.rows))
    times = np.array([t.timestamp() if t is not None else np.nan for t in es.at], np.float64) if es.at else None
    if val.asof is None or times is None or np.isnan(times).any():
        groups = [(np.arange(len(es)), None)]
    else:
        week = np.floor(times / bucket_s)
        if max_groups is not None and np.unique(week).size > max_groups:
            week = np.empty(len(times))
            week[np.argsort(times, kind="stable")] = np.arange(len(times)) * max_groups // len(times)
        groups = [(np.flatnonzero(week == w), float(times[week == w].min())) for w in np.unique(week)]
    encode = module.item_encoder(val.items.content, val.items.rows, val.items.known)
    for idx, t in groups:
        stats = val.items.stats if t is None else val.asof.all_at(t)
        items = encode(stats)
        index = CandidateIndex(items[cand], kind=kind, rows=cand)
        scores, rows = index.search(users[idx], n, exclude=seen[idx])
        del index, items
        release()  # each group's catalog-sized temporaries would otherwise fragment the heap (recsys/memory.py)
        yield idx, scores, rows, stats


def validate(module: TwoTowerModule, val: ValidationData, item_content: np.ndarray, catalog_index: dict[str, int],
             protocol: str, part: str = "val", n_boot: int = 1000, name: str = "two-tower", kind: str = "flat",
             keep_topk: bool = False, bucket_s: float = WEEK, max_groups: int | None = None) -> EvalResult:
    """Rank with the model through FAISS and score the rankings (see recsys.eval)."""
    es = val.eval_set
    topk = np.full((len(es), 50), -1, np.int64)
    for idx, _, rows, _ in rank_by_time(module, val, item_content, catalog_index, 50, kind, bucket_s, max_groups):
        topk[idx] = rows
    n_cand = es.candidates.size if es.candidates is not None else len(val.items.rows)
    return score_topk(name, topk, es, n_cand, protocol, part, n_boot=n_boot, keep_topk=keep_topk)
