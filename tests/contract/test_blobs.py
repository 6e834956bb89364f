"""The BlobStore contract (see `pigeon.ports.BlobStore`), run against every adapter with a real
HTTP client doing what a client app does: upload to the pre-signed URL, download from one.

- `local`: the blob routes served by a real aiohttp server on loopback (a tiny application with
  only `add_blob_routes`), files under the test's temporary directory.
- `s3`: moto in server mode, behind `SigV4Gate` which refuses pre-signed URLs exactly where S3
  would (see tests/support/s3.py for why moto needs it).

Refusals are checked by their HTTP status (both engines answer 403 for a bad or expired
signature); the local endpoint's JSON codes are checked where it is the one answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
from aiobotocore.session import get_session
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from pigeon.adapters.blobs.local import LocalBlobStore
from pigeon.adapters.blobs.s3 import S3BlobStore
from pigeon.adapters.secret_files import load_or_create_secret
from pigeon.domain.errors import BadRequest, ChecksumMismatch, NotFound, SizeMismatch
from pigeon.domain.ids import new_id
from pigeon.domain.media import BlobInfo, UploadGrant, thumbnail_key
from pigeon.gateway.blobs import add_blob_routes
from pigeon.ports import BlobStore
from pigeon.services.clock import SystemClock
from tests.support.s3 import MotoS3, SigV4Gate, moto_s3  # noqa: F401  (fixture)

ADAPTERS = ["local", "s3"]
SECRET = b"contract-test-secret-of-32-bytes!!"
MINUTE_MS = 60_000


class SkewedClock:
    """Wall-clock time plus an offset tests move (for URL expiry without waiting)."""

    def __init__(self) -> None:
        self.skew_ms = 0

    def now_ms(self) -> int:
        return _wall_ms() + self.skew_ms


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Harness:
    """One open adapter, an HTTP client, and a way to move the clock of whoever checks URLs."""

    kind: str
    store: BlobStore
    http: aiohttp.ClientSession
    set_skew: Callable[[float], None]
    root: Path | None = None  # local only
    base: str = ""  # local only: where the endpoint listens


@contextlib.asynccontextmanager
async def _local(tmp_path: Path, *, base_url: bool = True, **kw: Any) -> AsyncIterator[Harness]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    clock = SkewedClock()
    root = tmp_path / "blobs"
    store = LocalBlobStore(
        root, SECRET, f"http://127.0.0.1:{port}" if base_url else None, clock=clock, **kw
    )
    await store.open()
    app = web.Application()
    add_blob_routes(app, store)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()

    def set_skew(seconds: float) -> None:
        clock.skew_ms = int(seconds * 1000)

    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
            yield Harness("local", store, http, set_skew, root, f"http://127.0.0.1:{port}")
    finally:
        await store.aclose()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _s3(moto: MotoS3, **kw: Any) -> AsyncIterator[Harness]:
    gate = SigV4Gate(moto.endpoint, moto.access_key, moto.secret_key)
    await gate.start()
    store = S3BlobStore(
        f"pigeon-{uuid.uuid4().hex[:16]}",
        clock=SystemClock(),
        endpoint_url=moto.endpoint,
        public_endpoint_url=gate.url,
        region=moto.region,
        access_key=moto.access_key,
        secret_key=moto.secret_key,
        retention_days=2,
        addressing_style="path",
        delete_batch=2,  # so that every delete of more than two keys goes in several batches
        **kw,
    )

    def set_skew(seconds: float) -> None:
        gate.skew = seconds

    try:
        await store.open()
        async with aiohttp.ClientSession() as http:
            yield Harness("s3", store, http, set_skew)
    finally:
        await store.aclose()
        await gate.aclose()


@pytest.fixture(params=ADAPTERS)
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """An open BlobStore of each adapter, with its URLs reachable over real HTTP."""
    if request.param == "local":
        factory = _local(tmp_path)
    else:
        factory = _s3(request.getfixturevalue("moto_s3"))
    async with factory as harness:
        yield harness


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Harness]:
    """The local adapter only: for what only pigeon's own endpoint does."""
    async with _local(tmp_path) as harness:
        yield harness


