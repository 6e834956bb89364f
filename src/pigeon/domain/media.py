"""Attachments' value types and the rules every blob key, digest and content type obeys.

Blob keys are minted by the server (a ULID, plus `.thumb` for a thumbnail) and never taken from a
client as-is: every adapter checks them against one strict pattern before touching a file or a
bucket, so a key can never name a path outside the blob directory. Digests are lowercase hex
SHA-256 everywhere in pigeon (S3 wants base64; its adapter converts). Sizes are bytes, times are
integer milliseconds since the epoch, as in the rest of the domain.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import quote

import msgspec

from pigeon.domain.errors import BadRequest, RateLimited

#: A ULID in canonical form, optionally `.thumb`: no dots, slashes or percent signs otherwise.
_KEY = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}(?:\.thumb)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
#: `type/subtype` with optional `; name=value` parameters (no CR/LF, no commas).
_CONTENT_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"[^\"\r\n\\]*\"))*"
)
THUMB_SUFFIX = ".thumb"
MAX_CONTENT_TYPE_CHARS = 255
MAX_FILENAME_CHARS = 255


def check_key(key: str) -> str:
    """`key` if it is a well-formed blob key; `BadRequest` otherwise (path traversal included)."""
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise BadRequest("invalid blob key")
    return key


def thumbnail_key(key: str) -> str:
    """The key of the thumbnail of the blob at `key`."""
    check_key(key)
    if key.endswith(THUMB_SUFFIX):
        raise BadRequest("a thumbnail has no thumbnail")
    return key + THUMB_SUFFIX


def check_sha256(value: str) -> str:
    """`value` if it is a lowercase hex SHA-256 digest; `BadRequest` otherwise."""
    if not isinstance(value, str) or _SHA256.fullmatch(value) is None:
        raise BadRequest("sha256 must be 64 lowercase hex digits")
    return value


def check_content_type(value: str) -> str:
    """`value` if it is a plain media type (parameters allowed); `BadRequest` otherwise. It ends
    up in a response header, so CR, LF and anything else outside the grammar is refused."""
    if (
        not isinstance(value, str)
        or len(value) > MAX_CONTENT_TYPE_CHARS
        or _CONTENT_TYPE.fullmatch(value) is None
    ):
        raise BadRequest("invalid content type")
    return value


def check_size(size: int) -> int:
    """`size` if it is a non-negative integer; `BadRequest` otherwise."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest("size must be a non-negative integer")
    return size


def content_disposition(filename: str | None, inline: bool = False) -> str:
    """A `Content-Disposition` value that is safe whatever `filename` holds: an ASCII fallback
    with quotes, backslashes, separators and control characters replaced, plus the exact
    name as RFC 5987 `filename*` (UTF-8, percent-encoded)."""
    kind = "inline" if inline else "attachment"
    if not filename:
        return kind
    name = filename[:MAX_FILENAME_CHARS]
    fallback = "".join(
        c if 0x20 <= ord(c) < 0x7F and c not in '"\\/;' else "_" for c in name
    ).strip(" .")
    return f"{kind}; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{quote(name, safe='')}"


class BlobInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What storage knows of one stored blob. `sha256` is None when the engine does not keep
    a digest it has verified (an S3-compatible store that ignores checksums)."""

    key: str
    size: int
    content_type: str
    sha256: str | None = None


class UploadTicket(msgspec.Struct, frozen=True, kw_only=True):
    """How a client uploads one blob: send `method` to `url` with exactly these `headers` and
    the declared bytes as the body, before `expires_at`. The headers are part of what is
    signed (S3 checks them; pigeon's own endpoint checks Content-Type and Content-Length)."""

    url: str
    method: Literal["PUT"] = "PUT"
    headers: dict[str, str]
    expires_at: int


class UploadGrant(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified, unexpired signed upload URL of pigeon's own endpoint allows: these exact
    bytes (size and digest) with this content type under this key."""

    key: str
    size: int
    sha256: str
    content_type: str
    expires_at: int


class DownloadGrant(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified, unexpired signed download URL allows. `seconds_left` bounds caching;
    `shared_cache` says whether caches other than the client's (a CDN) may keep the response."""

    key: str
    expires_at: int
    seconds_left: int
    filename: str | None = None
    shared_cache: bool = False


class Thumbnail(msgspec.Struct, frozen=True, kw_only=True):
    """A small preview image (JPEG or WebP), ready to store next to its blob."""

    data: bytes
    content_type: str
    width: int
    height: int


class ThumbnailOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """The result of trying to make a thumbnail: one, or why not. `skipped` is a decision (not
    an image, encrypted, ffmpeg not installed, too large), `failed` an error (undecodable,
    ffmpeg failed). Either way the upload itself is unaffected."""

    thumbnail: Thumbnail | None = None
    key: str | None = None
    source_width: int | None = None
    source_height: int | None = None
    skipped: str | None = None
    failed: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The attachment metadata to store and send to clients (JSON-ready)."""
        out: dict[str, Any] = {}
        if self.source_width is not None and self.source_height is not None:
            out["width"], out["height"] = self.source_width, self.source_height
        if self.thumbnail is None:
            out["thumbnail"] = None
        else:
            out["thumbnail"] = {
                "key": self.key,
                "content_type": self.thumbnail.content_type,
                "width": self.thumbnail.width,
                "height": self.thumbnail.height,
                "size": len(self.thumbnail.data),
            }
        if self.skipped is not None:
            out["thumbnail_skipped"] = self.skipped
        if self.failed is not None:
            out["thumbnail_failed"] = self.failed
        return out


class AttachmentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An attachment as the store keeps it: what its owner declared (the upload must match it
    byte for byte), whether the upload was verified, and what the server learnt afterwards
    (`meta`: thumbnail, dimensions, or why there is no thumbnail). The blob key is the id."""

    id: str
    owner: str
    content_type: str
    size: int
    sha256: str
    filename: str | None = None
    encrypted: bool = False
    created_at: int
    uploaded_at: int | None = None
    meta: dict[str, Any] = {}


def refuse_if_over_quota(blocking_at: int | None, max_per_window: int, window_start: int) -> None:
    """Raise `RateLimited` if an owner's attachment quota is used up. `blocking_at` is the
    creation time of the owner's `max_per_window`-th newest attachment in the window (None if
    they have fewer): a new one fits once the window has moved past it. Every store adapter
    finds `blocking_at` in its own transaction and decides with this."""
    if max_per_window > 0 and blocking_at is None:
        return
    wait_ms = 1 if blocking_at is None else max(1, blocking_at - window_start + 1)
    raise RateLimited(
        f"at most {max_per_window} attachments per window; retry later",
        retry_after=wait_ms / 1000,
    )
