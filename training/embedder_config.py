"""The local embedder's training recipe: every stage's steps, rates and batch mix (training/embedder.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbedderTrainConfig:
    stage1_steps: int = 600
    stage2_steps: int = 400
    batch_size: int = 128
    lr: float = 3e-4  # the fusion model on frozen features: slower, more regularised (the poster path overfits)
    weight_decay: float = 0.5
    audio_lr: float = 1e-3  # the audio encoder learns from scratch: it needs the higher rate
    audio_weight_decay: float = 0.1
    temperature: float = 0.07
    kd_weight: float = 5.0
    prefix_keep: float = 0.5  # share of contents that carry their task prefix in training
    val_every: int = 50
    soup_last: int = 4
    interpolate: tuple[float, ...] = (0.25, 0.5, 0.75)  # stage 3: stage1 + a * (soup - stage1)
    # Stage 2's share of batches from co-engagement pairs (None: by weight x sqrt(size), which gave it ~85%
    # and cost the poster path more than it should; the other tasks keep their relative mix).
    coengagement_share: float | None = 0.5
    part_item_share: float | None = 0.15  # stage 2's share of one-part <-> whole-item batches (search by any part)
    # Distil MiniLM's geometry on every content with text (its mean sentence vector as teacher), not only on
    # batches whose contents are all text-only: co-engagement and part-item batches too, where items carry
    # posters (what moves items with the same title apart is learned from the text).
    kd_items: bool = False
    # Stage 4, the learned modality-gap correction (fit_correction): rank of each signature's residual map
    # (0: centres only, the recipe before it), its steps, rate, decay, pairs per task batch and per task,
    # and the fixed temperature of its InfoNCE.
    correction_rank: int = 64
    correction_steps: int = 600
    correction_lr: float = 1e-3
    correction_weight_decay: float = 1e-2
    correction_batch: int = 512
    correction_pairs: int = 8000
    correction_temperature: float = 0.05
    # the tasks whose signatures get a map: queries only, so item (document) vectors, what recommendations are
    # built from, keep their geometry (maps on documents too cost LOO and COLD: fusion-85e575be45, 08b4b69)
    correction_tasks: tuple[str, ...] = ("query",)
    # the weight of the one-part query -> whole item task in stage 4's loss (every other task weighs 1): the
    # text query map is shared with poster, genre, caption and digit-word queries, which pull it elsewhere
    correction_search_weight: float = 16.0
    seed: int = 0
