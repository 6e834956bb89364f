"""Pushes to an operator's own HTTP gateway (UnifiedPush/ntfy style), signed so it can trust them.

Self-hosters who use neither FCM, APNs nor Web Push point a device at a URL of their own; Pigeon
POSTs each `PushNotification` there as JSON. The receiver cannot know who is calling, so every
request carries an HMAC-SHA256 signature over a timestamp and the body:

    X-Pigeon-Timestamp: 1718000000
    X-Pigeon-Signature: sha256=<hex HMAC-SHA256(secret, b"1718000000." + body)>

Signing the timestamp stops a captured request from being replayed with a fresh one; receivers
must still reject timestamps older than a few minutes (and check the signature with
`verify_signature`, which compares in constant time).

`GatewayClient` is the HTTP half every plain-HTTP sender shares (Web Push uses it too): one
aiohttp session, no redirects, a total timeout per request, and the gateway's answer (or the
network's failure) turned into a `PushOutcome` by `outcome_of`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

import aiohttp
import msgspec

from pigeon.domain.push import (
    PushKind,
    PushNotification,
    PushOutcome,
    PushTarget,
    retry_after_seconds,
)
from pigeon.ports import PushSender

#: Statuses that mean the target will never work again (an unsubscribed endpoint, a removed hook).
GONE_STATUSES = frozenset({404, 410})
#: How much of an error answer's body goes into `PushOutcome.detail`, for the logs.
_DETAIL_BYTES = 200
_SIGNATURE_PREFIX = "sha256="


def outcome_of(status: int, retry_after: str | None, now: float) -> PushOutcome:
    """What a gateway's HTTP status means for the push worker (see `PushSender`)."""
    if 200 <= status < 300:
        return PushOutcome("sent")
    if status in GONE_STATUSES:
        return PushOutcome("gone", f"HTTP {status}")
    if status == 429 or status >= 500:
        return PushOutcome("retry", f"HTTP {status}", retry_after_seconds(retry_after, now))
    # Other answers (400, 401, 403, 413, a redirect...) may be a passing misconfiguration:
    # retried, and dead-lettered by the worker after its last attempt.
    return PushOutcome("retry", f"HTTP {status}")


class GatewayClient:
    """One connection pool to push gateways that answers every POST with a `PushOutcome`.

    It never raises for what the network or the gateway does: refused connections, timeouts,
    resets and malformed answers all become `retry`. Redirects are not followed (a gateway that
    moved is a configuration error, and following one would let a target point pushes anywhere).
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> PushOutcome:
        """POST `body` to `url` and classify the answer."""
        if self._session is None:
            raise RuntimeError("GatewayClient.post before open()")
        try:
            async with self._session.post(
                url, data=body, headers=dict(headers), allow_redirects=False
            ) as resp:
                outcome = outcome_of(resp.status, resp.headers.get("Retry-After"), time.time())
                if outcome.result != "sent":
                    outcome = await _with_body_excerpt(outcome, resp)
                return outcome
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return PushOutcome("retry", _describe(exc))


def _describe(exc: BaseException) -> str:
    """An exception as `Name: message` (`Name` alone when it has no message, as timeouts)."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _with_body_excerpt(outcome: PushOutcome, resp: aiohttp.ClientResponse) -> PushOutcome:
    """`outcome` with the start of the gateway's error text appended to its detail."""
    excerpt = (await resp.content.read(_DETAIL_BYTES)).decode("utf-8", "replace").strip()
    if not excerpt:
        return outcome
    return msgspec.structs.replace(outcome, detail=f"{outcome.detail}: {excerpt}")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The `X-Pigeon-Signature` value of `body` sent at `timestamp` (unix seconds, as text)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256)
    return _SIGNATURE_PREFIX + mac.hexdigest()


def verify_signature(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """Whether `header` (an `X-Pigeon-Signature`) signs `body` at `timestamp`, in constant time.

    It does not judge the timestamp's age: a receiver should also refuse a request whose
    `X-Pigeon-Timestamp` is more than a few minutes from its own clock, or a captured request
    could be replayed.
    """
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, header.encode())


class WebhookSender:
    """Delivers pushes to `PushTarget.url` as signed JSON (`kind` "webhook").

    `secret` is the HMAC key receivers share with the server (at least 32 random bytes).
    A 404 or 410 from the hook means it was removed (`gone`); see `outcome_of` for the rest.
    """

    kind: PushKind = "webhook"

    def __init__(self, secret: bytes, *, timeout: float = 10.0) -> None:
        if not secret:
            raise ValueError("a webhook secret must not be empty")
        self._secret = secret
        self._gateway = GatewayClient(timeout)

    async def open(self) -> None:
        await self._gateway.open()

    async def aclose(self) -> None:
        await self._gateway.aclose()

    async def send(self, target: PushTarget, note: PushNotification) -> PushOutcome:
        if target.kind != self.kind or not target.url:
            raise ValueError(f"WebhookSender cannot send to a {target.kind} target")
        body = msgspec.json.encode(note)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Pigeon-Timestamp": timestamp,
            "X-Pigeon-Signature": sign(self._secret, timestamp, body),
        }
        return await self._gateway.post(target.url, body, headers)


_check: type[PushSender] = WebhookSender
