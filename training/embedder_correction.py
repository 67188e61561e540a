"""Stage 4 of the local embedder's training: the modality-gap correction on the frozen fusion model's outputs
(recsys.embed.local.ModalityCentres), per-signature centres and low-rank maps chosen on validation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recsys.embed.fusion import FusionEncoder
from recsys.embed.local import ModalityCentres, signature
from recsys.embed.tasks import PairTask
from training.embedder_config import EmbedderTrainConfig
from training.embedder_eval import encode, evaluate_tasks, val_score
from training.losses import NEG_INF, info_nce


def fit_centres(model: FusionEncoder, tasks: list[PairTask], per_signature: int = 2000, seed: int = 0) -> ModalityCentres:
    """The modality-gap correction (recsys.embed.local.ModalityCentres) from the training tasks' contents:
    each (task, kinds of parts) signature's mean raw output over up to ``per_signature`` contents."""
    rng = np.random.default_rng(seed)
    by_sig: dict[str, list] = {}
    for task in tasks:
        for side, contents, t in (("a", task.a, task.a_task), ("b", task.b, task.b_task)):
            for c, f in zip(contents, task.feats[side][1]):
                by_sig.setdefault(signature(c, t), []).append(f)
    feats, sigs = [], []
    for sig, fs in sorted(by_sig.items()):
        pick = rng.permutation(len(fs))[:per_signature]
        feats += [fs[i] for i in pick]
        sigs += [sig] * len(pick)
    return ModalityCentres.fit(encode(model, feats), sigs)