# -- helpers -----------------------------------------------------------------------------------


def _later(minutes: float = 15) -> int:
    return _wall_ms() + int(minutes * MINUTE_MS)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _put(
    h: Harness,
    key: str,
    data: bytes,
    *,
    content_type: str = "application/octet-stream",
    size: int | None = None,
    sha256: str | None = None,
    body: bytes | None = None,
) -> tuple[int, str]:
    """Ask for an upload URL for (size, sha256) — by default those of `data` — then PUT `body`
    (by default `data`) with the ticket's headers, Content-Length always that of the body."""
    ticket = await h.store.upload_url(
        key,
        size=len(data) if size is None else size,
        sha256=_sha(data) if sha256 is None else sha256,
        content_type=content_type,
        expires_at=_later(),
    )
    sent = data if body is None else body
    headers = {**ticket.headers, "Content-Length": str(len(sent))}
    async with h.http.put(URL(ticket.url, encoded=True), data=sent, headers=headers) as resp:
        return resp.status, await resp.text()


async def _upload(h: Harness, key: str, data: bytes, content_type: str = "image/png") -> None:
    status, text = await _put(h, key, data, content_type=content_type)
    assert status == 200, text
    await h.store.verify(key, size=len(data), sha256=_sha(data))


#: What a download URL of a missing blob answers: S3 says 403 rather than 404 to credentials
#: that may not list the bucket (and moto does whenever response headers are overridden).
_MISSING = {"local": {404}, "s3": {403, 404}}


