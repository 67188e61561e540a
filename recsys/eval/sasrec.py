"""SASRec (Kang & McAuley, 2018), the self-attentive sequential reference every protocol reports.

Ids only: an item embedding table plus learned positions, ``blocks`` causal self-attention blocks
(pre-LayerNorm, point-wise feed-forward, dropout), and the last position's state scored against the same
item table. Trained on every position of each user's sequence to predict the next item with a full softmax
over the positives and 1,024 shared uniform negatives per batch (cross-entropy with many negatives beats the
paper's one sampled negative: Klenitskiy & Vasilev, 2023; ``negatives=None`` gives the full catalog softmax).
Each epoch reads one random window of ``max_len`` items per user; the defaults are the reference recipe
(:class:`SASRecConfig`), with validation checked every 5 epochs and a patience of 6 checks (about 130 epochs
on ml-latest-small, best near 100: a learning curve is kept in ``history``). Dropout 0.2, the reference's for
MovieLens; :meth:`SASRec.tuned` takes a grid where a dataset needs one.
Like the two-tower, it learns from ``val.history`` only; at test time it reads ``test.history``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from recsys.eval.evaluate import evaluate
from recsys.eval.splits import EvalSet
from recsys.memory import release


@dataclass
class SASRecConfig:
    """The reference recipe (Kang & McAuley's SASRec as re-evaluated with a full cross-entropy: 2 blocks, d=64, one
    head, 100 positions, lr 2e-3, batch 64, every position a target, epochs chosen on validation NDCG@10 checked
    every 5 epochs with a patience of 6 checks); ``negatives`` replaces the full softmax by shared sampled ones."""

    dim: int = 64
    blocks: int = 2
    heads: int = 1
    max_len: int = 100  # positions the model reads
    dropout: float = 0.2
    lr: float = 2e-3
    batch_size: int = 64
    negatives: int | None = 1024  # softmax over the positives and this many shared uniform negatives; None: full
    max_epochs: int = 200  # each reads one window per user; ml-latest-small's LOO validation peaked at epoch 100
    eval_every: int = 5  # epochs between validation checks
    patience: int = 6  # checks without improvement before stopping
    seed: int = 0


class SASRecNet(nn.Module):
    """(B, L) item rows (``n_items`` = padding, left-padded) -> (B, L, dim) causal states."""

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=n_items)
        self.positions = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        # unit-scale inputs after the sqrt(dim) scaling below (the default N(0, 1) would make them sqrt(dim) long)
        nn.init.normal_(self.items.weight, std=cfg.dim ** -0.5)
        nn.init.normal_(self.positions.weight, std=cfg.dim ** -0.5)
        with torch.no_grad():
            self.items.weight[n_items].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        real = (seq != self.items.padding_idx).unsqueeze(-1).float()
        x = (self.items(seq) * self.cfg.dim ** 0.5 + self.positions(torch.arange(seq.shape[1], device=seq.device))) * real
        causal = torch.triu(torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool, device=seq.device), 1)
        # no key-padding mask: a left-padded position could then see no key at all (NaN that leaks through
        # 0-weight attention); the padding states are zero vectors instead, and their outputs are never read
        return self.norm(self.encoder(self.drop(x), mask=causal, is_causal=True)) * real

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., n_items) scores against every catalog item (the padding row excluded)."""
        return states @ self.items.weight[:-1].T


def sequences(history: pl.DataFrame, users: list[str], index: dict[str, int], max_len: int, pad: int) -> np.ndarray:
    """(len(users), max_len) item rows of each user's most recent ``max_len`` interactions in time order,
    left-padded with ``pad`` (users without history: all padding)."""
    seqs = dict(history.sort(["user_id", "timestamp"], maintain_order=True).group_by("user_id", maintain_order=True)
                .agg(pl.col("item_id").tail(max_len)).iter_rows())
    out = np.full((len(users), max_len), pad, np.int64)
    for r, u in enumerate(users):
        items = [index[i] for i in seqs.get(u, [])]
        if items:
            out[r, -len(items):] = items
    return out


