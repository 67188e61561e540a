"""The data side of two-tower training (Lightning's split: this file is the data, module.py the math).

Training rows come from Feast's point-in-time join; each row's features are as of just before its
label. Batches are drawn at random each epoch; the uniformly sampled negatives take their statistics
as of the batch's median label time (one snapshot for the whole batch keeps them cheap). Each batch
carries the sampled negatives, the id-dropout masks, the users (so a user's other positives in the
batch are not used as negatives) and, when mined, hard negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset

from features.inputs import ItemInputs, ItemStatsAsOf, TrainingRows, UserInputs
from recsys.config import TrainConfig
from recsys.contract import ITEM_INTERACTION_STATS, USER_INPUTS
from recsys.eval.splits import EvalSet

INTERACTION = len(ITEM_INTERACTION_STATS)  # the first item-statistics columns, hidden when an item is read cold


@dataclass
class ValidationData:
    """Everything a ranking round needs: who is asked, their inputs, the items' inputs, and the item
    statistics snapshots, so each user's items are scored with statistics as of when they were asked."""

    eval_set: EvalSet
    users: UserInputs
    items: ItemInputs
    asof: ItemStatsAsOf | None = None
    seen: sparse.csr_matrix | None = None  # (users, items) what each user has seen (computed once)


class RandomBatches(Dataset):
    """Map-style dataset whose items are whole batches, reshuffled every epoch; under DDP each process draws from
    its own share of the rows (TrainingRows.sharded), the same number of batches each."""

    def __init__(self, dm: "TwoTowerData"):
        self.dm = dm
        self.n = len(dm.rows)
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation): drawn once, not per batch

    def order(self) -> np.ndarray:
        """This epoch's permutation of the training rows (a function of the seed and the epoch)."""
        epoch = self.dm.epoch
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.dm.cfg.seed, epoch]).permutation(self.n))
        return self._order[1]

    def __len__(self) -> int:
        rows, b = self.dm.rows, self.dm.cfg.batch_size
        if rows.shard[1] > 1:  # every process takes the same number of steps (DDP steps together): full batches
            return max(rows.total // (rows.shard[1] * b), 1)
        return (self.n + b - 1) // b

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        dm, cfg = self.dm, self.dm.cfg
        idx = np.sort(self.order()[b * cfg.batch_size : (b + 1) * cfg.batch_size])
        rng = np.random.default_rng([cfg.seed, dm.epoch, b])
        rows = dm.rows
        t_batch = float(np.median(rows.times[idx]))
        batch = {f"u_{k}": t for k, t in zip(USER_INPUTS, rows.users(idx).tensors(dm.item_content, dm.known))}
        # Positives, with ids and statistics hidden for a share of rows (they must also work cold).
        pos = rows.items(idx, dm.item_content)
        cold = rng.random(len(idx)) < cfg.id_dropout
        pos_stats = pos.stats.copy()
        pos_stats[cold, :INTERACTION] = 0.0
        batch["user"] = torch.from_numpy(dm.user_codes[idx])
        batch.update(p_content=torch.from_numpy(pos.content), p_stats=torch.from_numpy(pos_stats),
                     p_rows=torch.from_numpy(pos.rows), p_id_mask=torch.from_numpy(pos.known & ~cold))
        if cfg.mixed_negatives > 0:
            neg = rng.integers(0, dm.n_items, cfg.mixed_negatives)
            n_stats = dm.asof.at(neg, t_batch)
            n_cold = rng.random(len(neg)) < cfg.id_dropout
            n_stats[n_cold, :INTERACTION] = 0.0
            batch.update(n_content=torch.from_numpy(dm.item_content[neg]), n_stats=torch.from_numpy(n_stats),
                         n_rows=torch.from_numpy(neg), n_id_mask=torch.from_numpy(dm.known[neg] & ~n_cold))
        if dm.hard is not None:  # hidden at the same rate: a negative that alone shows its stats is told apart by them
            hard = dm.hard[idx]  # (B, H) catalog rows
            flat = hard.ravel()
            h_stats = dm.asof.at(flat, t_batch)
            h_cold = rng.random(len(flat)) < cfg.id_dropout
            h_stats[h_cold, :INTERACTION] = 0.0
            batch.update(h_content=torch.from_numpy(dm.item_content[flat]).view(*hard.shape, -1),
                         h_stats=torch.from_numpy(h_stats).view(*hard.shape, -1), h_rows=torch.from_numpy(hard),
                         h_id_mask=torch.from_numpy(dm.known[flat] & ~h_cold).view(hard.shape))
        return batch


class TwoTowerData(L.LightningDataModule):
    """Training rows + the item table (vectors, statistics as of any time, which ids were trained)."""

    def __init__(self, rows: TrainingRows, item_vectors: np.ndarray, asof: ItemStatsAsOf, known: np.ndarray,
                 val: ValidationData | None, cfg: TrainConfig):
        super().__init__()
        self.rows, self.asof, self.val, self.cfg = rows, asof, val, cfg
        self.n_items = item_vectors.shape[0]
        self.item_content = np.vstack([item_vectors, np.zeros((1, item_vectors.shape[1]))]).astype(np.float32)
        self.known = np.append(known, False)
        counts = rows.item_counts.astype(np.float64)  # over every shard: each process corrects the same way
        self.item_freq = counts / counts.sum()
        self.hard: np.ndarray | None = None  # (N, H) mined by module.MineHardNegatives
        self.epoch = 0

    @property
    def user_codes(self) -> np.ndarray:
        return self.rows.user_codes

    def setup(self, stage: str) -> None:
        """In each of several DDP processes (ddp_spawn's children; torchrun's processes built only their share
        already): keep only this process's share of the rows, so each reads its own rows and memory is split."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and self.rows.shard[1] == 1:
            self.rows = self.rows.sharded(trainer.global_rank, trainer.world_size)
            self.hard = None

    def log_q(self) -> torch.Tensor:
        """log of each item's expected count among a batch's candidates: B in-batch draws from the
        training frequencies plus M uniform draws (the mixed proposal), for the logQ correction."""
        b, m = self.cfg.batch_size, self.cfg.mixed_negatives
        return torch.from_numpy(np.log(b * self.item_freq + m / self.n_items + 1e-12)).float()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomBatches(self), batch_size=None, shuffle=False, num_workers=self.cfg.num_workers)