async def _get(
    h: Harness, url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, CIMultiDict[str], bytes]:
    async with h.http.request(method, URL(url, encoded=True), headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def _read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


def _tamper(url: str, name: str) -> str:
    """`url` with query parameter `name` altered (its last character changed, or an extra
    digit for numbers)."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    out = []
    for k, v in pairs:
        if k == name:
            v = v + "1" if v.isdigit() else v[:-1] + ("A" if v[-1:] != "A" else "B")
        out.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(out)))


def _param_names(url: str) -> list[str]:
    return [k for k, _ in parse_qsl(urlsplit(url).query)]


async def _gone(h: Harness, key: str, size: int, sha256: str) -> None:
    """Nothing is kept under `key`, by every account of it."""
    assert await h.store.stat(key) is None
    with pytest.raises(NotFound):
        await h.store.verify(key, size=size, sha256=sha256)
    if h.root is not None:  # and no partial upload is left lying around
        assert list((h.root / "partial").iterdir()) == []


# -- the contract ------------------------------------------------------------------------------


async def test_upload_then_stat_download_and_ranges(blobs: Harness) -> None:
    key, data = new_id(), os.urandom(300_000)
    ticket = await blobs.store.upload_url(
        key, size=len(data), sha256=_sha(data), content_type="image/png", expires_at=_later()
    )
    assert ticket.method == "PUT" and ticket.headers["Content-Type"] == "image/png"
    async with blobs.http.put(
        URL(ticket.url, encoded=True), data=data, headers=ticket.headers
    ) as resp:
        assert resp.status == 200, await resp.text()

    info = await blobs.store.verify(key, size=len(data), sha256=_sha(data))
    assert (info.key, info.size, info.content_type) == (key, len(data), "image/png")
    stat = await blobs.store.stat(key)
    assert stat is not None and (stat.size, stat.content_type) == (len(data), "image/png")

    url = await blobs.store.download_url(key, expires_at=_later(10))
    status, headers, body = await _get(blobs, url)
    assert status == 200 and body == data
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Length"] == str(len(data))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers.get("ETag")
    cache = headers["Cache-Control"]
    max_age = int(cache.split("max-age=")[1].split(",")[0])
    assert "private" in cache and 540 <= max_age <= 600

    status, headers, body = await _get(blobs, url, {"Range": "bytes=10-19"})
    assert (status, body) == (206, data[10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert headers["Content-Length"] == "10"
    status, headers, body = await _get(blobs, url, {"Range": "bytes=-100"})
    assert (status, body) == (206, data[-100:])
    status, headers, body = await _get(blobs, url, {"Range": f"bytes={len(data) - 5}-"})
    assert (status, body) == (206, data[-5:])
    status, _, _ = await _get(blobs, url, {"Range": f"bytes={len(data)}-"})
    assert status == 416

    assert await _read_all(blobs.store, key) == data
    assert await _read_all(blobs.store, key, 1000, 5000) == data[1000:5000]
    assert await _read_all(blobs.store, key, 299_990) == data[299_990:]
    assert await _read_all(blobs.store, key, len(data) + 5) == b""


async def test_empty_blob(blobs: Harness) -> None:
    key = new_id()
    await _upload(blobs, key, b"", "text/plain")
    stat = await blobs.store.stat(key)
    assert stat is not None and stat.size == 0
    status, _, body = await _get(blobs, await blobs.store.download_url(key, expires_at=_later()))
    assert (status, body) == (200, b"")


async def test_download_as_named_attachment(blobs: Harness) -> None:
    key, data = new_id(), b"%PDF-1.7 not really"
    await _upload(blobs, key, data, "application/pdf")
    url = await blobs.store.download_url(key, expires_at=_later(), filename='résumé "v2".pdf')
    status, headers, body = await _get(blobs, url)
    assert (status, body) == (200, data)
    disposition = headers["Content-Disposition"]
    assert disposition.startswith("attachment; filename=")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22v2%22.pdf" in disposition


async def test_missing_blob_is_404(blobs: Harness) -> None:
    key = new_id()
    status, _, _ = await _get(blobs, await blobs.store.download_url(key, expires_at=_later()))
    assert status in _MISSING[blobs.kind]
    assert await blobs.store.stat(key) is None
    with pytest.raises(NotFound):
        await _read_all(blobs.store, key)
    with pytest.raises(NotFound):
        await blobs.store.verify(key, size=1, sha256=_sha(b"x"))


async def test_expired_urls_are_refused(blobs: Harness) -> None:
    key, data = new_id(), os.urandom(1000)
    ticket = await blobs.store.upload_url(
        key, size=len(data), sha256=_sha(data), content_type="image/png", expires_at=_later(15)
    )
    blobs.set_skew(16 * 60)
    async with blobs.http.put(
        URL(ticket.url, encoded=True), data=data, headers=ticket.headers
    ) as resp:
        assert resp.status == 403
        if blobs.kind == "local":
            assert (await resp.json())["code"] == "url_expired"
    blobs.set_skew(0)
    await _gone(blobs, key, len(data), _sha(data))

    await _upload(blobs, key, data)
    url = await blobs.store.download_url(key, expires_at=_later(1))
    blobs.set_skew(2 * 60)
    status, _, body = await _get(blobs, url)
    assert status == 403 and data not in body
    blobs.set_skew(0)
    assert (await _get(blobs, url))[0] == 200


async def test_tampered_urls_are_refused(blobs: Harness) -> None:
    key, data = new_id(), os.urandom(1000)
    ticket = await blobs.store.upload_url(
        key, size=len(data), sha256=_sha(data), content_type="image/png", expires_at=_later()
    )
    names = _param_names(ticket.url)
    assert names
    for name in names:
        async with blobs.http.put(
            URL(_tamper(ticket.url, name), encoded=True), data=data, headers=ticket.headers
        ) as resp:
            assert resp.status == 403, (name, await resp.text())
    # the URL of one key does not upload another
    other = new_id()
    moved = ticket.url.replace(key, other)
    async with blobs.http.put(URL(moved, encoded=True), data=data, headers=ticket.headers) as r:
        assert r.status == 403
    await _gone(blobs, key, len(data), _sha(data))
    await _gone(blobs, other, len(data), _sha(data))

    await _upload(blobs, key, data)
    url = await blobs.store.download_url(key, expires_at=_later())
    for name in _param_names(url):
        status, _, body = await _get(blobs, _tamper(url, name))
        assert status == 403 and data not in body, name


async def test_a_url_works_only_for_its_method(blobs: Harness) -> None:
    key, data = new_id(), os.urandom(1000)
    ticket = await blobs.store.upload_url(
        key, size=len(data), sha256=_sha(data), content_type="image/png", expires_at=_later()
    )
    async with blobs.http.put(
        URL(ticket.url, encoded=True), data=data, headers=ticket.headers
    ) as resp:
        assert resp.status == 200
    # the upload URL does not download, even though the blob now exists
    status, _, body = await _get(blobs, ticket.url)
    assert status == 403 and data not in body
    # the download URL does not upload (nor overwrite)
    url = await blobs.store.download_url(key, expires_at=_later())
    other = os.urandom(1000)
    async with blobs.http.put(URL(url, encoded=True), data=other, headers=ticket.headers) as r:
        assert r.status == 403
    assert (await _get(blobs, url))[2] == data
    info = await blobs.store.verify(key, size=len(data), sha256=_sha(data))
    assert info.size == len(data)


@pytest.mark.parametrize("delta", [1, -1, 1000])
async def test_wrong_size_is_refused_and_nothing_kept(blobs: Harness, delta: int) -> None:
    key, data = new_id(), os.urandom(5000)
    body = (data + os.urandom(delta)) if delta > 0 else data[:delta]
    status, _ = await _put(blobs, key, data, body=body)
    if status < 300:  # an engine that cannot check during the upload: `verify` must catch it
        with pytest.raises(SizeMismatch):
            await blobs.store.verify(key, size=len(data), sha256=_sha(data))
    else:
        assert status in (400, 403)
    await _gone(blobs, key, len(data), _sha(data))


async def test_wrong_checksum_is_refused_and_nothing_kept(blobs: Harness) -> None:
    key, data = new_id(), os.urandom(5000)
    body = os.urandom(len(data))
    status, text = await _put(blobs, key, data, body=body)
    if status < 300:  # moto keeps it (AWS S3 would not): `verify` must catch it
        with pytest.raises(ChecksumMismatch):
            await blobs.store.verify(key, size=len(data), sha256=_sha(data))
    else:
        assert status in (400, 403)
        if blobs.kind == "local":
            assert '"checksum_mismatch"' in text
    await _gone(blobs, key, len(data), _sha(data))


BAD_KEYS = [
    "",
    ".",
    "..",
    "../x",
    "..%2Fx",
    "%2e%2e",
    "/etc/passwd",
    "01ARZ3NDEKTSV4RRFFQ69G5FAV/../x",
    "01ARZ3NDEKTSV4RRFFQ69G5FAV.png",
    "01ARZ3NDEKTSV4RRFFQ69G5FAV.thumb.thumb",
    "01arz3ndektsv4rrffq69g5fav",
    "01ARZ3NDEKTSV4RRFFQ69G5FA",
    "01ARZ3NDEKTSV4RRFFQ69G5FAVX",
    "01ARZ3NDEKTSV4RRFFQ69G5FA\x00",
    "01ARZ3NDEKTSV4RRFFQ69G5FAV\n",
]


async def test_malformed_keys_are_refused_by_every_method(blobs: Harness) -> None:
    for bad in BAD_KEYS:
        await _refuses_key(blobs.store, bad)


async def _refuses_key(store: BlobStore, bad: str) -> None:
    sha = _sha(b"x")
    with pytest.raises(BadRequest):
        await store.upload_url(
            bad, size=1, sha256=sha, content_type="text/plain", expires_at=_later()
        )
    with pytest.raises(BadRequest):
        await store.download_url(bad, expires_at=_later())
    with pytest.raises(BadRequest):
        await store.stat(bad)
    with pytest.raises(BadRequest):
        await store.verify(bad, size=1, sha256=sha)
    with pytest.raises(BadRequest):
        await _read_all(store, bad)
    with pytest.raises(BadRequest):
        await store.put(bad, b"x", "text/plain")
    good = new_id()
    await store.put(good, b"kept", "text/plain")
    with pytest.raises(BadRequest):
        await store.delete([good, bad])
    assert await store.stat(good) is not None  # checked before anything was deleted


async def test_malformed_upload_declarations_are_refused(blobs: Harness) -> None:
    key, sha = new_id(), _sha(b"x")
    for kw in (
        {"size": -1, "sha256": sha, "content_type": "text/plain"},
        {"size": 1, "sha256": sha.upper(), "content_type": "text/plain"},
        {"size": 1, "sha256": sha[:-1], "content_type": "text/plain"},
        {"size": 1, "sha256": sha, "content_type": "text/plain\r\nX-Evil: 1"},
        {"size": 1, "sha256": sha, "content_type": "nonsense"},
    ):
        with pytest.raises(BadRequest):
            await blobs.store.upload_url(key, expires_at=_later(), **kw)
    with pytest.raises(ValueError):
        await blobs.store.upload_url(
            key, size=1, sha256=sha, content_type="text/plain", expires_at=_wall_ms() - 1
        )


async def test_put_and_delete(blobs: Harness) -> None:
    keys = [new_id() for _ in range(5)]
    for i, key in enumerate(keys):
        info = await blobs.store.put(key, b"blob %d" % i, "text/plain")
        assert info == BlobInfo(
            key=key,
            size=len(b"blob %d" % i),
            content_type="text/plain",
            sha256=_sha(b"blob %d" % i),
        )
    thumb = thumbnail_key(keys[0])
    await blobs.store.put(thumb, b"\xff\xd8 jpeg", "image/jpeg")
    stat = await blobs.store.stat(thumb)
    assert stat is not None and stat.content_type == "image/jpeg"
    assert await _read_all(blobs.store, thumb) == b"\xff\xd8 jpeg"
    url = await blobs.store.download_url(keys[1], expires_at=_later())
    assert (await _get(blobs, url))[2] == b"blob 1"

    await blobs.store.delete([*keys, thumb, new_id()])  # a missing key is no error
    for key in [*keys, thumb]:
        assert await blobs.store.stat(key) is None
    assert (await _get(blobs, url))[0] in _MISSING[blobs.kind]
    await blobs.store.delete(keys)  # idempotent
    await blobs.store.delete([])


async def test_open_is_idempotent(blobs: Harness) -> None:
    key = new_id()
    await blobs.store.put(key, b"still here", "text/plain")
    await blobs.store.open()
    assert await _read_all(blobs.store, key) == b"still here"


# -- pigeon's own endpoint (local adapter) ----------------------------------------------------


async def test_head_and_conditional_get(local: Harness) -> None:
    key, data = new_id(), os.urandom(4096)
    await _upload(local, key, data, "image/webp")
    url = await local.store.download_url(key, expires_at=_later())
    status, headers, body = await _get(local, url, method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == "4096" and headers["Content-Type"] == "image/webp"
    status, headers, _ = await _get(local, url)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]
    assert headers["Content-Disposition"] == "inline"
    status, _, body = await _get(local, url, {"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")


async def test_scriptable_types_are_never_inline(local: Harness) -> None:
    key = new_id()
    await _upload(local, key, b"<script>alert(1)</script>", "text/html")
    status, headers, _ = await _get(local, await local.store.download_url(key, expires_at=_later()))
    assert status == 200 and headers["Content-Disposition"] == "attachment"
    assert headers["Content-Type"].startswith("text/html")


async def test_refusals_are_json_with_stable_codes(local: Harness) -> None:
    key, data = new_id(), b"0123456789"
    ticket = await local.store.upload_url(
        key, size=10, sha256=_sha(data), content_type="image/png", expires_at=_later()
    )
    url = URL(ticket.url, encoded=True)
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({**ticket.headers, "Content-Type": "text/html"}, data, 403, "signature_invalid"),
        ({"Content-Type": "image/png"}, data + b"x", 400, "size_mismatch"),
        ({"Content-Type": "image/png"}, b"9876543210", 400, "checksum_mismatch"),
    ]
    for headers, body, status, code in cases:
        async with local.http.put(url, data=body, headers=headers) as resp:
            assert resp.status == status
            assert resp.content_type == "application/json"
            assert (await resp.json())["code"] == code
    repeated = URL(ticket.url + "&exp=1", encoded=True)
    async with local.http.put(repeated, data=data, headers=ticket.headers) as resp:
        assert (resp.status, (await resp.json())["code"]) == (403, "signature_invalid")
    async with local.http.delete(url) as resp:
        assert resp.status == 405 and (await resp.json())["code"] == "bad_request"
    await _gone(local, key, 10, _sha(data))


async def test_expect_100_continue_is_answered_before_the_body(local: Harness) -> None:
    key, data = new_id(), os.urandom(100_000)
    ticket = await local.store.upload_url(
        key, size=len(data), sha256=_sha(data), content_type="image/png", expires_at=_later()
    )

    async def first_answer(target: str) -> bytes:
        """Send only the head of a PUT with `Expect: 100-continue`; the server's first line."""
        host, port = urlsplit(local.base).hostname, urlsplit(local.base).port
        reader, writer = await asyncio.open_connection(host, port)
        head = (
            f"PUT {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n"
        )
        writer.write(head.encode())
        line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return line

    target = ticket.url.removeprefix(local.base)
    assert (await first_answer(_tamper(target, "sig"))).startswith(b"HTTP/1.1 403")
    assert (await first_answer(target)).startswith(b"HTTP/1.1 100")
    async with local.http.put(
        URL(ticket.url, encoded=True), data=data, headers=ticket.headers, expect100=True
    ) as resp:
        assert resp.status == 200
    await local.store.verify(key, size=len(data), sha256=_sha(data))


async def _chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_chunked_uploads_are_checked_as_they_stream(local: Harness) -> None:
    key, data = new_id(), os.urandom(10_000)
    ticket = await local.store.upload_url(
        key, size=len(data), sha256=_sha(data), content_type="image/png", expires_at=_later()
    )
    url = URL(ticket.url, encoded=True)
    headers = {"Content-Type": "image/png"}  # no Content-Length: chunked transfer encoding
    async with local.http.put(url, data=_chunks(data + b"x"), headers=headers) as resp:
        assert (resp.status, (await resp.json())["code"]) == (400, "size_mismatch")
    async with local.http.put(url, data=_chunks(data[:-1]), headers=headers) as resp:
        assert (resp.status, (await resp.json())["code"]) == (400, "size_mismatch")
    await _gone(local, key, len(data), _sha(data))
    async with local.http.put(url, data=_chunks(data), headers=headers) as resp:
        assert resp.status == 200
        assert await resp.json() == {"key": key, "size": len(data), "sha256": _sha(data)}
    await local.store.verify(key, size=len(data), sha256=_sha(data))


@pytest.mark.parametrize(
    "path",
    [
        "/v1/blobs/..%2F..%2Fescape",
        "/v1/blobs/%2e%2e",
        "/v1/blobs/%2E%2E%2Fescape",
        "/v1/blobs/../escape",
        "/v1/blobs/..",
        "/v1/blobs/.%00",
        "/v1/blobs/01ARZ3NDEKTSV4RRFFQ69G5FAV%2F..%2F..%2Fescape",
    ],
)
async def test_path_traversal_over_http_is_refused(local: Harness, path: str) -> None:
    assert local.root is not None
    data = b"escaped!"
    # a genuine signature of a genuine key, pasted onto a hostile path
    ticket = await local.store.upload_url(
        new_id(), size=len(data), sha256=_sha(data), content_type="text/plain", expires_at=_later()
    )
    query = urlsplit(ticket.url).query
    hostile = URL(f"{local.base}{path}?{query}", encoded=True)
    async with local.http.put(hostile, data=data, headers=ticket.headers) as resp:
        assert resp.status in (400, 403, 404), resp.status
    async with local.http.get(hostile) as resp:
        assert resp.status in (400, 403, 404), resp.status
    outside = [p for p in local.root.parent.rglob("*escape*")]
    assert outside == []
    assert [p for p in local.root.rglob("*") if p.is_file()] == []


async def test_relative_urls_without_a_base_url(tmp_path: Path) -> None:
    async with _local(tmp_path, base_url=False) as h:
        key, data = new_id(), b"relative"
        ticket = await h.store.upload_url(
            key, size=len(data), sha256=_sha(data), content_type="text/plain", expires_at=_later()
        )
        assert ticket.url.startswith(f"/v1/blobs/{key}?")
        await _upload(h, key, data, "text/plain")  # resolved against the server's address
        url = await h.store.download_url(key, expires_at=_later())
        assert url.startswith(f"/v1/blobs/{key}?")
        assert (await _get(h, url))[2] == data


async def test_cdn_cacheable_downloads_are_public(tmp_path: Path) -> None:
    async with _local(tmp_path, cdn_cacheable=True) as h:
        key = new_id()
        await _upload(h, key, b"cdn", "image/png")
        _, headers, _ = await _get(h, await h.store.download_url(key, expires_at=_later()))
        assert headers["Cache-Control"].startswith("public, max-age=")


async def test_an_interrupted_upload_keeps_nothing(local: Harness) -> None:
    assert isinstance(local.store, LocalBlobStore) and local.root is not None
    data = os.urandom(3 * 1024 * 1024)
    grant = UploadGrant(
        key=new_id(), size=len(data), sha256=_sha(data), content_type="x/y", expires_at=_later()
    )

    async def broken() -> AsyncIterator[bytes]:
        yield data[: 2 * 1024 * 1024]  # more than one write buffer, so a write is in flight
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await local.store.receive(grant, broken())
    await _gone(local, grant.key, grant.size, grant.sha256)


async def test_sweep_removes_old_blobs_and_stale_partials(tmp_path: Path) -> None:
    async with _local(tmp_path, partial_ttl_ms=0) as h:
        assert h.root is not None
        old, new = new_id(), new_id()
        await h.store.put(old, b"old", "text/plain")
        h.set_skew(3600)
        await h.store.put(new, b"new", "text/plain")
        stale = h.root / "partial" / "leftover.part"
        stale.write_bytes(b"crashed upload")
        os.utime(stale, (0, 0))
        removed = await h.store.sweep(_wall_ms() + 1800 * 1000)
        assert removed == 1
        assert await h.store.stat(old) is None and await h.store.stat(new) is not None
        assert not stale.exists()


def test_the_local_secret_is_created_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "data" / "blob-secret"
    first = load_or_create_secret(path)
    assert len(first) == 32 and load_or_create_secret(path) == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["blob-secret"]
    path.write_text("abcd")
    with pytest.raises(ValueError):
        load_or_create_secret(path)


# -- S3 specifics ------------------------------------------------------------------------------


async def test_s3_open_creates_the_bucket_with_a_lifecycle_rule(moto_s3: MotoS3) -> None:  # noqa: F811
    bucket = f"pigeon-{uuid.uuid4().hex[:16]}"
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=moto_s3.endpoint,
        region_name=moto_s3.region,
        aws_access_key_id=moto_s3.access_key,
        aws_secret_access_key=moto_s3.secret_key,
    ) as s3:
        await s3.create_bucket(Bucket=bucket)
        other_rule = {
            "ID": "someone-elses",
            "Status": "Enabled",
            "Filter": {"Prefix": "logs/"},
            "Expiration": {"Days": 90},
        }
        await s3.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": [other_rule]}
        )
        store = S3BlobStore(
            bucket,
            clock=SystemClock(),
            endpoint_url=moto_s3.endpoint,
            region=moto_s3.region,
            access_key=moto_s3.access_key,
            secret_key=moto_s3.secret_key,
            retention_days=29.5,
            prefix="media/",
        )
        await store.open()
        await store.open()
        try:
            rules = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
            by_id = {r["ID"]: r for r in rules}
            assert set(by_id) == {"someone-elses", "pigeon-retention-media/"}
            ours = by_id["pigeon-retention-media/"]
            assert ours["Expiration"] == {"Days": 30}
            assert ours["Filter"] == {"Prefix": "media/"}
            key = new_id()
            await store.put(key, b"prefixed", "text/plain")
            head = await s3.head_object(Bucket=bucket, Key=f"media/{key}")
            assert head["ContentLength"] == len(b"prefixed")
        finally:
            await store.aclose()

    fresh = S3BlobStore(
        f"pigeon-{uuid.uuid4().hex[:16]}",
        clock=SystemClock(),
        endpoint_url=moto_s3.endpoint,
        region=moto_s3.region,
        access_key=moto_s3.access_key,
        secret_key=moto_s3.secret_key,
    )
    await fresh.open()  # creates the bucket
    try:
        assert await fresh.stat(new_id()) is None
    finally:
        await fresh.aclose()


