"""Apple Push Notification service: token-authenticated pushes over HTTP/2.

APNs speaks HTTP/2 only, hence httpx (with h2) rather than aiohttp. The provider token is an
ES256 JWT that Apple wants reused: it refuses a token older than an hour and answers
`TooManyProviderTokenUpdates` when a provider mints new ones more often than every 20 minutes, so
one token serves every push for 50 minutes and is replaced early only when Apple calls it
expired or invalid.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from pigeon.domain.push import (
    PushKind,
    PushNotification,
    PushOutcome,
    PushTarget,
    retry_after_seconds,
)
from pigeon.ports import PushSender

#: How long one provider token serves (Apple: at most 60 min, new ones at most every 20 min).
TOKEN_LIFETIME_SECONDS = 50 * 60
#: How long APNs keeps trying an offline device; a newer push of the chat replaces it anyway.
EXPIRATION_SECONDS = 24 * 3600
#: APNs refuses an `apns-collapse-id` longer than this (in bytes).
MAX_COLLAPSE_ID_BYTES = 64

#: Reasons that mean the device token will never work again (for this app).
_GONE_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered"})
#: Reasons that mean our provider token was refused: mint a new one.
_STALE_TOKEN_REASONS = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})


def alert_title(note: PushNotification) -> str:
    """The visible title of a push: the sender's name when allowed, else the generic title."""
    return note.sender_name or note.title


def alert_body(note: PushNotification) -> str:
    """The visible text of a push: the client's own preview, else how many messages are new."""
    if note.preview:
        return note.preview
    return "1 new message" if note.count == 1 else f"{note.count} new messages"


def apns_collapse_id(collapse_key: str) -> str:
    """`collapse_key` as APNs accepts it: itself when short enough, else its SHA-256 (64 hex)."""
    if len(collapse_key.encode()) <= MAX_COLLAPSE_ID_BYTES:
        return collapse_key
    return hashlib.sha256(collapse_key.encode()).hexdigest()


def apns_payload(note: PushNotification) -> dict[str, Any]:
    """The JSON body of one push: the alert, the badge and the chat, never a message body."""
    aps: dict[str, Any] = {
        "alert": {"title": alert_title(note), "body": alert_body(note)},
        "badge": note.badge,
        "sound": "default",
        "thread-id": note.chat,
    }
    if note.preview:
        aps["mutable-content"] = 1  # the app's extension decrypts an encrypted preview
    return {"aps": aps, "chat": note.chat, "count": note.count, "device": note.device}


class _ProviderToken:
    """The current ES256 provider token and when it was minted (monotonic seconds)."""

    def __init__(self, value: str, minted_at: float) -> None:
        self.value = value
        self.minted_at = minted_at

    def is_fresh(self) -> bool:
        return time.monotonic() - self.minted_at < TOKEN_LIFETIME_SECONDS


class ApnsSender:
    """Sends pushes to APNs (production or sandbox host, as each target says)."""

    kind: PushKind = "apns"

    def __init__(
        self,
        team_id: str,
        key_id: str,
        private_key_pem: bytes,
        *,
        production_url: str = "https://api.push.apple.com",
        sandbox_url: str = "https://api.sandbox.push.apple.com",
        timeout: float = 10.0,
        verify: bool | str = True,
    ) -> None:
        self._team_id = team_id
        self._key_id = key_id
        self._key = _load_signing_key(private_key_pem)
        self._urls = {"production": production_url.rstrip("/"), "sandbox": sandbox_url.rstrip("/")}
        self._timeout = timeout
        self._verify = verify
        self._token: _ProviderToken | None = None
        self._client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        if self._client is not None:
            return
        self._client = httpx.AsyncClient(
            http2=True, timeout=self._timeout, verify=_tls_context(self._verify)
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def send(self, target: PushTarget, note: PushNotification) -> PushOutcome:
        if self._client is None:
            raise RuntimeError("ApnsSender.send before open()")
        if target.kind != "apns" or not target.token or not target.topic:
            raise ValueError("ApnsSender needs an apns target with a token and a topic")
        token = self._provider_token()
        url = f"{self._urls[target.environment or 'production']}/3/device/{target.token}"
        try:
            response = await self._client.post(
                url, headers=self._headers(token, target.topic, note), json=apns_payload(note)
            )
        except (httpx.HTTPError, OSError) as exc:
            return PushOutcome("retry", f"apns unreachable: {type(exc).__name__}: {exc}")
        return self._outcome(response, token)

    def _headers(self, token: str, topic: str, note: PushNotification) -> dict[str, str]:
        return {
            "authorization": f"bearer {token}",
            "apns-topic": topic,
            "apns-push-type": "alert",
            "apns-priority": "10",
            "apns-collapse-id": apns_collapse_id(note.collapse_key),
            "apns-expiration": str(int(time.time()) + EXPIRATION_SECONDS),
        }

    def _outcome(self, response: httpx.Response, token: str) -> PushOutcome:
        status = response.status_code
        if 200 <= status < 300:
            return PushOutcome("sent", response.headers.get("apns-id", ""))
        reason = _reason(response)
        detail = f"apns {status} {reason}".rstrip()
        if status == 410 or reason in _GONE_REASONS:
            return PushOutcome("gone", detail)
        if reason in _STALE_TOKEN_REASONS:
            self._discard_token(token)
        if status == 429 or status >= 500:
            after = retry_after_seconds(response.headers.get("retry-after"), time.time())
            return PushOutcome("retry", detail, after)
        return PushOutcome("retry", detail)

    def _provider_token(self) -> str:
        if self._token is None or not self._token.is_fresh():
            self._token = _ProviderToken(self._mint_token(), time.monotonic())
        return self._token.value

    def _mint_token(self) -> str:
        claims = {"iss": self._team_id, "iat": int(time.time())}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self._key_id})

    def _discard_token(self, refused: str) -> None:
        """Forget the token APNs refused, unless a concurrent push already replaced it."""
        if self._token is not None and self._token.value == refused:
            self._token = None


def _load_signing_key(pem: bytes) -> EllipticCurvePrivateKey:
    """The `.p8` key Apple issued; a wrong key fails at start-up, not on the first push."""
    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, EllipticCurvePrivateKey):
        raise ValueError("an APNs signing key is an EC (P-256) private key")
    return key


def _tls_context(verify: bool | str) -> ssl.SSLContext | bool:
    """httpx's `verify`: a CA file path becomes an SSL context (httpx deprecates the path)."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


def _reason(response: httpx.Response) -> str:
    """The `reason` of an APNs error body, or "" when the body is not what APNs sends."""
    try:
        body = response.json()
    except ValueError:
        return ""
    reason = body.get("reason") if isinstance(body, dict) else None
    return reason if isinstance(reason, str) else ""


_check: type[PushSender] = ApnsSender
