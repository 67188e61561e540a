"""A synthetic multimodal catalog with known latent clusters that drive user behaviour.

Every item belongs to one cluster. The cluster shows in each modality the item has: a theme
vocabulary in its text, a colour and shape in its image, a pitch in its audio, a coloured moving
disc (and a tone track) in its video. Users prefer one or two clusters and pick items from them,
so a model that reads the content can recover who likes what. It writes the generic format
(items.jsonl, interactions.csv, media/) and loads it back with :func:`load_folder`, so tests
exercise the real loader and real media decoding.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import soundfile as sf
from PIL import Image, ImageDraw

from recsys.data.generic import load_folder
from recsys.data.types import Dataset

THEMES = [
    ("ocean", "wave", "surf", "beach", "tide", "sail", "coral", "harbor"),
    ("forest", "tree", "moss", "pine", "trail", "owl", "fern", "cabin"),
    ("space", "rocket", "planet", "orbit", "galaxy", "astronaut", "comet", "moon"),
    ("kitchen", "recipe", "bread", "spice", "oven", "soup", "chef", "garlic"),
    ("football", "goal", "stadium", "coach", "league", "striker", "match", "referee"),
    ("jazz", "saxophone", "swing", "club", "trumpet", "melody", "blues", "piano"),
    ("castle", "knight", "dragon", "sword", "queen", "quest", "kingdom", "armor"),
    ("robot", "circuit", "laser", "android", "code", "machine", "sensor", "cyber"),
    ("garden", "flower", "tulip", "bee", "rose", "seed", "bloom", "meadow"),
    ("winter", "snow", "ski", "ice", "frost", "glacier", "sled", "blizzard"),
    ("desert", "camel", "dune", "oasis", "cactus", "sand", "mirage", "canyon"),
    ("city", "subway", "skyline", "taxi", "tower", "street", "neon", "traffic"),
]
FILLER = ("the", "a", "new", "great", "story", "about", "with", "and", "of", "best")


@dataclass(frozen=True)
class SyntheticSpec:
    n_items: int = 240
    n_users: int = 120
    n_clusters: int = 6
    mean_interactions: int = 25
    image_size: int = 64
    audio_seconds: float = 1.0
    sample_rate: int = 16000
    video_seconds: float = 2.0
    video_fps: int = 4
    seed: int = 0
    # Share of items per content layout; the rest are text + image.
    share_audio: float = 0.2
    share_video: float = 0.2
    share_interleaved: float = 0.2
    share_media_only: float = 0.1


def _colour(cluster: int, n: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(cluster / n, 0.85, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def _pitch(cluster: int) -> float:
    return 220.0 * 2 ** (cluster * 5 / 12)  # fourths apart: clearly distinct pitches


def make_image(cluster: int, spec: SyntheticSpec, rng: np.random.Generator) -> Image.Image:
    s = spec.image_size
    bg = np.array(_colour(cluster, spec.n_clusters), dtype=np.float32)
    arr = np.clip(bg + rng.normal(0, 25, (s, s, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    x, y = rng.integers(4, s // 2, 2)
    shape = cluster % 3
    box = [int(x), int(y), int(x + s // 3), int(y + s // 3)]
    if shape == 0:
        draw.ellipse(box, fill=(255, 255, 255))
    elif shape == 1:
        draw.rectangle(box, fill=(0, 0, 0))
    else:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=(255, 255, 0))
    return img


def make_tone(cluster: int, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    f = _pitch(cluster) * (1 + rng.normal(0, 0.01))
    wave = 0.5 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(2 * np.pi * 2 * f * t)
    return (wave + rng.normal(0, 0.05, t.size)).astype(np.float32)


def write_video(path: Path, cluster: int, spec: SyntheticSpec, rng: np.random.Generator) -> None:
    """An MP4 (H.264 + AAC): a disc of the cluster's colour moving across noise, and its tone."""
    import av

    s, fps = spec.image_size, spec.video_fps
    n_frames = int(spec.video_seconds * fps)
    colour = np.array(_colour(cluster, spec.n_clusters), dtype=np.float32)
    yy, xx = np.mgrid[0:s, 0:s]
    audio = make_tone(cluster, spec.video_seconds, spec.sample_rate, rng)
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width = vs.height = s
        vs.pix_fmt = "yuv420p"
        aud = out.add_stream("aac", rate=spec.sample_rate)
        aud.layout = "mono"
        for k in range(n_frames):
            cx, cy = (k + 1) * s / (n_frames + 1), s / 2 + rng.normal(0, 2)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (s / 5) ** 2
            frame = rng.normal(60, 20, (s, s, 3)).clip(0, 255)
            frame[disc] = colour
            vf = av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")
            for packet in vs.encode(vf):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        chunk = 1024
        for start in range(0, audio.size, chunk):
            piece = audio[start : start + chunk]
            af = av.AudioFrame.from_ndarray(piece[None, :], format="flt", layout="mono")
            af.sample_rate = spec.sample_rate
            af.pts = start
            af.time_base = Fraction(1, spec.sample_rate)
            for packet in aud.encode(af):
                out.mux(packet)
        for packet in aud.encode():
            out.mux(packet)