async def test_s3_verify_reads_back_unless_the_store_checked(moto_s3: MotoS3) -> None:  # noqa: F811
    async with _s3(moto_s3) as h:
        assert isinstance(h.store, S3BlobStore)
        # put() sends the digest; the store reports it, and verify compares it without reading
        key, data = new_id(), b"thumbnail bytes"
        await h.store.put(key, data, "image/jpeg")
        stat = await h.store.stat(key)
        assert stat is not None and stat.sha256 == _sha(data)
        with pytest.raises(ChecksumMismatch):
            await h.store.verify(key, size=len(data), sha256=_sha(b"something else"))
        assert await h.store.stat(key) is None

        # A store that keeps a client's checksum header unchecked (moto does, when the client
        # adds x-amz-sdk-checksum-algorithm) must not be trusted: verify reads the bytes back.
        careful = S3BlobStore(
            h.store.bucket,
            clock=SystemClock(),
            endpoint_url=moto_s3.endpoint,
            region=moto_s3.region,
            access_key=moto_s3.access_key,
            secret_key=moto_s3.secret_key,
            trust_store_checksum=False,
        )
        await careful.open()
        try:
            key, data = new_id(), os.urandom(2000)
            ticket = await h.store.upload_url(
                key, size=2000, sha256=_sha(data), content_type="image/png", expires_at=_later()
            )
            headers = {**ticket.headers, "x-amz-sdk-checksum-algorithm": "SHA256"}
            lie = os.urandom(2000)
            async with h.http.put(URL(ticket.url, encoded=True), data=lie, headers=headers) as r:
                assert r.status == 200  # moto: AWS S3 would refuse it here
            stat = await careful.stat(key)
            assert stat is not None and stat.sha256 == _sha(data)  # the unchecked claim
            with pytest.raises(ChecksumMismatch):
                await careful.verify(key, size=2000, sha256=_sha(data))
            assert await careful.stat(key) is None
        finally:
            await careful.aclose()
