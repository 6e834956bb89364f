"""Pushes to an operator's own HTTP gateway (UnifiedPush/ntfy style), signed so it can trust them.

Self-hosters who use neither FCM, APNs nor Web Push point a device at a URL of their own; Pigeon
POSTs each `PushNotification` there as JSON. The receiver cannot know who is calling, so every
request carries an HMAC-SHA256 signature over a timestamp and the body:

    X-Pigeon-Timestamp: 1718000000
    X-Pigeon-Signature: sha256=<hex HMAC-SHA256(secret, b"1718000000." + body)>

Signing the timestamp stops a captured request from being replayed with a fresh one; receivers
must still reject timestamps older than a few minutes (and check the signature with
`verify_signature`, which compares in constant time).

The HTTP side (one session, no redirects, answers as outcomes) is `http.GatewayClient`.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import msgspec

from pigeon.adapters.push.http import GatewayClient
from pigeon.domain.push import (
    PushKind,
    PushNotification,
    PushOutcome,
    PushTarget,
)
from pigeon.ports import PushSender

_SIGNATURE_PREFIX = "sha256="


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
    `public_only`: names in URLs must resolve to public addresses (see `http.PublicResolver`).
    A 404 or 410 from the hook means it was removed (`gone`); see `http.outcome_of` for the rest.
    """

    kind: PushKind = "webhook"

    def __init__(self, secret: bytes, *, timeout: float = 10.0, public_only: bool = False) -> None:
        if not secret:
            raise ValueError("a webhook secret must not be empty")
        self._secret = secret
        self._gateway = GatewayClient(timeout, public_only=public_only)

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
