"""Blobs as files under a directory, served by pigeon's own HTTP (`pigeon.gateway.blobs`).

The embedded default: nothing else to run. Its URLs point at `/v1/blobs/{key}` and carry an
HMAC-SHA256 signature over a canonical encoding of what they allow (method, key, expiry, and for
an upload its size, SHA-256 and content type), so the endpoint checks a request, and verifies
the uploaded bytes, without the database. An upload is streamed to a temporary file while it is
hashed and renamed into place only if size and digest match: a mismatch keeps nothing.

Layout under `root`:
    objects/<xy>/<key>        the bytes (`xy`: the ULID's last two characters, which are random)
    objects/<xy>/<key>.meta   {size, sha256, content_type, stored_at}; written last, removed
                              first, so it is the commit point: no meta, no blob
    partial/<random>.part     uploads in progress (and leftovers of a crash, swept later)

Disk I/O and hashing run in worker threads, about 1 MiB at a time, with one write in flight
while the next megabyte arrives: the event loop never waits on the disk, memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

import msgspec

from pigeon.domain.errors import (
    ChecksumMismatch,
    NotFound,
    SignatureInvalid,
    SizeMismatch,
    UrlExpired,
)
from pigeon.domain.media import (
    BlobInfo,
    DownloadGrant,
    UploadGrant,
    UploadTicket,
    check_content_type,
    check_key,
    check_sha256,
    check_size,
)
from pigeon.ports import BlobEndpoint, BlobStore, Clock

log = logging.getLogger(__name__)

_SCHEME = "pigeon-blob/1"  # bumped if the signed encoding ever changes
_MIB = 1024 * 1024


class _Meta(msgspec.Struct, frozen=True):
    size: int
    sha256: str
    content_type: str
    stored_at: int


class LocalBlobStore:
    """Files under `root`, URLs signed with `secret` (at least 32 random bytes, the same on every
    process serving the directory). `base_url` is how clients reach pigeon (e.g.
    `https://chat.example.com`); None gives root-relative URLs (`/v1/blobs/...`) that clients
    resolve against the server they talk to. `cdn_cacheable` lets shared caches keep downloads
    (`public`); by default only the client's own cache may (`private`)."""

    def __init__(
        self,
        root: Path,
        secret: bytes,
        base_url: str | None = None,
        *,
        clock: Clock,
        cdn_cacheable: bool = False,
        fsync: bool = True,
        write_buffer: int = _MIB,
        read_chunk: int = 256 * 1024,
        partial_ttl_ms: int = 3600_000,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("the blob URL secret must be at least 32 bytes")
        self.root = root
        self._objects = root / "objects"
        self._partial = root / "partial"
        self._secret = secret
        self._base = (base_url or "").rstrip("/")
        self._clock = clock
        self.cdn_cacheable = cdn_cacheable
        self._fsync = fsync
        self._write_buffer = write_buffer
        self._read_chunk = read_chunk
        self._partial_ttl_ms = partial_ttl_ms

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        self._objects.mkdir(parents=True, exist_ok=True)
        self._partial.mkdir(parents=True, exist_ok=True)

    async def aclose(self) -> None:
        return None  # no handle is held between calls

    # -- signing --------------------------------------------------------------------------------

    def _sign(self, *fields: str | int | None) -> str:
        # JSON of a list is an unambiguous encoding: no field can bleed into the next.
        message = msgspec.json.encode([_SCHEME, *fields])
        mac = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _url(self, key: str, params: dict[str, str]) -> str:
        return f"{self._base}/v1/blobs/{key}?{urlencode(params)}"

    def _check_expiry(self, expires_at: int) -> None:
        if expires_at <= self._clock.now_ms():
            raise ValueError("expires_at must be in the future")

    async def upload_url(
        self, key: str, *, size: int, sha256: str, content_type: str, expires_at: int
    ) -> UploadTicket:
        check_key(key)
        check_size(size)
        check_sha256(sha256)
        check_content_type(content_type)
        self._check_expiry(expires_at)
        sig = self._sign("PUT", key, expires_at, size, sha256, content_type)
        params = {
            "exp": str(expires_at),
            "size": str(size),
            "sha256": sha256,
            "ct": content_type,
            "sig": sig,
        }
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        return UploadTicket(url=self._url(key, params), headers=headers, expires_at=expires_at)

    async def download_url(self, key: str, *, expires_at: int, filename: str | None = None) -> str:
        check_key(key)
        self._check_expiry(expires_at)
        params = {"exp": str(expires_at)}
        if filename:
            params["fn"] = filename
        params["sig"] = self._sign("GET", key, expires_at, filename or None)
        return self._url(key, params)

    # -- BlobEndpoint: what pigeon's HTTP asks ---------------------------------------------------

    def _verify(self, params: Mapping[str, str], *fields: str | int | None) -> None:
        given = params.get("sig", "")
        if not hmac.compare_digest(given.encode(), self._sign(*fields).encode()):
            raise SignatureInvalid("the URL signature does not match this request")

    def _seconds_left(self, expires_at: int) -> int:
        left_ms = expires_at - self._clock.now_ms()
        if left_ms <= 0:
            raise UrlExpired("this URL has expired")
        return left_ms // 1000

    def authorize_upload(self, key: str, params: Mapping[str, str]) -> UploadGrant:
        check_key(key)
        exp, size = _int(params, "exp"), _int(params, "size")
        sha256, content_type = params.get("sha256", ""), params.get("ct", "")
        self._verify(params, "PUT", key, exp, size, sha256, content_type)
        self._seconds_left(exp)
        return UploadGrant(
            key=key, size=size, sha256=sha256, content_type=content_type, expires_at=exp
        )

    def authorize_download(self, key: str, params: Mapping[str, str]) -> DownloadGrant:
        check_key(key)
        exp = _int(params, "exp")
        filename = params.get("fn") or None
        self._verify(params, "GET", key, exp, filename)
        left = self._seconds_left(exp)
        return DownloadGrant(
            key=key,
            expires_at=exp,
            seconds_left=left,
            filename=filename,
            shared_cache=self.cdn_cacheable,
        )

    async def receive(self, grant: UploadGrant, chunks: AsyncIterable[bytes]) -> BlobInfo:
        check_key(grant.key)
        part = self._partial / f"{secrets.token_hex(16)}.part"
        digest = hashlib.sha256()
        f = await asyncio.to_thread(_create, part)
        pending: asyncio.Future[None] | None = None
        try:
            received, buf = 0, bytearray()
            async for chunk in chunks:
                received += len(chunk)
                if received > grant.size:
                    raise SizeMismatch(f"more than the declared {grant.size} bytes")
                buf += chunk
                if len(buf) >= self._write_buffer:
                    if pending is not None:
                        await pending  # at most one write in flight: memory stays bounded
                    pending = asyncio.ensure_future(asyncio.to_thread(_write, f, digest, buf))
                    buf = bytearray()
            if pending is not None:
                await pending
                pending = None
            if buf:
                await asyncio.to_thread(_write, f, digest, buf)
            if received != grant.size:
                raise SizeMismatch(f"{received} bytes received, {grant.size} declared")
            if not hmac.compare_digest(digest.hexdigest(), grant.sha256):
                raise ChecksumMismatch("the bytes do not have the declared sha256")
            meta = _Meta(grant.size, grant.sha256, grant.content_type, self._clock.now_ms())
            await asyncio.to_thread(self._commit, f, part, grant.key, meta)
        except BaseException:
            if pending is not None:  # let the thread finish with the file before removing it
                with contextlib.suppress(BaseException):
                    await asyncio.shield(pending)
            await asyncio.shield(asyncio.to_thread(_discard, f, part))
            raise
        return BlobInfo(
            key=grant.key, size=grant.size, content_type=grant.content_type, sha256=grant.sha256
        )

    def _commit(self, f: BinaryIO, part: Path, key: str, meta: _Meta) -> None:
        """Make the finished upload the blob at `key`: bytes first, then the meta (the commit
        point). Each is renamed into place, so a reader sees all of a blob or nothing."""
        if self._fsync:
            f.flush()
            os.fsync(f.fileno())
        f.close()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_part = part.with_suffix(".meta")
        with meta_part.open("xb") as m:
            m.write(msgspec.json.encode(meta))
            if self._fsync:
                m.flush()
                os.fsync(m.fileno())
        os.replace(part, path)
        os.replace(meta_part, _meta_path(path))
        if self._fsync:
            _fsync_dir(path.parent)

    async def locate(self, key: str) -> tuple[Path, BlobInfo] | None:
        check_key(key)
        path = self._path(key)
        info = await asyncio.to_thread(_load, path, key)
        return None if info is None else (path, info)

    # -- BlobStore ------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self._objects / key[24:26] / key

    async def verify(self, key: str, *, size: int, sha256: str) -> BlobInfo:
        check_sha256(sha256)
        info = await self.stat(key)
        if info is None:
            raise NotFound("no blob was uploaded under this key")
        if info.size != size or info.sha256 != sha256:
            # Cannot happen through a URL signed for (size, sha256); a caller verifying against
            # other values than it signed gets the contract's answer all the same.
            await self.delete([key])
            raise SizeMismatch() if info.size != size else ChecksumMismatch()
        return info

    async def stat(self, key: str) -> BlobInfo | None:
        check_key(key)
        return await asyncio.to_thread(_load, self._path(key), key)

    async def read(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        check_key(key)
        path = self._path(key)
        if await asyncio.to_thread(_load, path, key) is None:
            raise NotFound("no such blob")
        try:
            f: BinaryIO = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise NotFound("no such blob") from None
        try:
            await asyncio.to_thread(f.seek, start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                n = self._read_chunk if left is None else min(self._read_chunk, left)
                chunk = await asyncio.to_thread(f.read, n)
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        check_key(key)
        check_content_type(content_type)
        grant = UploadGrant(
            key=key,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            content_type=content_type,
            expires_at=0,
        )
        return await self.receive(grant, _once(data))

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            check_key(key)
        if keys:
            await asyncio.to_thread(self._delete_sync, [self._path(k) for k in keys])

    @staticmethod
    def _delete_sync(paths: list[Path]) -> None:
        for path in paths:
            _meta_path(path).unlink(missing_ok=True)  # the commit point goes first
            path.unlink(missing_ok=True)

    async def sweep(self, before: int) -> int:
        return await asyncio.to_thread(self._sweep_sync, before)

    def _sweep_sync(self, before: int) -> int:
        removed = 0
        partial_before = time.time() - self._partial_ttl_ms / 1000
        for part in self._partial.glob("*"):
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_mtime < partial_before:
                    part.unlink()
        for shard in self._objects.glob("*"):
            for path in shard.glob("*"):
                if path.suffix == ".meta":
                    continue
                meta = _read_meta(path)
                if meta is None:  # bytes of a commit that never finished
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < partial_before:
                            path.unlink()
                elif meta.stored_at < before:
                    self._delete_sync([path])
                    removed += 1
        return removed


def _int(params: Mapping[str, str], name: str) -> int:
    value = params.get(name, "")
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise SignatureInvalid(f"missing or malformed '{name}' in a signed URL")
    return int(value)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta")


def _read_meta(path: Path) -> _Meta | None:
    try:
        raw = _meta_path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(raw, type=_Meta)
    except msgspec.DecodeError:
        log.warning("unreadable blob metadata %s", _meta_path(path))
        return None


def _load(path: Path, key: str) -> BlobInfo | None:
    meta = _read_meta(path)
    if meta is None:
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    return BlobInfo(key=key, size=size, content_type=meta.content_type, sha256=meta.sha256)


def _write(f: BinaryIO, digest: Any, data: bytearray) -> None:
    digest.update(data)  # hashlib releases the GIL on large buffers: real parallelism
    f.write(data)


def _create(part: Path) -> BinaryIO:
    part.parent.mkdir(parents=True, exist_ok=True)
    return part.open("xb")


def _discard(f: BinaryIO, part: Path) -> None:
    f.close()
    part.unlink(missing_ok=True)
    part.with_suffix(".meta").unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


_check: type[BlobStore] = LocalBlobStore
_check_endpoint: type[BlobEndpoint] = LocalBlobStore
