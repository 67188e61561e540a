"""The losses, in one place.

- :func:`sampled_softmax_loss`: the two-tower's retrieval loss: in-batch sampled softmax with logQ
  (sampling-bias) correction, mixed negatives (extra uniformly sampled catalog items), accidental-hit
  removal and optional mined hard negatives. Each part can be switched off for the ablation.
- :func:`info_nce`: the embedder's contrastive loss: symmetric InfoNCE with in-batch negatives,
  pairs of the same group masked out (they are not negatives of each other), summed over
  Matryoshka prefixes.
- :func:`relational_distillation`: keeps the fused text space's geometry close to MiniLM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e9


def sampled_softmax_loss(
    user: torch.Tensor,
    pos_item: torch.Tensor,
    pos_ids: torch.Tensor,
    temperature: torch.Tensor | float,
    log_q: torch.Tensor | None = None,
    neg_item: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    hard_item: torch.Tensor | None = None,
    hard_ids: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
    row_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over [in-batch positives | uniform negatives | hard negatives] with the true item as label.

    Args:
        user: (B, d) user vectors (unit, possibly with a trailing constant coordinate).
        pos_item: (B, d) vectors of each row's positive item (unit, possibly with a trailing bias).
        pos_ids: (B,) catalog indices of the positives.
        temperature: scalar; logits are inner products / temperature.
        log_q: (n_items,) log expected count of each item among the sampled candidates (logQ
            correction); None disables the correction.
        neg_item: (M, d) extra negatives sampled uniformly from the catalog (mixed negatives), ids in neg_ids (M,).
        hard_item: (B, H, d) mined hard negatives per row, ids in hard_ids (B, H).
        remove_accidental_hits: mask candidates that are the row's own positive item.
        row_groups: (B,) e.g. the user of each row: another row's positive of the same group is one of
            this user's positives too, so it is masked rather than used as a negative.
    Returns:
        scalar mean cross-entropy.
    """
    logits = [user @ pos_item.T / temperature]  # (B, B)
    ids = [pos_ids[None, :].expand(user.shape[0], -1)]
    if log_q is not None:
        logits[0] = logits[0] - log_q[pos_ids][None, :]
    if neg_item is not None and neg_ids is not None:
        neg = user @ neg_item.T / temperature  # (B, M)
        if log_q is not None:
            neg = neg - log_q[neg_ids][None, :]
        logits.append(neg)
        ids.append(neg_ids[None, :].expand(user.shape[0], -1))
    if hard_item is not None and hard_ids is not None:
        logits.append(torch.einsum("bd,bhd->bh", user, hard_item) / temperature)  # mined, not sampled: no logQ
        ids.append(hard_ids)
    all_logits = torch.cat(logits, dim=1)
    all_ids = torch.cat(ids, dim=1)
    labels = torch.arange(user.shape[0], device=user.device)
    if remove_accidental_hits:
        hit = all_ids == pos_ids[:, None]
        hit[labels, labels] = False  # the label itself stays
        all_logits = all_logits.masked_fill(hit, NEG_INF)
    if row_groups is not None:
        same = row_groups[:, None] == row_groups[None, :]
        same[labels, labels] = False
        block = torch.zeros_like(all_logits, dtype=torch.bool)
        block[:, : user.shape[0]] = same
        all_logits = all_logits.masked_fill(block, NEG_INF)
    return F.cross_entropy(all_logits, labels)


def info_nce(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, temperature: torch.Tensor | float,
             dims: tuple[int, ...], hard_b: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE at every Matryoshka prefix.

    Args:
        a, b: (B, D) raw (unnormalised) outputs for the two sides of each pair.
        groups: (B,) pairs sharing a group (the same digit, the same cluster) are not negatives.
        dims: prefixes to train, e.g. (64, 128, 256, 512, 768).
        hard_b: (B, D) one hard negative per row for the a->b direction, or None.
    Returns:
        scalar: the mean over prefixes of (a->b + b->a) / 2.
    """
    same = groups[:, None] == groups[None, :]
    same.fill_diagonal_(False)
    labels = torch.arange(a.shape[0], device=a.device)
    total = a.new_zeros(())
    for d in dims:
        za, zb = F.normalize(a[:, :d], dim=-1), F.normalize(b[:, :d], dim=-1)
        logits = (za @ zb.T / temperature).masked_fill(same, NEG_INF)
        ab = logits
        if hard_b is not None:
            zh = F.normalize(hard_b[:, :d], dim=-1)
            ab = torch.cat([logits, (za * zh).sum(-1, keepdim=True) / temperature], dim=1)
        total = total + (F.cross_entropy(ab, labels) + F.cross_entropy(logits.T, labels)) / 2
    return total / len(dims)


def relational_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the in-batch cosine-similarity matrices of student (B, D) and teacher (B, D')."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)
