"""Thumbnails: Pillow for images, ffmpeg for videos when installed, and a reason instead of an
exception whenever no thumbnail can be made (the upload must never suffer from it)."""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image

from pigeon.adapters.blobs.local import LocalBlobStore
from pigeon.domain.errors import Unavailable
from pigeon.domain.ids import new_id
from pigeon.domain.media import BlobInfo, thumbnail_key
from pigeon.services.clock import SystemClock
from pigeon.services.thumbnails import FFMPEG_NOT_INSTALLED, make_thumbnail, thumbnail_blob


def _png(path: Path, size: tuple[int, int], mode: str = "RGBA") -> Path:
    img = Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (10, 200, 10))
    img.save(path, "PNG")
    return path


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_png_becomes_a_bounded_jpeg(tmp_path: Path) -> None:
    out = make_thumbnail(_png(tmp_path / "a.png", (1200, 800)), "image/png", max_side=320)
    assert out.thumbnail is not None and out.failed is None and out.skipped is None
    img = _decoded(out.thumbnail.data)
    assert img.format == "JPEG" and img.mode == "RGB"
    assert img.size == (320, 213) == (out.thumbnail.width, out.thumbnail.height)
    assert out.thumbnail.content_type == "image/jpeg"
    assert (out.source_width, out.source_height) == (1200, 800)
    assert img.getpixel((10, 10))[0] > 200  # transparency flattened onto white, not black
    meta = out.metadata()
    assert meta["thumbnail"]["width"] == 320 and (meta["width"], meta["height"]) == (1200, 800)


def test_webp_output_and_small_images_are_not_enlarged(tmp_path: Path) -> None:
    path = _png(tmp_path / "small.png", (100, 40), "RGB")
    out = make_thumbnail(path, "image/png", max_side=320, fmt="webp")
    assert out.thumbnail is not None
    img = _decoded(out.thumbnail.data)
    assert (img.format, img.size, out.thumbnail.content_type) == ("WEBP", (100, 40), "image/webp")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (400, 200), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif)
    out = make_thumbnail(path, "image/jpeg", max_side=100)
    assert out.thumbnail is not None
    assert (out.thumbnail.width, out.thumbnail.height) == (50, 100)
    assert (out.source_width, out.source_height) == (200, 400)


@pytest.mark.parametrize(
    "content",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, None],
    ids=["empty", "text", "bad-png", "truncated-jpeg"],
)
def test_corrupt_images_give_a_reason(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "corrupt"
    if content is None:
        buf = io.BytesIO()
        Image.new("RGB", (500, 500), (1, 2, 3)).save(buf, "JPEG")
        content = buf.getvalue()[:300]
    path.write_bytes(content)
    out = make_thumbnail(path, "image/jpeg")
    assert out.thumbnail is None and out.failed
    assert out.metadata()["thumbnail"] is None and out.metadata()["thumbnail_failed"]


def test_pixel_limit_refuses_decompression_bombs(tmp_path: Path) -> None:
    path = _png(tmp_path / "big.png", (300, 300), "RGB")
    out = make_thumbnail(path, "image/png", max_pixels=200 * 200)
    assert out.thumbnail is None and out.failed is not None and "too large" in out.failed


def test_other_types_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(b"%PDF-1.7")
    out = make_thumbnail(path, "application/pdf")
    assert out.thumbnail is None and out.skipped == "not an image or video"


def test_video_without_ffmpeg_is_skipped_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    out = make_thumbnail(path, "video/mp4")
    assert out.metadata() == {"thumbnail": None, "thumbnail_skipped": FFMPEG_NOT_INSTALLED}


def _fake_ffmpeg(bin_dir: Path, script: str) -> Path:
    """An `ffmpeg` on PATH that runs `script` (Python) with the real arguments."""
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "ffmpeg"
    exe.write_text(f"#!{sys.executable}\nimport sys\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_video_first_frame_through_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = io.BytesIO()
    Image.new("RGB", (320, 180), (0, 128, 255)).save(frame, "PNG")
    (tmp_path / "frame.png").write_bytes(frame.getvalue())
    _fake_ffmpeg(
        tmp_path / "bin",
        f"open({str(tmp_path / 'args')!r}, 'w').write(repr(sys.argv[1:]))\n"
        f"sys.stdout.buffer.write(open({str(tmp_path / 'frame.png')!r}, 'rb').read())",
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    video = tmp_path / "clip.webm"
    video.write_bytes(b"\x1aE\xdf\xa3 webm")
    out = make_thumbnail(video, "video/webm", max_side=320)
    assert out.thumbnail is not None and out.failed is None
    assert _decoded(out.thumbnail.data).size == (320, 180)
    args = (tmp_path / "args").read_text()
    # the demuxer is forced from the declared type and only local files may be opened
    assert "'-f', 'matroska', '-i', " in args and "'-protocol_whitelist', 'file'" in args


def test_ffmpeg_failure_gives_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_ffmpeg(tmp_path / "bin", "sys.stderr.write('moov atom not found\\n'); sys.exit(1)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"garbage")
    out = make_thumbnail(video, "video/mp4")
    assert out.thumbnail is None and out.failed == "ffmpeg failed: moov atom not found"
    unknown = make_thumbnail(video, "video/x-flv")
    assert unknown.skipped == "no thumbnails for video/x-flv"


def _work_files(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.startswith("pigeon-thumb")]


async def test_thumbnail_blob_stores_the_thumbnail_next_to_the_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs", b"s" * 32, clock=SystemClock())
    await store.open()
    buf = io.BytesIO()
    Image.new("RGB", (1000, 1000), (5, 5, 5)).save(buf, "PNG")
    key = new_id()
    await store.put(key, buf.getvalue(), "image/png")
    out = await thumbnail_blob(store, key, "image/png", size=len(buf.getvalue()), work_dir=tmp_path)
    assert out.key == thumbnail_key(key) and out.thumbnail is not None
    stat = await store.stat(thumbnail_key(key))
    assert stat is not None and stat.content_type == "image/jpeg"
    assert stat.size == len(out.thumbnail.data)
    assert out.metadata()["thumbnail"]["key"] == thumbnail_key(key)
    assert _work_files(tmp_path) == []  # the temporary copy is gone

    encrypted = await thumbnail_blob(store, key, "image/png", size=10, encrypted=True)
    assert encrypted.skipped == "encrypted"
    too_big = await thumbnail_blob(store, key, "image/png", size=10**9)
    assert too_big.skipped is not None and too_big.thumbnail is None


async def test_thumbnail_failures_never_lose_the_upload(tmp_path: Path) -> None:
    class FailingPut(LocalBlobStore):
        async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
            raise Unavailable("disk full")

    store = FailingPut(tmp_path / "blobs", b"s" * 32, clock=SystemClock())
    await store.open()
    key = new_id()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    await LocalBlobStore.put(store, key, buf.getvalue(), "image/png")
    out = await thumbnail_blob(store, key, "image/png", size=len(buf.getvalue()))
    assert out.thumbnail is None and out.failed is not None and "disk full" in out.failed
    missing = await thumbnail_blob(store, new_id(), "image/png", size=10)
    assert missing.failed is not None and "NotFound" in missing.failed
    assert await store.stat(key) is not None  # the upload itself is untouched
    corrupt = new_id()
    await LocalBlobStore.put(store, corrupt, os.urandom(100), "image/png")
    out = await thumbnail_blob(store, corrupt, "image/png", size=100)
    assert out.failed is not None and await store.stat(corrupt) is not None
