"""Encrypted attachments (pigeon.client.e2e.attachments): AES-256-CTR under a per-file key,
the ciphertext's SHA-256 checked on the way back; streamed with bounded memory."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import msgspec
import pytest

from pigeon.client.e2e import (
    AttachmentCorrupt,
    AttachmentKey,
    decrypt_bytes,
    decrypt_file,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
)
from pigeon.client.e2e.attachments import CHUNK

SIZE = 5 * 1024 * 1024 + 123


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "video.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_a_5_mb_file_round_trips_and_the_ciphertext_differs(plain: Path, tmp_path: Path) -> None:
    sealed, out = tmp_path / "sealed", tmp_path / "out"
    key = encrypt_file(plain, sealed)
    assert key.size == SIZE == sealed.stat().st_size
    assert sealed.read_bytes()[:4096] != plain.read_bytes()[:4096]
    wire = msgspec.json.decode(msgspec.json.encode(key), type=AttachmentKey)  # in the message
    decrypt_file(sealed, out, wire)
    assert out.read_bytes() == plain.read_bytes()
    other = encrypt_file(plain, tmp_path / "again")  # a fresh key and IV per file
    assert (other.key, other.iv) != (key.key, key.iv)


def test_a_flipped_byte_is_refused_and_nothing_is_written(plain: Path, tmp_path: Path) -> None:
    sealed, out = tmp_path / "sealed", tmp_path / "out"
    key = encrypt_file(plain, sealed)
    with sealed.open("r+b") as f:
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(AttachmentCorrupt) as caught:
        decrypt_file(sealed, out, key)
    assert caught.value.code == "e2e_attachment_corrupt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sealed", "video.bin"]


def test_a_truncated_file_or_a_wrong_key_is_refused(plain: Path, tmp_path: Path) -> None:
    sealed = tmp_path / "sealed"
    key = encrypt_file(plain, sealed)
    data = sealed.read_bytes()
    with pytest.raises(AttachmentCorrupt):
        decrypt_bytes(data[:-1], key)
    with pytest.raises(AttachmentCorrupt):
        decrypt_bytes(data, msgspec.structs.replace(key, sha256="AAAA"))
    with pytest.raises(AttachmentCorrupt):
        decrypt_bytes(data, msgspec.structs.replace(key, algorithm="rot13"))


class _Pipe(io.RawIOBase):
    """A stream that cannot seek (a download in progress)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_small_files_and_unseekable_streams(tmp_path: Path) -> None:
    sealed, key = encrypt_bytes(b"a thumbnail")
    assert sealed != b"a thumbnail"
    assert decrypt_bytes(sealed, key) == b"a thumbnail"
    out = io.BytesIO()
    decrypt_stream(io.BufferedReader(_Pipe(sealed)), out, key)
    assert out.getvalue() == b"a thumbnail"
    bad = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(AttachmentCorrupt):  # checked at the end: the caller discards `out`
        decrypt_stream(io.BufferedReader(_Pipe(bad)), io.BytesIO(), key)


def test_memory_stays_bounded(plain: Path, tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        key = encrypt_file(plain, tmp_path / "sealed")
        decrypt_file(tmp_path / "sealed", tmp_path / "out", key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CHUNK < SIZE
