"""S3 for tests: moto in *server mode* (a real HTTP S3 endpoint on loopback, in a thread of the
test process, shared by the session), and a SigV4 gate in front of it for pre-signed URLs.

Why the gate: moto's server mode stores and serves objects faithfully (ranges, response header
overrides, lifecycle configuration) but does not authenticate pre-signed URLs at all: it accepts
an altered signature, an expired URL or a PUT URL used for a GET. AWS S3 refuses all three, and
the BlobStore contract says they are refused. `SigV4Gate` checks pre-signed URLs the way S3
documents it (AWS Signature Version 4, query-string authentication: the canonical request over
method, path, query and signed headers, the derived signing key, X-Amz-Date + X-Amz-Expires)
and forwards what passes to moto, streaming both ways. What it does not model: S3 checking the
body against a signed x-amz-checksum-sha256 (moto ignores it too), so the contract suite runs
the S3 adapter's fallback, `verify` hashing the object, against it.

The gate's clock can be moved (`skew`) so tests see URLs expire without waiting.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote

import pytest
from aiohttp import web
from moto.server import ThreadedMotoServer

from tests.support.http_front import HttpFront

ACCESS_KEY = "AKIAPIGEONTESTKEY000"
SECRET_KEY = "pigeon-test-secret-key"
REGION = "us-east-1"


@dataclass(frozen=True)
class MotoS3:
    """Where the session's moto server listens, and the credentials to sign with."""

    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server (server mode) for the whole session; tests use their own buckets."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()


class SigV4Gate(HttpFront):
    """An HTTP front for `upstream` that lets through only pre-signed requests S3 would accept."""

    def __init__(self, upstream: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        super().__init__(upstream)
        self.access_key = access_key
        self.secret_key = secret_key
        #: Seconds added to the gate's clock (positive: the future).
        self.skew = 0.0

    # -- checking ------------------------------------------------------------------------------

    def check(self, method: str, raw_path: str, headers: dict[str, str]) -> tuple[str, str] | None:
        """None if S3 would accept this pre-signed request, else (error code, message)."""
        path, _, query = raw_path.partition("?")
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        if "X-Amz-Signature" not in params:
            return "AccessDenied", "anonymous access is not allowed"
        if len(params) != len(pairs) or params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
            return "AuthorizationQueryParametersError", "malformed query authentication"
        try:
            key_id, date, region, service, terminator = params["X-Amz-Credential"].split("/")
            amz_date = params["X-Amz-Date"]
            signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            expires = int(params["X-Amz-Expires"])
            signed_headers = params["X-Amz-SignedHeaders"].split(";")
        except (KeyError, ValueError):
            return "AuthorizationQueryParametersError", "malformed query authentication"
        if key_id != self.access_key:
            return "InvalidAccessKeyId", "unknown access key"
        lowered = {k.lower(): v for k, v in headers.items()}
        if any(h not in lowered for h in signed_headers):
            return "SignatureDoesNotMatch", "a signed header is missing"
        canonical = "\n".join(
            [
                method,
                path,
                "&".join(
                    f"{k}={v}"
                    for k, v in sorted(
                        (_enc(k), _enc(v)) for k, v in pairs if k != "X-Amz-Signature"
                    )
                ),
                "".join(f"{h}:{' '.join(lowered[h].split())}\n" for h in signed_headers),
                ";".join(signed_headers),
                "UNSIGNED-PAYLOAD",
            ]
        )
        scope = f"{date}/{region}/{service}/{terminator}"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        key = f"AWS4{self.secret_key}".encode()
        for part in (date, region, service, terminator):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, params["X-Amz-Signature"]):
            return "SignatureDoesNotMatch", "the request signature does not match"
        if time.time() + self.skew > signed_at.timestamp() + expires:
            return "AccessDenied", "Request has expired"
        return None

    # -- forwarding ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        refused = self.check(request.method, request.raw_path, dict(request.headers))
        if refused is not None:
            code, message = refused
            body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return web.Response(status=403, text=body, content_type="application/xml")
        return await self._forward(request, _stream(request) if request.body_exists else None)


async def _stream(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(256 * 1024):
        yield chunk


def _enc(value: str) -> str:
    """URI-encode as SigV4 wants: every byte but A-Z a-z 0-9 - _ . ~ as %XX."""
    return quote(value, safe="-_.~")
