"""How good is the embedder? Cross-modal retrieval on held-out real pairs, chance levels, and the
simple baseline to beat (a linear InfoNCE map from frozen image features into the text space).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def retrieval_recall(queries: np.ndarray, docs: np.ndarray, ks: tuple[int, ...] = (1, 10)) -> dict[int, float]:
    """Query i's match is doc i. Returns {k: share of queries whose match ranks in the top k}."""
    sims = torch.from_numpy(np.asarray(queries, np.float32)) @ torch.from_numpy(np.asarray(docs, np.float32)).T
    true = sims.diagonal()[:, None]
    rank = (sims > true).sum(1)  # 0 = first
    return {k: float((rank < k).float().mean()) for k in ks}


def chance(n: int, ks: tuple[int, ...] = (1, 10)) -> dict[int, float]:
    return {k: min(k, n) / n for k in ks}


def nearest_label_accuracy(vectors: np.ndarray, label_vectors: np.ndarray, labels: np.ndarray) -> float:
    """Share of vectors whose most similar label vector is their own label."""
    pred = (np.asarray(vectors) @ np.asarray(label_vectors).T).argmax(1)
    return float((pred == np.asarray(labels)).mean())


@dataclass
class LinearMap:
    """The baseline: W maps frozen image features into the frozen text space, trained with InfoNCE."""

    W: torch.Tensor  # (1280, 384)
    mean: torch.Tensor  # (1280,) standardisation of the image features, from the training rows
    std: torch.Tensor

    @classmethod
    def fit(cls, image_feats: np.ndarray, text_vecs: np.ndarray, epochs: int = 300, lr: float = 1e-3,
            temperature: float = 0.05, weight_decay: float = 1e-4, seed: int = 0,
            val: tuple[np.ndarray, np.ndarray] | None = None, val_every: int = 10) -> "LinearMap":
        """image_feats (n, 1280), text_vecs (n, 384): paired rows. With ``val`` (held-out pairs, same
        shapes) the map is early-stopped: it keeps the W with the best validation text->image R@10, as the
        embedder keeps its validation-best checkpoint."""
        g = torch.Generator().manual_seed(seed)
        raw = torch.from_numpy(np.asarray(image_feats, np.float32))
        mean, std = raw.mean(0), raw.std(0) + 1e-6
        x = (raw - mean) / std
        y = F.normalize(torch.from_numpy(np.asarray(text_vecs, np.float32)), dim=-1)
        W = (torch.randn(x.shape[1], y.shape[1], generator=g) * 0.01).requires_grad_()
        opt = torch.optim.AdamW([W], lr=lr, weight_decay=weight_decay)
        labels = torch.arange(x.shape[0])
        best: tuple[float, torch.Tensor] | None = None
        for epoch in range(1, epochs + 1):  # full batch: a few thousand pairs
            logits = F.normalize(x @ W, dim=-1) @ y.T / temperature
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            if val is not None and (epoch % val_every == 0 or epoch == epochs):
                m = cls(W.detach().clone(), mean, std)
                score = retrieval_recall(np.asarray(val[1], np.float32), m(val[0]))[10]
                if best is None or score > best[0]:
                    best = (score, m.W)
        return cls(best[1] if best is not None else W.detach(), mean, std)

    def __call__(self, image_feats: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(np.asarray(image_feats, np.float32)) - self.mean) / self.std
        return F.normalize(x @ self.W, dim=-1).numpy()