class SASRec:
    """The reference as a :class:`recsys.eval.evaluate.Scorer`: ``fit(val)`` trains on ``val.history`` and
    keeps the epoch with the best validation NDCG@10; ``score`` reads the eval set's own history."""

    name = "sasrec"

    def __init__(self, index: dict[str, int], cfg: SASRecConfig = SASRecConfig(), protocol: str = "loo"):
        self.index, self.cfg, self.protocol = index, cfg, protocol
        self.n_items = len(index)
        self.val_ndcg: float = float("nan")
        self.epochs = 0
        self.history: list[tuple[int, float]] = []  # (epoch, validation NDCG@10) at each check
        self.net: SASRecNet | None = None

    def _train_sequences(self, history: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Every user's whole sequence, left-padded to the longest: (n_users, T) rows and (n_users,) lengths."""
        users = history["user_id"].unique().sort().to_list()
        longest = int(history.group_by("user_id").len()["len"].max())
        seq = sequences(history, users, self.index, longest, self.n_items)
        lengths = (seq != self.n_items).sum(1)
        keep = lengths >= 2
        return torch.from_numpy(seq[keep]), torch.from_numpy(lengths[keep])

    def _windows(self, seqs: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One window of up to ``max_len + 1`` items per user, ending at a random point of their sequence (the
        last item half of the time): every epoch sees other parts of long histories. Left-padded."""
        T, L = seqs.shape[1], self.cfg.max_len + 1
        last = torch.where(torch.rand(len(seqs), generator=gen) < 0.5, torch.full_like(lengths, T),
                           T - lengths + 2 + (torch.rand(len(seqs), generator=gen) * (lengths - 1)).long())
        cols = last[:, None] - L + torch.arange(L)[None, :]  # (n, L) column indices, may start before the sequence
        win = seqs.gather(1, cols.clamp(min=0))
        start = T - lengths
        return torch.where(cols >= start[:, None], win, torch.full_like(win, self.n_items))

    def _loss(self, net: SASRecNet, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keep = y != self.n_items
        states, targets = net(x)[keep], y[keep]
        if self.cfg.negatives is None or self.cfg.negatives >= self.n_items:
            return F.cross_entropy(net.logits(states), targets)
        neg = torch.randint(self.n_items, (self.cfg.negatives,), generator=gen)
        table = net.items.weight
        pos = (states * table[targets]).sum(-1, keepdim=True)
        negs = (states @ table[neg].T).masked_fill(neg[None, :] == targets[:, None], float("-inf"))  # accidental hits
        return F.cross_entropy(torch.cat([pos, negs], 1), torch.zeros(len(targets), dtype=torch.long))

    def fit(self, val: EvalSet, train: pl.DataFrame | None = None) -> "SASRec":
        """Train on ``train`` (default: ``val.history``), keeping the epoch with the best NDCG@10 on ``val``."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        seqs, lengths = self._train_sequences(val.history if train is None else train)
        if not len(seqs):
            raise ValueError("no user has two or more interactions to learn a sequence from")
        self.net = net = SASRecNet(self.n_items, cfg)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        best, best_state, bad = -1.0, None, 0
        for epoch in range(1, cfg.max_epochs + 1):
            net.train()
            windows = self._windows(seqs, lengths, gen)
            for b in torch.randperm(len(windows), generator=gen).split(cfg.batch_size):
                loss = self._loss(net, windows[b, :-1], windows[b, 1:], gen)
                opt.zero_grad()
                loss.backward()
                opt.step()
            # each step's batch has its own number of targets: in a long process (the demo) the heap kept every
            # epoch's freed temporaries, 5.9 GB resident after 130 epochs for a model of 1 MB (recsys.memory)
            release()
            if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
                ndcg = evaluate(self, val, self.index, self.protocol, part="val", n_boot=1).estimates["NDCG@10"].mean
                self.history.append((epoch, round(float(ndcg), 4)))
                if ndcg > best:
                    best, bad, self.epochs = ndcg, 0, epoch
                    best_state = {k: v.clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.val_ndcg = best
        return self

    @torch.inference_mode()
    def score(self, eval_set: EvalSet, users: np.ndarray) -> np.ndarray:
        assert self.net is not None, "fit first"
        self.net.eval()
        return self.score_seqs(sequences(eval_set.history, [eval_set.users[u] for u in users], self.index,
                                         self.cfg.max_len, self.n_items))

    @torch.inference_mode()
    def score_seqs(self, seq: np.ndarray) -> np.ndarray:
        """(b, max_len) item rows, left-padded with ``n_items`` -> (b, n_items) scores (serving's path)."""
        assert self.net is not None, "fit first"
        self.net.eval()
        return self.net.logits(self.net(torch.from_numpy(seq))[:, -1]).numpy()

    @classmethod
    def tuned(cls, index: dict[str, int], val: EvalSet, protocol: str, dropouts=(0.2,),
              base: SASRecConfig = SASRecConfig()) -> tuple["SASRec", dict[float, float]]:
        """Fit one model per dropout (each with its own early stopping) and keep the best on validation."""
        models = {d: cls(index, replace(base, dropout=d), protocol).fit(val) for d in dropouts}
        best = max(models.values(), key=lambda m: m.val_ndcg)
        return best, {d: m.val_ndcg for d, m in models.items()}
