"""`/v1/blobs/{key}`: pigeon's own HTTP endpoint for blobs whose signed URLs point at it (the
local blob store). Clients reach it only through URLs the services signed; it needs no bearer
token and no database, because everything a request may do is in its signature.

- PUT streams the body to storage through `BlobEndpoint.receive` (bounded memory; size and
  SHA-256 checked; a mismatch keeps nothing and answers 400).
- GET and HEAD send the file with sendfile (`web.FileResponse`): Content-Type as uploaded,
  Content-Length, ETag, `Accept-Ranges: bytes`, one Range (206 / 416), and Cache-Control that
  ends when the URL does.
- Refusals are JSON `{code, message}` with the status of the domain error: 403 for a bad
  signature (`signature_invalid`, which includes using a URL for another method) or an expired
  URL (`url_expired`), 400 for a malformed key, a size or checksum mismatch, 404 if no blob.

Blobs are served from pigeon's own origin, so a hostile upload (HTML, SVG) must never run as a
page there: responses forbid sniffing and scripts (`nosniff`, a sandboxing CSP) and are
`attachment`s unless their type is a plain image, video or audio format.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError

from pigeon.domain.errors import (
    BadRequest,
    NotFound,
    PigeonError,
    SignatureInvalid,
    SizeMismatch,
)
from pigeon.domain.media import UploadGrant, content_disposition
from pigeon.gateway.errors import HTTP_STATUS
from pigeon.ports import BlobEndpoint

if TYPE_CHECKING:
    from prometheus_client import Counter

    from pigeon.metrics import Metrics

log = logging.getLogger(__name__)

BLOB_PATH = "/v1/blobs/{key}"
_READ_CHUNK = 256 * 1024
#: Shown inline by browsers without risk (no scripts): everything else is an attachment.
_INLINE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/quicktime",
        "audio/mpeg",
        "audio/mp4",
        "audio/ogg",
        "audio/webm",
        "audio/aac",
        "audio/wav",
    }
)
_SAFETY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


def add_blob_routes(
    app: web.Application, blobs: BlobEndpoint, metrics: Metrics | None = None
) -> None:
    """Mount PUT/GET/HEAD `/v1/blobs/{key}` serving `blobs`; any other method gets 405. Bytes
    received and sent are counted in `metrics`, if given."""
    handlers = _BlobHandlers(blobs, metrics)
    resource = app.router.add_resource(BLOB_PATH)
    resource.add_route(hdrs.METH_PUT, handlers.put, expect_handler=handlers.expect)
    resource.add_route(hdrs.METH_GET, handlers.get)
    resource.add_route(hdrs.METH_HEAD, handlers.get)
    resource.add_route(hdrs.METH_ANY, _not_allowed)


def error_response(exc: PigeonError) -> web.Response:
    """`{code, message}` with the status of the error's nearest mapped class."""
    status = next((HTTP_STATUS[c] for c in type(exc).__mro__ if c in HTTP_STATUS), 500)
    body = msgspec.json.encode({"code": exc.code, "message": exc.message})
    return web.Response(body=body, status=status, content_type="application/json")


async def _not_allowed(request: web.Request) -> web.Response:
    body = msgspec.json.encode({"code": "bad_request", "message": "method not allowed"})
    return web.Response(
        body=body,
        status=405,
        content_type="application/json",
        headers={hdrs.ALLOW: "GET, HEAD, PUT"},
    )


def _single_params(request: web.Request) -> dict[str, str]:
    """The query as a plain dict; a repeated parameter makes the URL ambiguous, so it is not
    one we signed."""
    params = dict(request.query)
    if len(params) != len(request.query):
        raise SignatureInvalid("repeated query parameter")
    return params


class _BlobHandlers:
    """The endpoint's request handlers, bound to one blob store."""

    def __init__(self, blobs: BlobEndpoint, metrics: Metrics | None) -> None:
        self._blobs = blobs
        self._received = None if metrics is None else metrics.blob_in
        self._sent = None if metrics is None else metrics.blob_out

    def _authorize_put(self, request: web.Request) -> UploadGrant:
        """Everything that can be checked before reading the body."""
        grant = self._blobs.authorize_upload(request.match_info["key"], _single_params(request))
        sent_type = request.headers.get(hdrs.CONTENT_TYPE)
        if sent_type is not None and sent_type != grant.content_type:
            raise SignatureInvalid("Content-Type differs from the one the URL was signed for")
        length = request.content_length
        if length is not None and length != grant.size:
            raise SizeMismatch(f"Content-Length {length}, declared size {grant.size}")
        return grant

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue` (curl sends it for large bodies): a request that will be
        refused is refused before the client sends its body."""
        try:
            self._authorize_put(request)
        except PigeonError as exc:
            response = error_response(exc)
            response.force_close()
            return response
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only 100-continue is supported")
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    async def put(self, request: web.Request) -> web.StreamResponse:
        try:
            grant = self._authorize_put(request)
            chunks: AsyncIterator[bytes] = request.content.iter_chunked(_READ_CHUNK)
            if self._received is not None:
                chunks = _counted(chunks, self._received)
            info = await self._blobs.receive(grant, chunks)
        except PigeonError as exc:
            return _refuse_upload(request, exc)
        except (ConnectionError, HttpProcessingError) as exc:  # client went away mid-body
            log.info("blob upload interrupted: %s", exc)
            return _refuse_upload(request, BadRequest("upload interrupted"))
        body = msgspec.json.encode({"key": info.key, "size": info.size, "sha256": info.sha256})
        return web.Response(body=body, status=200, content_type="application/json")

    async def get(self, request: web.Request) -> web.StreamResponse:
        try:
            grant = self._blobs.authorize_download(
                request.match_info["key"], _single_params(request)
            )
            found = await self._blobs.locate(grant.key)
            if found is None:
                raise NotFound("no such blob")
        except PigeonError as exc:
            return error_response(exc)
        path, info = found
        inline = grant.filename is None and info.content_type in _INLINE_TYPES
        scope = "public" if grant.shared_cache else "private"
        headers = {
            hdrs.CONTENT_TYPE: info.content_type,
            hdrs.CACHE_CONTROL: f"{scope}, max-age={grant.seconds_left}, immutable",
            hdrs.CONTENT_DISPOSITION: content_disposition(grant.filename, inline=inline),
            **_SAFETY_HEADERS,
        }
        return _FileResponse(path, self._sent, chunk_size=_READ_CHUNK, headers=headers)


class _FileResponse(web.FileResponse):
    """A blob sent with sendfile, its body's bytes counted once sent (GET: 200 or 206)."""

    def __init__(self, path: Path, sent: Counter | None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._sent = sent

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if self._sent is not None and request.method == hdrs.METH_GET and self.status in (200, 206):
            self._sent.inc(self.content_length or 0)
        return writer


async def _counted(chunks: AsyncIterator[bytes], received: Counter) -> AsyncIterator[bytes]:
    """An upload's body, its bytes counted as they arrive (refused uploads' too)."""
    async for chunk in chunks:
        received.inc(len(chunk))
        yield chunk


def _refuse_upload(request: web.Request, exc: PigeonError) -> web.Response:
    response = error_response(exc)
    if not request.content.is_eof():
        # Do not drain a body we refused (it may be huge): answer, then close the connection.
        response.force_close()
    return response
