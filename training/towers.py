"""The two towers: small typed modules, each mapping its side's features to one normalised vector.

    user features  --UserTower-->  u (B, out_dim)
    item features  --ItemTower-->  v (B, out_dim)          score = <u, v> / temperature

Each tower's output is a unit vector plus one more coordinate: the item tower's is a learned bias
(how likely the item is a priori, predicted from its content and statistics: what a brand-new item
needs most), the user tower's is 1, so the inner product is ``cos(u, v) + bias(v)`` and FAISS's
inner-product search ranks by the full score. The item tower reads the item's multimodal vector
(from the embedder, frozen), its statistics, and optionally a learned id embedding; ids and statistics are hidden for a share of training examples so
the tower also scores items nobody has interacted with yet (cold start). The user tower reads the
user's history vector (in the embedder's space), the items they engaged with most recently (their
vectors and ids, pooled with attention over recency; the newest ``newest_items`` of them also each in a slot
of their own, since the item just before the next one says most about it), and user statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.contract import ITEM_STATS, USER_STATS, VectorLayout

N_ITEM_STATS = len(ITEM_STATS)  # log pop_all, log pop_30d, log age (days), has_text, has_image, has_audio, has_video
N_USER_STATS = len(USER_STATS)  # log n_interactions, mean value / 5, log days since first seen


@dataclass
class TowerConfig:
    content_dim: int  # the embedder's dim
    n_items: int  # rows of the id table (the catalog); row n_items is padding
    out_dim: int = 64
    hidden_dim: int = 256
    id_dim: int = 64
    use_ids: bool = True
    recent: int = 20
    dropout: float = 0.1
    item_bias: bool = True  # the extra coordinate: a per-item prior from content and stats
    # The embedder's own similarity beside the learned one: the item's unit content vector and the user's unit
    # history vector times a learned weight, so the score adds weight * cos(history, content) (content-kNN's
    # score), which the towers' out_dim bottleneck cannot carry in full
    content_match: bool = False
    user_encoder: str = "attention"  # how the user tower reads its recent items: "attention" or "sequential"
    seq_layers: int = 2  # sequential: causal self-attention blocks
    seq_heads: int = 2
    newest_items: int = 0  # the newest k recent items also enter the user MLP each in its own slot (not only pooled)
    newest_skip: bool = False  # a linear path from the newest item's content to the user vector

    @property
    def layout(self) -> VectorLayout:
        """How both towers' outputs are laid out (recsys.contract: what serving and the nightly read)."""
        return VectorLayout(self.out_dim, self.content_dim, self.content_match, self.item_bias)

    @property
    def vector_dim(self) -> int:
        """Width of both towers' outputs: the unit vector, the content-match block, the bias / constant coordinate."""
        return self.layout.width

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class ItemTower(nn.Module):
    """(content, stats, id) -> L2-normalised item vector.

    Args (forward):
        content: (B, content_dim) the item's multimodal vector.
        stats: (B, N_ITEM_STATS) as of the query time; zeros for a new item.
        ids: (B,) catalog rows; ``id_mask`` (B,) bool says which ids may be used (known, not dropped).
    Returns:
        (B, vector_dim): a unit vector, then the unit content vector when ``content_match``, then the item's
        bias when ``item_bias`` (always the last coordinate).
    Example:
        >>> tower = ItemTower(TowerConfig(content_dim=256, n_items=1000), id_table)
        >>> v = tower(content, stats, ids, id_mask)
    """

    def __init__(self, cfg: TowerConfig, id_table: nn.Embedding | None):
        super().__init__()
        self.cfg, self.ids = cfg, id_table
        d_in = cfg.content_dim + N_ITEM_STATS + (cfg.id_dim if cfg.use_ids else 0)
        self.mlp = _mlp(d_in, cfg.hidden_dim, cfg.out_dim, cfg.dropout)
        self.skip = nn.Linear(cfg.content_dim, cfg.out_dim, bias=False)  # content alone must already rank
        self.bias = _mlp(d_in, cfg.hidden_dim // 2, 1, cfg.dropout) if cfg.item_bias else None

    def forward(self, content: torch.Tensor, stats: torch.Tensor, ids: torch.Tensor, id_mask: torch.Tensor) -> torch.Tensor:
        parts = [content, stats]
        if self.ids is not None:
            parts.append(self.ids(ids) * id_mask.unsqueeze(-1).float())
        x = torch.cat(parts, -1)
        v = F.normalize(self.skip(content) + self.mlp(x), dim=-1)
        return self._out(v, content, self.bias(x) if self.bias is not None else None)

    def _out(self, v: torch.Tensor, content: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[v, unit content (content_match), bias (item_bias)]: (B, vector_dim)."""
        parts = [v] + ([F.normalize(content, dim=-1)] if self.cfg.content_match else []) + ([bias] if bias is not None else [])
        return torch.cat(parts, -1) if len(parts) > 1 else v

    @torch.no_grad()
    def with_fixed(self, content: torch.Tensor, ids: torch.Tensor, id_mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward`` for the same items at many times: everything but the statistics (the content and id
        parts of each MLP's first layer, the skip path) is computed once, so each (B, N_ITEM_STATS) stats table
        costs a fraction of a full pass. Evaluation encodes the catalog once per time bucket (item statistics
        as of then); in eval mode the result equals ``forward`` up to float rounding.

        Returns:
            ``encode(stats, which=None)``: stats (B, N_ITEM_STATS) -> (B, vector_dim), as ``forward(content,
            stats, ids, id_mask)``; with ``which`` (M,) row indices, stats (M, N_ITEM_STATS) are those rows'
            and only they are encoded: (M, vector_dim)."""
        if self.training:
            raise RuntimeError("ItemTower.with_fixed skips dropout: call .eval() first")
        fixed = [content] + ([self.ids(ids) * id_mask.unsqueeze(-1).float()] if self.ids is not None else [])
        f = torch.cat(fixed, -1).double()
        c = self.cfg.content_dim
        skip = self.skip(content)

        def first_layer(mlp: nn.Sequential):
            """The first Linear after the LayerNorm, split into the fixed columns' product and the stats' weights."""
            norm, lin = mlp[0], mlp[1]
            wg = lin.weight.double() * norm.weight.double()  # (H, d_in): W diag(gamma)
            w_fixed = torch.cat([wg[:, :c], wg[:, c + N_ITEM_STATS:]], 1)
            shift = lin.weight.double() @ norm.bias.double() + lin.bias.double()
            return ((f @ w_fixed.T).float(), wg[:, c:c + N_ITEM_STATS].T.float().contiguous(), wg.sum(1).float(),
                    shift.float(), norm.eps, mlp[2:])

        layers = [first_layer(self.mlp)] + ([first_layer(self.bias)] if self.bias is not None else [])
        d = f.shape[1] + N_ITEM_STATS
        f_sum, f_sq = f.sum(1, keepdim=True), (f * f).sum(1, keepdim=True)

        def encode(stats: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
            pick = (lambda t: t) if which is None else (lambda t: t[which])
            s = stats.double()  # the LayerNorm's mean and variance (per item: cheap) in double, the rest in float
            mu = (pick(f_sum) + s.sum(1, keepdim=True)) / d
            var = (pick(f_sq) + (s * s).sum(1, keepdim=True)) / d - mu * mu
            s, mu = stats.float(), mu.float()
            out = []
            for fixed_part, w_stats, w_sum, shift, eps, rest in layers:
                h = torch.addmm(pick(fixed_part), s, w_stats).sub_(mu * w_sum).mul_(torch.rsqrt(var + eps).float()).add_(shift)
                out.append(rest(h))
            v = F.normalize(pick(skip) + out[0], dim=-1)
            return self._out(v, pick(content), out[1] if self.bias is not None else None)

        return encode


def stats_encoder(item: ItemTower, content: np.ndarray, rows: np.ndarray, id_mask: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """NumPy in and out around ``item.with_fixed`` (eval mode, no autograd): what evaluation and the A/B replay
    call to encode the same items under one statistics table per time bucket. Consecutive buckets leave many
    items' statistics unchanged (above all those nobody has engaged with yet: all zeros but the modality flags),
    so each call re-encodes only the rows whose statistics differ from the previous call's and copies the rest:
    the same result as a full pass.

    Args:
        content: (N, content_dim); rows: (N,) catalog rows; id_mask: (N,) bool, which ids may be used.
    Returns:
        stats (N, N_ITEM_STATS) -> (N, vector_dim)."""
    item.eval()
    with torch.inference_mode():
        encode = item.with_fixed(torch.from_numpy(content), torch.from_numpy(rows), torch.from_numpy(id_mask))
    last: dict[str, np.ndarray] = {}

    def run(stats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            if not last or last["stats"].shape != stats.shape:
                last["out"] = encode(torch.from_numpy(stats)).numpy()
            elif len(changed := np.flatnonzero((stats != last["stats"]).any(1))):
                last["out"][changed] = encode(torch.from_numpy(stats[changed]), torch.from_numpy(changed)).numpy()
        last["stats"] = stats.copy()
        return last["out"].copy()  # the caller may write into its copy

    return run


class SequenceEncoder(nn.Module):
    """The user's recent items read in time order by causal self-attention (SASRec-style, over multimodal item
    vectors, so new items count from their first appearance); the newest position's state is the summary.

    Args (forward):
        keys: (B, L, H) projected recent items with their positions, newest first (as the features store them).
        mask: (B, L) True where an item is present (absent ones are at the end: the user has fewer than L).
    Returns:
        (B, H) the state at the newest item (any value for users without items: the caller zeroes those).
    """

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        layer = nn.TransformerEncoderLayer(cfg.hidden_dim, cfg.seq_heads, 2 * cfg.hidden_dim, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.seq_layers, enable_nested_tensor=False)
        self.start = nn.Parameter(torch.randn(cfg.hidden_dim) * 0.02)  # a "sequence begins" token
        self.norm = nn.LayerNorm(cfg.hidden_dim)

    def forward(self, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, H = keys.shape
        # oldest first, newest last, after a start token that every position may read: a position before the
        # user's first item then never has all its keys masked (NaN, which leaks through 0-weight attention)
        x = torch.cat([self.start.expand(B, 1, H), keys.flip(1)], 1)
        absent = torch.cat([torch.zeros_like(mask[:, :1]), ~mask.flip(1)], 1)
        causal = torch.triu(torch.ones(L + 1, L + 1, dtype=torch.bool, device=keys.device), 1)
        h = self.blocks(x, mask=causal, src_key_padding_mask=absent, is_causal=True)
        return self.norm(h[:, -1])


class UserTower(nn.Module):
    """(history vector, recent items, stats) -> L2-normalised user vector.

    Args (forward):
        history: (B, content_dim) recency-weighted mean of the user's item vectors (zeros: no history).
        recent_content: (B, L, content_dim) vectors of the L most recent items, newest first.
        recent_ids: (B, L) their catalog rows; ``recent_mask`` (B, L) True where an item is present,
            ``recent_id_mask`` (B, L) True where its id embedding may be used.
        stats: (B, N_USER_STATS).
    Returns:
        (B, vector_dim): a unit vector, then the unit history vector times the learned ``match`` weight when
        ``content_match``, then 1 when the item tower has a bias coordinate.
    """

    def __init__(self, cfg: TowerConfig, id_table: nn.Embedding | None):
        super().__init__()
        self.cfg, self.ids = cfg, id_table
        d_item = cfg.content_dim + (cfg.id_dim if cfg.use_ids else 0)
        self.item_proj = nn.Linear(d_item, cfg.hidden_dim)
        self.position = nn.Parameter(torch.zeros(cfg.recent, cfg.hidden_dim))
        self.query = nn.Parameter(torch.randn(cfg.hidden_dim) * 0.02)
        if cfg.user_encoder not in ("attention", "sequential"):
            raise ValueError(f"user_encoder must be 'attention' or 'sequential', got {cfg.user_encoder!r}")
        self.sequence = SequenceEncoder(cfg) if cfg.user_encoder == "sequential" else None
        if not 0 <= cfg.newest_items <= cfg.recent:
            raise ValueError(f"newest_items must be within 0..recent ({cfg.recent}), got {cfg.newest_items}")
        d_user = cfg.content_dim + cfg.hidden_dim * (1 + cfg.newest_items) + N_USER_STATS
        self.mlp = _mlp(d_user, cfg.hidden_dim, cfg.out_dim, cfg.dropout)
        self.skip = nn.Linear(cfg.content_dim, cfg.out_dim, bias=False)
        self.newest_skip = nn.Linear(cfg.content_dim, cfg.out_dim, bias=False) if cfg.newest_skip else None
        self.match = nn.Parameter(torch.zeros(())) if cfg.content_match else None  # starts as the towers alone

    def forward(self, history: torch.Tensor, recent_content: torch.Tensor, recent_ids: torch.Tensor,
                recent_mask: torch.Tensor, recent_id_mask: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        parts = [recent_content]
        if self.ids is not None:
            parts.append(self.ids(recent_ids) * recent_id_mask.unsqueeze(-1).float())
        keys = self.item_proj(torch.cat(parts, -1)) + self.position[: recent_content.shape[1]]  # (B, L, H)
        if self.sequence is not None:
            pooled = self.sequence(keys, recent_mask)
        else:
            attn = (keys @ self.query / keys.shape[-1] ** 0.5).masked_fill(~recent_mask, -1e9).softmax(-1)
            pooled = (attn.unsqueeze(-1) * keys).sum(1)
        pooled = pooled * recent_mask.any(1, keepdim=True).float()
        parts = [history, pooled]
        k = self.cfg.newest_items
        if k:  # (B, k*H), an absent item's slot zero
            newest = keys[:, :k] * recent_mask[:, :k, None].float()
            parts.append(F.pad(newest, (0, 0, 0, k - newest.shape[1])).flatten(1))
        x = torch.cat(parts + [stats], -1)
        s = self.skip(history)
        if self.newest_skip is not None:
            s = s + self.newest_skip(recent_content[:, 0] * recent_mask[:, :1].float())
        u = F.normalize(s + self.mlp(x), dim=-1)
        parts = [u] + ([self.match * F.normalize(history, dim=-1)] if self.match is not None else [])
        parts += [torch.ones_like(u[:, :1])] if self.cfg.item_bias else []
        return torch.cat(parts, -1) if len(parts) > 1 else u


class TwoTower(nn.Module):
    """Both towers and the id table they share (one row per catalog item, plus padding)."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        table = nn.Embedding(cfg.n_items + 1, cfg.id_dim, padding_idx=cfg.n_items) if cfg.use_ids else None
        if table is not None:
            nn.init.normal_(table.weight, std=0.02)
            table.weight.data[cfg.n_items] = 0.0  # the padding row stays zero
        self.id_table = table
        self.user = UserTower(cfg, table)
        self.item = ItemTower(cfg, table)
