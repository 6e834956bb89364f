"""Pushes to browsers and PWAs through their vendor's Web Push service, with no vendor account.

A browser subscription (`PushTarget` of kind "webpush") names a push service endpoint and the
browser's keys. Three RFCs make a push to it:

- RFC 8030: POST the message to the endpoint with `TTL`, `Urgency` and `Topic` (a newer push
  with the same topic replaces an undelivered one: the chat's collapse key, hashed to fit);
- RFC 8291: the body is the notification's JSON encrypted with `aes128gcm` for the browser's
  `p256dh` key and `auth` secret, so the push service cannot read it;
- RFC 8292 (VAPID): an ES256 JWT signed with the server's own P-256 key proves which
  application server sent it. Browsers bind a subscription to that key's public half (their
  `applicationServerKey`, `vapid_public_key`), so the key must survive restarts:
  `load_or_create_vapid_key` keeps it in a file beside the server's data.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from urllib.parse import urlsplit

import http_ece  # type: ignore[import-untyped]
import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pigeon.adapters.push.http import GatewayClient
from pigeon.adapters.secret_files import create_exclusively
from pigeon.domain.push import PushKind, PushNotification, PushOutcome, PushTarget
from pigeon.ports import PushSender

#: Largest plaintext that fits the 4096-byte body every push service must accept (RFC 8291 §4):
#: 86 bytes of header (salt, record size, sender key) and 17 of delimiter and tag go first.
MAX_PLAINTEXT = 4096 - 86 - 17
#: A VAPID JWT is valid this long (RFC 8292 allows at most 24 h) ...
_TOKEN_LIFETIME = 12 * 3600
#: ... and is signed again when less than this is left, so no request carries a nearly stale one.
_TOKEN_RENEWAL = 3600
#: Distinct push-service origins whose tokens are kept (targets come from users: bounded).
_MAX_AUDIENCES = 256
#: RFC 8030 §5.4: a topic is at most 32 characters of the base64url alphabet (24 bytes encoded).
_TOPIC_BYTES = 24


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_vapid_key() -> bytes:
    """A new P-256 private key as (unencrypted PKCS #8) PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_p256_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key in `pem`; ValueError if it is not one."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("a VAPID key is a P-256 (secp256r1) private key")
    return key


def vapid_public_key(pem: bytes) -> str:
    """The public half of a VAPID key as browsers take it for `applicationServerKey`:
    the uncompressed P-256 point (65 bytes), base64url without padding."""
    return _public_point(load_p256_private_key(pem))


def _public_point(key: ec.EllipticCurvePrivateKey) -> str:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _b64url(point)


def load_or_create_vapid_key(path: Path) -> bytes:
    """The VAPID key (PEM) stored at `path`, created there first (mode 0600) if missing.

    Creation is atomic: the key is written and synced under a temporary name, then hard-linked
    into place, which fails if another process got there first; its key is then the one used.
    So every process sharing the directory ends up with the same key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        create_exclusively(path, generate_vapid_key())
    pem = path.read_bytes()
    try:
        load_p256_private_key(pem)
    except ValueError as exc:
        raise ValueError(f"{path} does not hold a P-256 private key in PEM") from exc
    return pem


def origin_of(endpoint: str) -> str:
    """The origin of a push endpoint (`scheme://host[:port]`), the VAPID token's audience."""
    parts = urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2].lower()
    return f"{parts.scheme.lower()}://{host}"


def topic_of(collapse_key: str) -> str:
    """An RFC 8030 `Topic` for a collapse key: 32 base64url characters of its SHA-256."""
    return _b64url(hashlib.sha256(collapse_key.encode()).digest()[:_TOPIC_BYTES])


def payload_of(note: PushNotification) -> bytes:
    """The notification's JSON, without the optional texts if they would not fit one push."""
    body = msgspec.json.encode(note)
    if len(body) > MAX_PLAINTEXT:
        body = msgspec.json.encode(msgspec.structs.replace(note, preview=None, sender_name=None))
    return body