def _text(cluster: int, rng: np.random.Generator, n_words: int = 8) -> str:
    words = list(rng.choice(THEMES[cluster % len(THEMES)], size=n_words - 3)) + list(rng.choice(FILLER, size=3))
    rng.shuffle(words)
    return " ".join(words)


def generate(folder: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a synthetic catalog in the generic format under ``folder``; returns the folder."""
    if spec.n_clusters > len(THEMES):
        raise ValueError(f"at most {len(THEMES)} clusters")
    rng = np.random.default_rng(spec.seed)
    folder = Path(folder)
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)

    clusters = rng.integers(0, spec.n_clusters, spec.n_items)
    layouts = rng.choice(
        ["audio", "video", "interleaved", "media_only", "image"],
        size=spec.n_items,
        p=[spec.share_audio, spec.share_video, spec.share_interleaved, spec.share_media_only,
           1 - spec.share_audio - spec.share_video - spec.share_interleaved - spec.share_media_only],
    )
    with open(folder / "items.jsonl", "w") as f:
        for i, (c, layout) in enumerate(zip(clusters, layouts)):
            item_id = f"s{i:05d}"
            c = int(c)
            parts: list[dict] = []
            if layout in ("image", "interleaved", "media_only"):
                make_image(c, spec, rng).save(media / f"{item_id}.png")
            if layout == "image":
                parts = [{"text": _text(c, rng)}, {"image": f"{item_id}.png"}]
            elif layout == "interleaved":
                parts = [{"text": _text(c, rng, 5)}, {"image": f"{item_id}.png"}, {"text": _text(c, rng, 5)}]
            elif layout == "media_only":
                parts = [{"image": f"{item_id}.png"}]
            elif layout == "audio":
                sf.write(media / f"{item_id}.wav", make_tone(c, spec.audio_seconds, spec.sample_rate, rng), spec.sample_rate)
                parts = [{"text": _text(c, rng)}, {"audio": f"{item_id}.wav"}]
            else:
                write_video(media / f"{item_id}.mp4", c, spec, rng)
                parts = [{"text": _text(c, rng)}, {"video": f"{item_id}.mp4"}]
            title = f"{THEMES[c][0]} item {i}"
            f.write(json.dumps({"item_id": item_id, "title": title, "cluster": c, "layout": str(layout), "parts": parts}) + "\n")

    # Users prefer one or two clusters; within a cluster, items are Zipf-popular.
    by_cluster = {c: np.flatnonzero(clusters == c) for c in range(spec.n_clusters)}
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = []
    for u in range(spec.n_users):
        prefs = rng.dirichlet(np.full(spec.n_clusters, 0.3))
        n = max(5, int(rng.poisson(spec.mean_interactions)))
        t = start + timedelta(hours=float(rng.uniform(0, 24 * 30)))
        for _ in range(n):
            c = int(rng.choice(spec.n_clusters, p=prefs))
            pool = by_cluster[c]
            if pool.size == 0:
                continue
            weights = 1.0 / np.arange(1, pool.size + 1)
            item = int(pool[rng.choice(pool.size, p=weights / weights.sum())])
            t += timedelta(minutes=float(rng.exponential(600)))
            rows.append((f"u{u:04d}", f"s{item:05d}", int(t.timestamp()), 1.0))
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "value"], orient="row").write_csv(folder / "interactions.csv")
    return folder


def load_synthetic(folder: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Dataset:
    """Generate (if the folder is empty) and load a synthetic catalog."""
    folder = Path(folder)
    if not (folder / "items.jsonl").exists():
        generate(folder, spec)
    return load_folder(folder, name="synthetic")
