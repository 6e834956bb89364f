"""Thumbnails of uploaded media: a small JPEG or WebP preview, made after the upload is verified.

Making one is best-effort by design: a thumbnail that cannot be made (undecodable image, a
video without ffmpeg on the machine, an encrypted blob) is reported in the attachment's
metadata and never fails or loses the upload. Hence every function here returns a
`ThumbnailOutcome` with a reason instead of raising.

`make_thumbnail` is pure and blocking (decoding is CPU work; ffmpeg is a subprocess): call it in
a worker thread, as `thumbnail_blob` does. Untrusted input is handled defensively: images are
opened only with a short list of Pillow decoders and refused above a pixel limit before they are
decoded (decompression bombs); videos go to ffmpeg with the demuxer forced from the declared
content type and only local-file access allowed, so a "video" that is really a playlist cannot
make ffmpeg read other files or URLs, and with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

from pigeon.domain.errors import PigeonError
from pigeon.domain.media import Thumbnail, ThumbnailOutcome, thumbnail_key
from pigeon.ports import BlobStore

log = logging.getLogger(__name__)

ThumbnailFormat = Literal["jpeg", "webp"]

#: Decoders Pillow may use on uploads: common formats only (less attack surface).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
#: Declared video types ffmpeg may read, and the demuxer each is forced to.
VIDEO_DEMUXERS = {
    "video/mp4": "mov",
    "video/quicktime": "mov",
    "video/3gpp": "mov",
    "video/webm": "matroska",
    "video/x-matroska": "matroska",
}
FFMPEG_NOT_INSTALLED = "ffmpeg not installed"
_EXIF_ORIENTATION = 0x0112


def make_thumbnail(
    path: Path,
    content_type: str,
    *,
    max_side: int = 320,
    fmt: ThumbnailFormat = "jpeg",
    max_pixels: int = 50_000_000,
    ffmpeg_timeout: float = 15.0,
) -> ThumbnailOutcome:
    """A thumbnail of the media in `path` (of declared `content_type`) fitting in a
    `max_side` square, or the reason there is none. Never raises."""
    base = content_type.split(";", 1)[0].strip().lower()
    try:
        if base.startswith("image/"):
            return _image_thumbnail(path, max_side, fmt, max_pixels)
        if base.startswith("video/"):
            return _video_thumbnail(path, base, max_side, fmt, ffmpeg_timeout)
    except Exception as exc:  # a thumbnail must never take the upload down with it
        log.info("thumbnail of %s failed", path, exc_info=True)
        return ThumbnailOutcome(failed=f"thumbnail failed ({type(exc).__name__})")
    return ThumbnailOutcome(skipped="not an image or video")


def _image_thumbnail(
    source: Path | io.BytesIO, max_side: int, fmt: ThumbnailFormat, max_pixels: int
) -> ThumbnailOutcome:
    try:
        img = Image.open(source, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        return ThumbnailOutcome(failed="image too large")
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's ways of saying "not an image"
        log.info("undecodable image: %s", exc)  # the details name server paths: log only
        return ThumbnailOutcome(failed="undecodable image")
    with img:
        width, height = img.size
        if width * height > max_pixels:
            return ThumbnailOutcome(failed=f"image too large ({width}x{height} pixels)")
        if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            width, height = height, width  # shown rotated by a quarter turn
        try:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, cheaply
            oriented = ImageOps.exif_transpose(img)
            oriented.thumbnail((max_side, max_side))
            thumb = _encode(oriented, fmt)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
            log.info("undecodable image: %s", exc)
            return ThumbnailOutcome(failed="undecodable image")
    return ThumbnailOutcome(thumbnail=thumb, source_width=width, source_height=height)


def _encode(img: Image.Image, fmt: ThumbnailFormat) -> Thumbnail:
    out = io.BytesIO()
    if fmt == "webp":
        img = img.convert("RGBA" if _has_alpha(img) else "RGB")
        img.save(out, "WEBP", quality=75, method=4)
        content_type = "image/webp"
    else:
        if _has_alpha(img):  # JPEG has no alpha: flatten onto white, not black
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            img = flat
        else:
            img = img.convert("RGB")
        img.save(out, "JPEG", quality=80, optimize=True, progressive=True)
        content_type = "image/jpeg"
    return Thumbnail(
        data=out.getvalue(), content_type=content_type, width=img.width, height=img.height
    )


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _video_thumbnail(
    path: Path, content_type: str, max_side: int, fmt: ThumbnailFormat, timeout: float
) -> ThumbnailOutcome:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return ThumbnailOutcome(skipped=FFMPEG_NOT_INSTALLED)
    demuxer = VIDEO_DEMUXERS.get(content_type)
    if demuxer is None:
        return ThumbnailOutcome(skipped=f"no thumbnails for {content_type}")
    scale = f"scale={max_side}:{max_side}:force_original_aspect_ratio=decrease"
    command = [
        ffmpeg,
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-f",
        demuxer,
        "-i",
        str(path),
        "-frames:v",
        "1",
        "-vf",
        scale,
        "-f",
        "image2pipe",
        "-c:v",
        "png",
        "pipe:1",
    ]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ThumbnailOutcome(failed=f"ffmpeg timed out after {timeout:g} s")
    except OSError as exc:
        log.warning("ffmpeg could not run: %s", exc)
        return ThumbnailOutcome(failed="ffmpeg could not run")
    if done.returncode != 0 or not done.stdout:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[-1] if detail else f"exit status {done.returncode}"
        reason = reason.replace(str(path), "input")  # chat members must not see server paths
        return ThumbnailOutcome(failed=f"ffmpeg failed: {reason}"[:200])
    # The frame is at most max_side square already; re-encode it in the thumbnail format.
    frame = _image_thumbnail(io.BytesIO(done.stdout), max_side, fmt, max_side * max_side * 4)
    return ThumbnailOutcome(thumbnail=frame.thumbnail, failed=frame.failed)


async def thumbnail_blob(
    blobs: BlobStore,
    key: str,
    content_type: str,
    *,
    size: int,
    encrypted: bool = False,
    max_source_bytes: int = 64 * 1024 * 1024,
    work_dir: Path | None = None,
    max_side: int = 320,
    fmt: ThumbnailFormat = "jpeg",
    max_pixels: int = 50_000_000,
) -> ThumbnailOutcome:
    """Make the thumbnail of the verified blob at `key` and store it at `thumbnail_key(key)`.
    The blob is streamed to a temporary file (never held in memory) and decoded in a worker
    thread. Never raises: storage failures are reported like decoding failures."""
    if encrypted:
        return ThumbnailOutcome(skipped="encrypted")
    base = content_type.split(";", 1)[0].strip().lower()
    if not base.startswith(("image/", "video/")):
        return ThumbnailOutcome(skipped="not an image or video")
    if size > max_source_bytes:
        return ThumbnailOutcome(skipped=f"larger than {max_source_bytes} bytes")
    try:
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="pigeon-thumb-") as tmp:
            source = Path(tmp) / "source"
            await _download(blobs, key, source, max_source_bytes)
            outcome = await asyncio.to_thread(
                make_thumbnail,
                source,
                content_type,
                max_side=max_side,
                fmt=fmt,
                max_pixels=max_pixels,
            )
        if outcome.thumbnail is None:
            return outcome
        thumb = thumbnail_key(key)
        await blobs.put(thumb, outcome.thumbnail.data, outcome.thumbnail.content_type)
    except (PigeonError, OSError) as exc:
        log.warning("thumbnail of blob %s failed: %s", key, exc)
        # Our own errors are worded for clients; an OSError's text names server paths.
        detail = str(exc) if isinstance(exc, PigeonError) else "storage error"
        return ThumbnailOutcome(failed=f"{type(exc).__name__}: {detail}"[:200])
    return ThumbnailOutcome(
        thumbnail=outcome.thumbnail,
        key=thumb,
        source_width=outcome.source_width,
        source_height=outcome.source_height,
    )


async def _download(blobs: BlobStore, key: str, target: Path, limit: int) -> None:
    f = await asyncio.to_thread(target.open, "xb")
    try:
        written = 0
        async with contextlib.aclosing(blobs.read(key)) as chunks:
            async for chunk in chunks:
                written += len(chunk)
                if written > limit:
                    raise OSError(f"blob is larger than {limit} bytes")
                await asyncio.to_thread(f.write, chunk)
    finally:
        await asyncio.to_thread(f.close)