class _BadSubscription(Exception):
    """A subscription's keys cannot be used (they will never work: the target is gone)."""


def _subscriber_keys(target: PushTarget) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    """The browser's public key (`p256dh`) and `auth` secret of a subscription."""
    try:
        point = _unb64url(target.p256dh or "")
        auth = _unb64url(target.auth or "")
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise _BadSubscription(f"unusable subscription keys: {exc}") from exc
    if len(auth) != 16:
        raise _BadSubscription("the subscription's auth secret is not 16 bytes")
    return public_key, auth


def encrypt_payload(plaintext: bytes, public_key: ec.EllipticCurvePublicKey, auth: bytes) -> bytes:
    """RFC 8291 `aes128gcm` body for one subscriber, under a fresh ephemeral key and salt."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(
        plaintext,
        private_key=ephemeral,
        dh=public_key,
        auth_secret=auth,
        version="aes128gcm",
    )
    return body


class VapidTokens:
    """VAPID JWTs (RFC 8292) per push-service origin, each reused until close to its expiry."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, subject: str) -> None:
        self._key = key
        self._subject = subject
        self._tokens: dict[str, tuple[str, int]] = {}

    def token_for(self, audience: str, now: float) -> str:
        cached = self._tokens.get(audience)
        if cached is not None and cached[1] - now > _TOKEN_RENEWAL:
            return cached[0]
        if len(self._tokens) >= _MAX_AUDIENCES:
            self._tokens.clear()
        expires = int(now) + _TOKEN_LIFETIME
        claims = {"aud": audience, "exp": expires, "sub": self._subject}
        token = jwt.encode(claims, self._key, algorithm="ES256")
        self._tokens[audience] = (token, expires)
        return token


def _check_subject(subject: str) -> str:
    if not subject.startswith(("mailto:", "https://")):
        raise ValueError("a VAPID subject is a mailto: or https: URL the push service can use")
    return subject


class WebPushSender:
    """Delivers pushes to browser subscriptions (`kind` "webpush").

    `vapid_private_key_pem` is the server's VAPID key (`load_or_create_vapid_key`); `subject`
    a `mailto:` or `https:` contact for the push service's operators. `ttl` is how long (s) a
    push service keeps a push for an offline browser. A 404 or 410 means the subscription
    expired or was withdrawn (`gone`), as do subscription keys that are not a P-256 point.
    `public_only`: endpoint names must resolve to public addresses (`http.PublicResolver`).
    """

    kind: PushKind = "webpush"

    def __init__(
        self,
        vapid_private_key_pem: bytes,
        subject: str,
        *,
        timeout: float = 10.0,
        ttl: int = 86400,
        public_only: bool = False,
    ) -> None:
        key = load_p256_private_key(vapid_private_key_pem)
        self._public_key = _public_point(key)
        self._tokens = VapidTokens(key, _check_subject(subject))
        self._ttl = ttl
        self._gateway = GatewayClient(timeout, public_only=public_only)

    async def open(self) -> None:
        await self._gateway.open()

    async def aclose(self) -> None:
        await self._gateway.aclose()

    async def send(self, target: PushTarget, note: PushNotification) -> PushOutcome:
        if target.kind != self.kind or not target.endpoint:
            raise ValueError(f"WebPushSender cannot send to a {target.kind} target")
        try:
            public_key, auth = _subscriber_keys(target)
        except _BadSubscription as exc:
            return PushOutcome("gone", str(exc))
        body = encrypt_payload(payload_of(note), public_key, auth)
        headers = self._headers(target.endpoint, note)
        return await self._gateway.post(target.endpoint, body, headers)

    def _headers(self, endpoint: str, note: PushNotification) -> dict[str, str]:
        token = self._tokens.token_for(origin_of(endpoint), time.time())
        return {
            "Authorization": f"vapid t={token}, k={self._public_key}",
            "TTL": str(self._ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Urgency": "high",
            "Topic": topic_of(note.collapse_key),
        }


_check: type[PushSender] = WebPushSender
