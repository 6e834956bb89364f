"""Encrypted attachments: a file is encrypted on this device before upload, decrypted after
download, and the server stores and serves ciphertext only.

Why it exists: a message's `e2e` envelope is limited in size, so a file travels as a blob and
its *key* travels inside the encrypted message (`AttachmentKey`). The scheme is the one the
issue names: AES-256-CTR under a random per-file key and IV, and a SHA-256 of the ciphertext
that the receiver checks (CTR alone does not detect tampering; the hash, which arrives inside
an authenticated Megolm message, does).

Everything streams in `CHUNK`-sized pieces: memory stays bounded whatever the file's size.
The functions block: call them in a thread (`asyncio.to_thread`) from the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import secrets
from pathlib import Path
from typing import BinaryIO

import msgspec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pigeon.client.e2e.errors import AttachmentCorrupt
from pigeon.client.e2e.keys import b64decode, b64encode

CHUNK = 1024 * 1024
ATTACHMENT_ALGORITHM = "pigeon.aes-256-ctr.v1"


class AttachmentKey(msgspec.Struct, frozen=True, kw_only=True):
    """What a receiver needs to read an encrypted file, sent inside the encrypted message: the
    AES-256 key, the 16-byte initial counter block, and the ciphertext's SHA-256 (base64)."""

    algorithm: str = ATTACHMENT_ALGORITHM
    key: str
    iv: str
    sha256: str
    #: Ciphertext (= plaintext) size in bytes.
    size: int


def _cipher(key: bytes, iv: bytes) -> Cipher[modes.CTR]:
    return Cipher(algorithms.AES256(key), modes.CTR(iv))


def encrypt_stream(src: BinaryIO, dst: BinaryIO) -> AttachmentKey:
    """Encrypt `src` into `dst` under a fresh key and IV; returns them with the hash."""
    key, iv = secrets.token_bytes(32), secrets.token_bytes(16)
    encryptor = _cipher(key, iv).encryptor()
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        out = encryptor.update(chunk)
        digest.update(out)
        dst.write(out)
        size += len(out)
    tail = encryptor.finalize()  # CTR keeps nothing back; kept for the API's contract
    digest.update(tail)
    dst.write(tail)
    return AttachmentKey(
        key=b64encode(key), iv=b64encode(iv), sha256=b64encode(digest.digest()), size=size
    )


def _material(key: AttachmentKey) -> tuple[bytes, bytes, bytes]:
    if key.algorithm != ATTACHMENT_ALGORITHM:
        raise AttachmentCorrupt(f"unknown attachment algorithm {key.algorithm!r}")
    try:
        raw, iv, expected = b64decode(key.key), b64decode(key.iv), b64decode(key.sha256)
    except ValueError as exc:
        raise AttachmentCorrupt(f"malformed attachment key: {exc}") from None
    if len(raw) != 32 or len(iv) != 16 or len(expected) != 32:
        raise AttachmentCorrupt("malformed attachment key: wrong sizes")
    return raw, iv, expected


def _check(digest: bytes, expected: bytes, size: int, key: AttachmentKey) -> None:
    if size != key.size or not hmac.compare_digest(digest, expected):
        raise AttachmentCorrupt()


def verify_stream(src: BinaryIO, key: AttachmentKey) -> None:
    """Check the ciphertext in `src` against the key's hash and size (`AttachmentCorrupt`)."""
    _, _, expected = _material(key)
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    _check(digest.digest(), expected, size, key)


def decrypt_stream(src: BinaryIO, dst: BinaryIO, key: AttachmentKey) -> None:
    """Decrypt `src` into `dst`, checking the hash. If `src` is seekable it is checked first,
    so nothing is written unless it matches; otherwise the check comes at the end and the
    caller must discard `dst` on `AttachmentCorrupt` (`decrypt_file` does)."""
    raw, iv, expected = _material(key)
    if src.seekable():
        start = src.tell()
        verify_stream(src, key)
        src.seek(start)
    decryptor = _cipher(raw, iv).decryptor()
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        dst.write(decryptor.update(chunk))
    dst.write(decryptor.finalize())
    _check(digest.digest(), expected, size, key)


def encrypt_file(src: Path, dst: Path) -> AttachmentKey:
    """Encrypt the file `src` into `dst` (created or replaced)."""
    with src.open("rb") as plain, dst.open("wb") as sealed:
        return encrypt_stream(plain, sealed)


def decrypt_file(src: Path, dst: Path, key: AttachmentKey) -> None:
    """Decrypt the downloaded file `src` into `dst`. `dst` appears only if the hash matched:
    the plaintext is written to a temporary file beside it and renamed into place."""
    partial = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.partial")
    try:
        with src.open("rb") as sealed, partial.open("wb") as plain:
            decrypt_stream(sealed, plain, key)
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)


def encrypt_bytes(data: bytes) -> tuple[bytes, AttachmentKey]:
    """Small files (a thumbnail): the ciphertext and its key."""
    sealed = io.BytesIO()
    key = encrypt_stream(io.BytesIO(data), sealed)
    return sealed.getvalue(), key


def decrypt_bytes(sealed: bytes, key: AttachmentKey) -> bytes:
    """The plaintext of a small encrypted file, after its hash is checked."""
    raw, iv, expected = _material(key)
    _check(hashlib.sha256(sealed).digest(), expected, len(sealed), key)
    decryptor = _cipher(raw, iv).decryptor()
    return decryptor.update(sealed) + decryptor.finalize()
