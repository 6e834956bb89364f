"""Files in and out of blob storage for the SDK: hash, upload and download, streamed.

The WebSocket carries only the small control commands (`create_attachment`,
`attachment_uploaded`, `attachment_url`); the bytes go straight between this process and the
signed URL, in chunks, so a 100 MiB video never sits in memory on either side.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import ssl as tls
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
from yarl import URL

from pigeon.client.endpoint import tls_errors

CHUNK = 1024 * 1024

#: Told how a transfer is going after every chunk: (bytes so far, total bytes or None when the
#: total is unknown). Called on the event loop: it must be quick and must not block (e.g. update
#: a progress bar).
Progress = Callable[[int, int | None], None]


def describe(path: Path, content_type: str | None = None) -> tuple[int, str, str]:
    """(size, sha256 hex, content type) of a file, read once in chunks (blocking: use a thread)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    guessed = mimetypes.guess_type(path.name)[0]
    return size, digest.hexdigest(), content_type or guessed or "application/octet-stream"


async def _chunks(
    path: Path, progress: Progress | None = None, total: int | None = None
) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(path.open, "rb")
    done = 0
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    finally:
        await asyncio.to_thread(f.close)


def resolve(base: str, url: str) -> URL:
    """A signed URL as given (never re-encoded: that would break its signature), made absolute
    against the server's URL when it is relative (pigeon's own blob endpoint)."""
    return URL(urljoin(base, url), encoded=True)


async def upload(
    base: str,
    ticket: dict[str, Any],
    path: Path,
    *,
    progress: Progress | None = None,
    ssl: tls.SSLContext | bool = True,
) -> None:
    """PUT the file to a signed upload URL with exactly the signed headers. `progress` is told
    how many bytes were handed to the connection so far; `ssl` as `Endpoint.ssl`."""
    total = (await asyncio.to_thread(path.stat)).st_size if progress is not None else None
    with tls_errors():
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                ticket["method"],
                resolve(base, ticket["url"]),
                data=_chunks(path, progress, total),
                headers=ticket["headers"],
                ssl=ssl,
            ) as resp,
        ):
            if resp.status >= 300:
                raise UploadFailed(resp.status, await resp.text())


async def download(
    base: str,
    url: str,
    target: Path,
    sha256: str | None = None,
    *,
    progress: Progress | None = None,
    ssl: tls.SSLContext | bool = True,
) -> int:
    """GET a signed download URL into `target`; returns the bytes written. With `sha256`, the
    bytes are checked against it. The file is written aside and renamed into place only when
    complete (and correct): on any failure `target` is left as it was. `progress` is told the
    bytes written so far and the response's Content-Length; `ssl` as `Endpoint.ssl`."""
    written, digest = 0, hashlib.sha256()
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    f = await asyncio.to_thread(part.open, "wb")
    try:
        with tls_errors():
            async with (
                aiohttp.ClientSession() as http,
                http.get(resolve(base, url), ssl=ssl) as resp,
            ):
                if resp.status != 200:
                    raise UploadFailed(resp.status, await resp.text())
                async for chunk in resp.content.iter_chunked(CHUNK):
                    digest.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
                    written += len(chunk)
                    if progress is not None:
                        progress(written, resp.content_length)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise UploadFailed(200, "checksum_mismatch: the downloaded bytes are not the ones sent")
        await asyncio.to_thread(f.close)
        await asyncio.to_thread(os.replace, part, target)
    except BaseException:
        await asyncio.to_thread(f.close)
        await asyncio.to_thread(part.unlink, True)
        raise
    return written


class UploadFailed(Exception):
    """Blob storage refused a transfer, or it went wrong (the body says why, e.g.
    `checksum_mismatch`)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body
