"""Real media decoding: images with Pillow, audio with soundfile (PyAV for compressed formats),
video with PyAV (frames sampled at about 1 fps, at most 32, plus the audio track).

Every decoder raises :class:`ContentError` with the problem in words, so the caller can fail the
one item and carry on with the batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from math import gcd

import numpy as np
from PIL import Image, UnidentifiedImageError

from recsys.content import ContentError

AUDIO_RATE = 16000


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ContentError(None, f"cannot decode image: {exc}") from exc
    return img.convert("RGB")


def resample(wave: np.ndarray, rate: int, target: int = AUDIO_RATE) -> np.ndarray:
    """Polyphase resampling to ``target`` Hz (anti-aliased)."""
    if rate == target:
        return wave.astype(np.float32)
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def decode_audio(data: bytes, target_rate: int = AUDIO_RATE) -> np.ndarray:
    """Bytes (wav/flac/ogg/mp3/...) -> mono float32 waveform at ``target_rate``."""
    import soundfile as sf

    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        wave, rate = _decode_audio_av(data)
    if wave.size == 0:
        raise ContentError(None, "audio has no samples")
    if not np.isfinite(wave).all():
        raise ContentError(None, "audio has non-finite samples")
    return resample(wave, int(rate), target_rate)


def _decode_audio_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise ContentError(None, "no audio stream")
            return _read_audio_stream(container)
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        raise ContentError(None, f"cannot decode audio: {exc}") from exc


def _read_audio_stream(container) -> tuple[np.ndarray, int]:
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or AUDIO_RATE
    chunks = []
    for frame in container.decode(stream):
        arr = frame.to_ndarray()
        if arr.ndim == 2 and not frame.format.is_planar:  # interleaved: (1, samples*channels)
            arr = arr.reshape(-1, len(frame.layout.channels)).T
        chunks.append(arr.astype(np.float32).mean(axis=0) if arr.ndim == 2 else arr.astype(np.float32))
    wave = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if np.abs(wave).max(initial=0) > 1.5:  # integer PCM formats
        wave = wave / 32768.0
    return wave, rate


@dataclass
class VideoClip:
    frames: list[Image.Image]  # sampled at ~fps, at most max_frames
    audio: np.ndarray | None  # mono float32 at AUDIO_RATE, or None without an audio track
    duration_s: float


def decode_video(data: bytes, fps: float = 1.0, max_frames: int = 32, with_audio: bool = True) -> VideoClip:
    """Bytes (mp4/mpeg/webm/...) -> frames sampled at ``fps`` (spread over the clip when it is
    longer than ``max_frames`` seconds) and the audio track."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ContentError(None, "video has no video stream")
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            duration = _duration(container, vs)
            step = max(1.0 / fps, duration / max_frames) if duration > 0 else 1.0 / fps
            frames: list[Image.Image] = []
            next_t = 0.0
            for frame in container.decode(vs):
                t = float(frame.time) if frame.time is not None else next_t
                if t + 1e-6 >= next_t:
                    frames.append(frame.to_image().convert("RGB"))
                    next_t += step
                    if len(frames) >= max_frames:
                        break
            audio = None
            if with_audio and container.streams.audio:
                container.seek(0)
                wave, rate = _read_audio_stream(container)
                audio = resample(wave, rate) if wave.size else None
    except ContentError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise ContentError(None, f"cannot decode video: {exc}") from exc
    if not frames:
        raise ContentError(None, "video has no decodable frames")
    return VideoClip(frames, audio, duration)


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def probe_duration(data: bytes, kind: str) -> float:
    """Duration in seconds of an audio or video file, without decoding it all."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            streams = container.streams.video if kind == "video" else container.streams.audio
            if not streams:
                raise ContentError(None, f"{kind} has no {kind} stream")
            return _duration(container, streams[0])
    except ContentError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise ContentError(None, f"cannot read {kind}: {exc}") from exc


def has_audio_track(data: bytes) -> bool:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            return bool(container.streams.audio)
    except (av.error.FFmpegError, ValueError, OSError):
        return False


def check_media_file(path, kind: str) -> str | None:
    """A cheap check that a media file will decode, at load time: the image's header (Pillow) plus, for JPEG
    and PNG, the end-of-image marker a truncated file lacks; the audio or video container's header and
    stream (PyAV, without decoding). Returns the problem in words, or None when it looks whole."""
    from pathlib import Path

    path = Path(path)
    try:
        if kind == "image":
            with Image.open(path) as im:
                fmt = im.format
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 16))
                tail = f.read()
            if fmt == "JPEG" and b"\xff\xd9" not in tail:
                return "JPEG without its end marker (truncated?)"
            if fmt == "PNG" and b"IEND" not in tail:
                return "PNG without its IEND chunk (truncated?)"
            return None
        if kind in ("audio", "video"):
            probe_duration(path.read_bytes() if path.stat().st_size < (8 << 20) else _head(path), kind)
            return None
    except (UnidentifiedImageError, OSError, ContentError, ValueError) as exc:
        return getattr(exc, "problem", None) or f"does not decode as {kind}: {exc}"
    return None


def _head(path, size: int = 8 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)