def fit_correction(model: FusionEncoder, tasks: list[PairTask], centres: ModalityCentres, val: dict[str, PairTask],
                   cfg: EmbedderTrainConfig) -> tuple[ModalityCentres, dict]:
    """Stage 4: a low-rank residual map per query signature (``correction_tasks``) on the centred outputs of the
    frozen fusion model (recsys.embed.local.ModalityCentres), chosen on validation. Documents keep their
    centred vectors, so the item vectors recommendations are built from do not move.

    Centring removes each signature's mean, not the directions an item's poster adds and its title lacks: a
    title alone then sits nearer a poster-less item with a similar title than its own item. The maps learn
    InfoNCE at every Matryoshka prefix on the training pairs of every task (at most ``correction_pairs``
    each; every task weighs 1, the one-part query -> item task ``correction_search_weight``). A one-part
    query is ranked against every training item's document (the pool of the document sides, co-engagement's
    included; its own item's rows masked), not only its batch. The maps start at the identity; validation
    every ``val_every`` steps keeps the best (step 0: centres alone).

    Returns:
        (centres with the kept maps, or without any; a report for the manifest)."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    d, r, temperature = model.cfg.out_dim, cfg.correction_rank, cfg.correction_temperature
    sides, pool = [], {}
    for task in tasks:
        keep = np.sort(rng.permutation(len(task))[: cfg.correction_pairs])
        enc = {}
        for side, contents, t in (("a", task.a, task.a_task), ("b", task.b, task.b_task)):
            sigs = [signature(contents[i], t) for i in keep]
            enc[side] = (torch.from_numpy(centres.correct(encode(model, [task.feats[side][1][i] for i in keep]), sigs)), sigs)
            if t == "document":  # the pool of item documents a one-part query is ranked against
                for j, i in enumerate(keep):
                    if contents[i].item_id is not None:
                        pool.setdefault((contents[i].item_id, sigs[j]), enc[side][0][j])
        sides.append((task, enc, torch.from_numpy(task.groups[keep]), [task.b[i].item_id for i in keep]))
    names = sorted({s for _, enc, _, _ in sides for side in enc.values() for s in side[1] if s.split(":", 1)[0] in cfg.correction_tasks})
    V = nn.Parameter(torch.randn(len(names), d, r) * 0.01)
    U = nn.Parameter(torch.zeros(len(names), d, r))  # x + (x V) U^T: the identity at the start
    col = {n: i for i, n in enumerate(names)}

    def code(sig: str) -> int:  # the signature's map, -1 for none (a document's)
        return col.get(sig, -1)

    pool_keys = list(pool)
    pool_x = torch.stack([pool[k] for k in pool_keys]) if pool else torch.zeros(0, d)
    pool_sig = torch.tensor([code(s) for _, s in pool_keys], dtype=torch.long)
    item_code = {i: c for c, i in enumerate(sorted({i for i, _ in pool_keys}))}
    pool_item = torch.tensor([item_code[i] for i, _ in pool_keys], dtype=torch.long)

    def mapped(x: torch.Tensor, sig_idx: torch.Tensor) -> torch.Tensor:  # (n, d), (n,) -> (n, d); -1: no map
        out = x.clone()
        for i in [i for i in sig_idx.unique().tolist() if i >= 0]:
            rows = sig_idx == i
            out[rows] = x[rows] + (x[rows] @ V[i]) @ U[i].T
        return out

    def current() -> ModalityCentres:
        return centres.with_maps({n: (V[i].detach().numpy().copy(), U[i].detach().numpy().copy()) for n, i in col.items()})

    memo: dict = {}
    best = (val_score(evaluate_tasks(model, val, centres, memo=memo)), None, 0)
    history = [(0, best[0])]
    opt = torch.optim.AdamW([V, U], lr=cfg.correction_lr, weight_decay=cfg.correction_weight_decay)
    dims = model.cfg.matryoshka_dims
    for step in tqdm(range(1, cfg.correction_steps + 1), desc="stage 4: modality-gap correction", unit="step"):
        loss = torch.zeros(())
        for task, enc, groups, b_items in sides:
            idx = torch.from_numpy(rng.choice(len(groups), size=min(cfg.correction_batch, len(groups)), replace=False))
            (xa, sa), (xb, sb) = enc["a"], enc["b"]
            a = mapped(xa[idx], torch.tensor([code(sa[i]) for i in idx.tolist()]))
            b = mapped(xb[idx], torch.tensor([code(sb[i]) for i in idx.tolist()]))
            if task.a_task == "query" and task.b_task == "document" and len(pool_keys):
                own = torch.tensor([item_code.get(b_items[i], -1) for i in idx.tolist()])
                loss = loss + cfg.correction_search_weight * _query_vs_pool(
                    a, b, own, mapped(pool_x, pool_sig), pool_item, dims, temperature)
            else:
                loss = loss + info_nce(a, b, groups[idx], temperature, dims)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.val_every == 0 or step == cfg.correction_steps:
            with torch.no_grad():
                score = val_score(evaluate_tasks(model, val, current(), memo=memo))
            history.append((step, score))
            if score > best[0]:
                best = (score, current(), step)
    kept = best[1] or centres
    return kept, {"rank": r, "steps": cfg.correction_steps, "val_scores": dict(history), "kept_step": best[2],
                  "signatures": sorted(kept.maps), "pool_documents": len(pool_keys)}


def _query_vs_pool(a, b, own, pool, pool_item, dims, temperature) -> torch.Tensor:
    """One-part queries (B, d) against their own items ``b`` (B, d) and every pool document (P, d); pool rows
    whose item code (``pool_item``, (P,)) is the query's own (``own``, (B,); -1: none) are masked. Mean over
    Matryoshka prefixes of the cross-entropy."""
    mask = pool_item[None, :] == own[:, None]  # (B, P)
    total = a.new_zeros(())
    for k in dims:
        za, zb, zp = (F.normalize(x[:, :k], dim=-1) for x in (a, b, pool))
        logits = torch.cat([(za * zb).sum(-1, keepdim=True), (za @ zp.T).masked_fill(mask, NEG_INF)], 1) / temperature
        total = total + F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long))
    return total / len(dims)
