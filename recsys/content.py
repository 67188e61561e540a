"""The content model: an item (or a query) is an ordered list of parts.

A :class:`Part` is text, an image, an audio clip or a video, given as inline bytes or a file path,
with a MIME type. A :class:`Content` keeps the parts in order, so "text, image, text" is an
interleaved item that the embedder fuses into ONE vector (as Gemini Embedding 2 does).
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PartKind = Literal["text", "image", "audio", "video"]
KINDS: tuple[PartKind, ...] = ("text", "image", "audio", "video")

_MIME_BY_SUFFIX = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mp4": "video/mp4",
    ".mpeg": "video/mpeg",
    ".mpg": "video/mpeg",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}


class ContentError(ValueError):
    """A part or content that cannot be used; the message names the item and the problem."""

    def __init__(self, item: str | None, problem: str):
        self.item = item
        self.problem = problem
        super().__init__(f"item {item!r}: {problem}" if item is not None else problem)


def guess_mime(path: str | Path) -> str | None:
    suffix = Path(path).suffix.lower()
    return _MIME_BY_SUFFIX.get(suffix) or mimetypes.guess_type(str(path))[0]


@dataclass(frozen=True)
class Part:
    """One piece of content.

    Args:
        kind: "text", "image", "audio" or "video".
        text: the text, for text parts.
        path: a media file, for media parts (or ``data``).
        data: inline media bytes, for media parts (or ``path``).
        mime_type: e.g. "image/jpeg"; guessed from the path's suffix when missing.
        source: "content" for the item's own content, "user" for text derived from user activity
            (tags); cold-start evaluation drops "user" parts because a new item has none.
    """

    kind: PartKind
    text: str | None = None
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    mime_type: str | None = None
    source: Literal["content", "user"] = "content"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ContentError(None, f"unknown part kind {self.kind!r} (expected one of {KINDS})")
        if self.kind == "text":
            if self.text is None:
                raise ContentError(None, "a text part needs text")
        elif self.path is None and self.data is None:
            raise ContentError(None, f"a {self.kind} part needs a path or inline data")
        if self.kind != "text" and self.mime_type is None and self.path is not None:
            object.__setattr__(self, "mime_type", guess_mime(self.path))

    # Constructors -----------------------------------------------------------------------------
    @classmethod
    def of_text(cls, text: str, source: Literal["content", "user"] = "content") -> "Part":
        return cls("text", text=text, mime_type="text/plain", source=source)

    @classmethod
    def of_file(cls, kind: PartKind, path: str | Path) -> "Part":
        return cls(kind, path=str(path))

    def read_bytes(self) -> bytes:
        """The media bytes (inline or read from the path)."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ContentError(None, f"{self.kind} part has no data")
        try:
            return Path(self.path).read_bytes()
        except OSError as exc:
            raise ContentError(None, f"cannot read {self.kind} file {self.path}: {exc.strerror or exc}") from exc

    def digest(self) -> str:
        """A hash of what the part says (text or media bytes), not of where it lives."""
        h = hashlib.sha256(self.kind.encode())
        h.update(b"\0")
        h.update(self.text.encode() if self.kind == "text" else self.read_bytes())
        return h.hexdigest()

    def describe(self) -> str:
        if self.kind == "text":
            t = self.text or ""
            return f"text({t[:40]!r}{'...' if len(t) > 40 else ''})"
        where = self.path if self.path is not None else f"{len(self.data or b'')} bytes"
        return f"{self.kind}({where}, {self.mime_type})"


@dataclass(frozen=True)
class Content:
    """An ordered list of parts: one item, one query, or one user's history."""

    parts: tuple[Part, ...]
    item_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise ContentError(self.item_id, "content has no parts")

    @classmethod
    def of(cls, *parts: Part | str, item_id: str | None = None) -> "Content":
        """``Content.of("a red bike", Part.of_file("image", "bike.jpg"))``: strings become text parts."""
        return cls(tuple(Part.of_text(p) if isinstance(p, str) else p for p in parts), item_id=item_id)

    @property
    def kinds(self) -> tuple[PartKind, ...]:
        return tuple(p.kind for p in self.parts)

    def count(self, kind: PartKind) -> int:
        return sum(1 for p in self.parts if p.kind == kind)

    def without_user_parts(self) -> "Content":
        """The item as a brand-new item would look: its own content only."""
        kept = tuple(p for p in self.parts if p.source == "content")
        return Content(kept, item_id=self.item_id)

    def digest(self) -> str:
        """Hash of the ordered parts' contents (used as the embedding-cache key, with backend and dim)."""
        h = hashlib.sha256()
        for part in self.parts:
            h.update(part.digest().encode())
        return h.hexdigest()

    def text(self) -> str:
        """All text parts joined (for backends or baselines that only read text)."""
        return " | ".join(p.text for p in self.parts if p.kind == "text" and p.text)
