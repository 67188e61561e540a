"""The local backend's fusion model: interleaved parts in, one Matryoshka vector out.

Reads top to bottom like a small transformer file:

1. each part arrives as *segments* of frozen backbone features: text tokens (MiniLM, 384-d, with the
   sentence vector first), image tokens (EfficientNet-Lite0, 1280-d: global + 2x2 grid), video frames
   (1280-d, one per sampled frame), an image's style statistics (1568-d, one token) and log-mel
   spectrograms (audio, or a video's sound track);
2. each segment is projected to ``d_model`` tokens (audio through a small conv encoder trained here,
   since no pretrained audio encoder installs offline), plus a modality embedding and a position
   embedding over the whole interleaved sequence;
3. a bidirectional transformer mixes all tokens of the content;
4. masked mean pooling, layer norm and a linear head give ``out_dim`` coordinates whose prefixes
   (64, 128, ...) are themselves embeddings (Matryoshka);
5. plus an *anchor*: a linear map of the mean MiniLM sentence vector of the content's text parts.
   Initialised to MiniLM's principal axes (so prefixes are the top principal components) with the
   head initialised small, an untrained model is (almost) MiniLM's text space; training then moves
   images, audio and video into that space and lets every modality adjust the fused vector. A few
   thousand paired examples cannot learn a better text space than MiniLM's from scratch; this way
   they do not have to;
6. plus an *image anchor*: a small MLP from each content's images ([standardised style statistics,
   normalised global token], averaged over its images) straight to the output, its last layer
   initialised small. It is the image counterpart of the text anchor: with a few thousand posters, this
   short regularised path aligns posters with their text better than the transformer path alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("text", "image", "audio", "frame", "video_audio", "image_style")


@dataclass
class FusionConfig:
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    feature_dropout: float = 0.5  # on the frozen backbone features, in training (a few thousand pairs overfit fast)
    text_dim: int = 384  # MiniLM hidden size
    image_dim: int = 1280  # EfficientNet-Lite0 channels
    style_dim: int = 1568  # per-stage channel means and stds of EfficientNet-Lite0 (backbones.STYLE_DIM)
    style_dropout: float = 0.5  # the style token has many weak features: drop more of them
    image_anchor_hidden: int = 512  # 0 = no image anchor (see FusionEncoder.image_anchor_input)
    n_mels: int = 64
    max_tokens: int = 192  # the fused sequence is cut here
    max_text_tokens: int = 16  # per text part: the sentence vector + the first 15 token states
    max_audio_tokens: int = 16  # per audio segment, after the conv encoder
    out_dim: int = 768
    matryoshka_dims: tuple[int, ...] = field(default=(64, 128, 256, 512, 768))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matryoshka_dims"] = list(self.matryoshka_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FusionConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["matryoshka_dims"] = tuple(d.get("matryoshka_dims", (64, 128, 256, 512, 768)))
        return cls(**d)


# A segment is (modality name, features). Shapes: text (T, 384); image (5, 1280); image_style (1, 1568);
# frame (F, 1280); audio / video_audio (n_mels, T_frames).
Segment = tuple[str, torch.Tensor]


class AudioEncoder(nn.Module):
    """Log-mel (n_mels, T) -> (T', d_model) tokens: three strided convolutions (8x shorter in time),
    pooled to at most ``max_audio_tokens`` per clip."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d = cfg.d_model
        self.convs = nn.Sequential(
            nn.Conv1d(cfg.n_mels, 128, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(128, d, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(d, d, 3, stride=2, padding=1), nn.GELU(),
        )
        self.max_tokens = cfg.max_audio_tokens

    def forward(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """mels: clips of (n_mels, T_i) -> a list of (T_i', d_model), run as one padded batch."""
        lengths = [m.shape[1] for m in mels]
        x = torch.stack([F.pad((m - m.mean(1, keepdim=True)) / (m.std(1, keepdim=True) + 1e-5), (0, max(lengths) - m.shape[1]))
                         for m in mels])  # per-clip CMVN, zero-padded: (N, n_mels, T_max)
        x = self.convs(x)  # (N, d, ceil(T_max / 8))
        out = []
        for row, t in zip(x, lengths):
            row = row[:, : max(1, math.ceil(t / 8))]
            if row.shape[-1] > self.max_tokens:
                row = F.adaptive_avg_pool1d(row[None], self.max_tokens)[0]
            out.append(row.T)
        return out


class FusionEncoder(nn.Module):
    """Interleaved multimodal segments -> one ``out_dim`` vector per content (not yet normalised)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.image_proj = nn.Sequential(nn.LayerNorm(cfg.image_dim), nn.Linear(cfg.image_dim, d))  # images and frames
        self.style_proj = nn.Sequential(nn.LayerNorm(cfg.style_dim), nn.Linear(cfg.style_dim, d))
        # Style statistics differ in scale by orders of magnitude between stages: standardise each with
        # the training images' mean and std (set_style_stats) before the layer norm.
        self.register_buffer("style_mean", torch.zeros(cfg.style_dim))
        self.register_buffer("style_std", torch.ones(cfg.style_dim))
        self.audio = AudioEncoder(cfg)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.style_dropout = nn.Dropout(cfg.style_dropout)
        self.modality = nn.Embedding(len(MODALITIES), d)
        self.position = nn.Embedding(cfg.max_tokens, d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.out_dim)
        nn.init.normal_(self.head.weight, std=0.01)  # small, not zero: a media-only content must not start at
        nn.init.zeros_(self.head.bias)  # the zero vector, where normalising has no gradient to speak of
        self.image_anchor = None
        if cfg.image_anchor_hidden:
            self.image_anchor = nn.Sequential(
                nn.Linear(cfg.style_dim + cfg.image_dim, cfg.image_anchor_hidden), nn.GELU(),
                nn.Dropout(cfg.style_dropout), nn.Linear(cfg.image_anchor_hidden, cfg.out_dim))
            nn.init.normal_(self.image_anchor[-1].weight, std=0.01)
            nn.init.zeros_(self.image_anchor[-1].bias)
        self.anchor = nn.Linear(cfg.text_dim, cfg.out_dim, bias=False)
        with torch.no_grad():  # until set_anchor_basis: MiniLM's own axes in the first text_dim outputs
            self.anchor.weight.zero_()
            self.anchor.weight[: cfg.text_dim].copy_(torch.eye(cfg.text_dim))

    @torch.no_grad()
    def set_anchor_basis(self, sentence_vectors: torch.Tensor) -> None:
        """Point the anchor's outputs along the principal axes of these (N, text_dim) MiniLM vectors,
        most variance first, so every Matryoshka prefix of a text-only content is a PCA truncation."""
        x = sentence_vectors.float()
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # rows: principal axes
        self.anchor.weight.zero_()
        k = min(vh.shape[0], self.cfg.out_dim)
        self.anchor.weight[:k] = vh[:k]

    @torch.no_grad()
    def set_style_stats(self, styles: torch.Tensor) -> None:
        """Standardise style tokens with these (N, style_dim) training images' statistics."""
        self.style_mean.copy_(styles.float().mean(0))
        self.style_std.copy_(styles.float().std(0).clamp(min=1e-6))

    def _standardise_style(self, x: torch.Tensor) -> torch.Tensor:
        return self.style_dropout((x - self.style_mean) / self.style_std)

    def project(self, batch: list[list[Segment]]) -> list[torch.Tensor]:
        """Every segment of every content -> (L_i, d_model) tokens; one projection call per modality."""
        flat = [(b, name, f) for b, segs in enumerate(batch) for name, f in segs]
        out: list[torch.Tensor | None] = [None] * len(flat)
        for names, proj, prep in ((("text",), self.text_proj, self.feature_dropout),
                                  (("image", "frame"), self.image_proj, self.feature_dropout),
                                  (("image_style",), self.style_proj, self._standardise_style)):
            idx = [i for i, (_, n, _) in enumerate(flat) if n in names]
            if not idx:
                continue
            feats = [flat[i][2][: self.cfg.max_text_tokens] if flat[i][1] == "text" else flat[i][2] for i in idx]
            projected = proj(prep(torch.cat(feats))).split([f.shape[0] for f in feats])
            for i, x in zip(idx, projected):
                out[i] = x
        audio = [i for i, (_, n, _) in enumerate(flat) if n in ("audio", "video_audio")]
        if audio:
            for i, x in zip(audio, self.audio([flat[i][2] for i in audio])):
                out[i] = x
        per_content: list[list[torch.Tensor]] = [[] for _ in batch]
        for (b, name, _), x in zip(flat, out):
            per_content[b].append(x + self.modality.weight[MODALITIES.index(name)])
        seqs = []
        for parts in per_content:
            x = torch.cat(parts)[: self.cfg.max_tokens]
            seqs.append(x + self.position.weight[: x.shape[0]])
        return seqs

    def text_anchor(self, batch: list[list[Segment]]) -> torch.Tensor:
        """(B, text_dim): the mean MiniLM sentence vector (row 0 of each text segment); zeros without text."""
        out = torch.zeros(len(batch), self.cfg.text_dim)
        for b, segs in enumerate(batch):
            sent = [f[0] for name, f in segs if name == "text"]
            if sent:
                out[b] = torch.stack(sent).mean(0)
        return out

    def image_anchor_input(self, batch: list[list[Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, style_dim + image_dim) per content: the mean over its images of [standardised style,
        normalised global token], and (B,) whether it has an image at all.

        The image anchor is a small MLP from these straight to the output, the image counterpart of the
        text anchor: on a few thousand posters a regularised MLP on style statistics aligns posters with
        their text better than the transformer path alone (benchmarks/results/embedder-recipe.json)."""
        out = torch.zeros(len(batch), self.cfg.style_dim + self.cfg.image_dim)
        has = torch.zeros(len(batch), dtype=torch.bool)
        for b, segs in enumerate(batch):
            styles = [f[0] for name, f in segs if name == "image_style"]
            globals_ = [f[0] for name, f in segs if name == "image"]
            if styles and len(styles) == len(globals_):
                g = torch.stack(globals_)
                g = F.layer_norm(g, g.shape[-1:])
                out[b] = torch.cat([self._standardise_style(torch.stack(styles)), g], 1).mean(0)
                has[b] = True
        return out, has

    def forward(self, batch: list[list[Segment]]) -> torch.Tensor:
        """batch: B contents, each a list of segments -> (B, out_dim)."""
        seqs = self.project(batch)
        lengths = torch.tensor([s.shape[0] for s in seqs])
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (B, L, d)
        pad = torch.arange(x.shape[1])[None, :] >= lengths[:, None]  # True where padding
        x = self.blocks(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        out = self.anchor(self.text_anchor(batch)) + self.head(self.norm(pooled))
        if self.image_anchor is not None:
            x, has = self.image_anchor_input(batch)
            out = out + self.image_anchor(x) * has[:, None].float()
        return out
