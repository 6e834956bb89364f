"""Push notifications: where a device can be woken, what a push says, and how a gateway answered.

A push never carries a message body (seed 002: the device fetches it over its WebSocket). It says
that a chat has new entries, how many, and the device's unread total; the sender's name only when
the recipient allows it (`User.push_previews`), and a preview only when the sending client
attached one of its own (an encrypted one, for end-to-end encrypted chats).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from pigeon.domain.errors import BadRequest, TooLarge

PushKind = Literal["fcm", "apns", "webpush", "webhook"]
PUSH_KINDS: tuple[PushKind, ...] = ("fcm", "apns", "webpush", "webhook")

#: Longest `push_preview` a sender may attach to a message, in UTF-8 bytes: with the rest of a
#: push it stays within APNs's and FCM's 4 KiB payloads however its characters are escaped.
MAX_PUSH_PREVIEW_BYTES = 512
#: A push counts unread messages up to this (clients show "99+").
MAX_COUNT = 100
#: Longest token, URL or key a target may carry (FCM tokens are ~160 chars, URLs a few hundred).
MAX_FIELD_CHARS = 2048


class PushTarget(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """One device's push address. Which fields a kind needs is checked by `check_target`."""

    kind: PushKind
    #: `fcm`: the registration token; `apns`: the device token (hex).
    token: str | None = None
    #: `apns`: the app's bundle id (the `apns-topic`); `environment`: which APNs host.
    topic: str | None = None
    environment: Literal["production", "sandbox"] | None = None
    #: `webpush`: the subscription (RFC 8030 endpoint, RFC 8291 `p256dh` and `auth`, base64url).
    endpoint: str | None = None
    p256dh: str | None = None
    auth: str | None = None
    #: `webhook`: the operator's own gateway (UnifiedPush/ntfy style), https (or loopback http).
    url: str | None = None


_REQUIRED: dict[str, tuple[str, ...]] = {
    "fcm": ("token",),
    "apns": ("token", "topic"),
    "webpush": ("endpoint", "p256dh", "auth"),
    "webhook": ("url",),
}


_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
#: A bundle id, optionally with APNs's suffixes (`.voip`, `.complication`...); it goes in a header.
_BUNDLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,254}")
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_:-]+")


def check_target(target: PushTarget) -> PushTarget:
    """The target if it is complete and well formed for its kind, else `BadRequest`."""
    fields = msgspec.structs.asdict(target)
    needed = _REQUIRED[target.kind]
    for name in needed:
        value = fields[name]
        if not value or not isinstance(value, str):
            raise BadRequest(f"a {target.kind} push target needs `{name}`")
    for name, value in fields.items():
        if name == "kind" or value is None:
            continue
        if name not in needed and not (target.kind == "apns" and name == "environment"):
            raise BadRequest(f"`{name}` is not a field of a {target.kind} push target")
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise BadRequest(f"`{name}` is longer than {MAX_FIELD_CHARS} characters")
    _CHECKS[target.kind](target)
    return target


def _check_fcm(target: PushTarget) -> None:
    if _FCM_TOKEN.fullmatch(target.token or "") is None:
        raise BadRequest("an FCM token has letters, digits and '-_:' only")


def _check_apns(target: PushTarget) -> None:
    if not _is_hex(target.token or ""):
        raise BadRequest("an APNs device token is hexadecimal")
    if _BUNDLE_ID.fullmatch(target.topic or "") is None:
        raise BadRequest("an APNs topic is the app's bundle id (letters, digits, '.', '-')")


def _check_webpush(target: PushTarget) -> None:
    _check_url(target.endpoint or "", "endpoint")
    if len(_b64url(target.p256dh or "", "p256dh")) != 65:
        raise BadRequest("`p256dh` is an uncompressed P-256 public key (65 bytes)")
    if len(_b64url(target.auth or "", "auth")) != 16:
        raise BadRequest("`auth` is a 16-byte secret")


def _check_webhook(target: PushTarget) -> None:
    _check_url(target.url or "", "url")


_CHECKS = {
    "fcm": _check_fcm,
    "apns": _check_apns,
    "webpush": _check_webpush,
    "webhook": _check_webhook,
}


def check_push_preview(preview: str) -> str:
    """A sender's push preview if it fits every platform's payload, else `TooLarge` or
    `BadRequest` (control characters, which JSON would escape to six bytes each)."""
    if len(preview.encode()) > MAX_PUSH_PREVIEW_BYTES:
        raise TooLarge(f"push_preview exceeds {MAX_PUSH_PREVIEW_BYTES} bytes")
    if _CONTROL.search(preview):
        raise BadRequest("push_preview has control characters")
    return preview


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a push may go to `address`: a global one, also when it is an IPv4 address in
    IPv6 clothes (mapped `::ffff:a.b.c.d`, or NAT64 `64:ff9b::a.b.c.d`, which
    `ipaddress` calls global whatever IPv4 address it carries)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_global
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF).is_global
    return address.is_global


def _is_hex(value: str) -> bool:
    return _HEX.fullmatch(value) is not None  # bytes.fromhex would let whitespace in


def _b64url(value: str, name: str) -> bytes:
    if _BASE64URL.fullmatch(value) is None:  # the decoder would drop foreign characters
        raise BadRequest(f"`{name}` is not base64url")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"`{name}` is not base64url") from exc


def _check_url(value: str, name: str) -> None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parses the port: a bad one raises here, not in a sender
    except ValueError:
        raise BadRequest(f"`{name}` is not a valid URL") from None
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise BadRequest(f"`{name}` must be an https URL")
    if not parts.hostname:
        raise BadRequest(f"`{name}` has no host")


class PushNotification(msgspec.Struct, frozen=True, kw_only=True):
    """What one push says (every sender renders it in its platform's payload)."""

    device: str
    chat: str
    #: The user's unread messages in the chat (at most `MAX_COUNT`), plus 1 for an invitation
    #: into it: a burst is one push that says how many.
    count: int
    #: The device's unread total (inbox entries it has not acked), for the app icon.
    badge: int
    #: Per chat: a newer push of the same chat replaces an undelivered older one.
    collapse_key: str
    title: str = "New message"
    #: Only when the recipient allows names in pushes.
    sender_name: str | None = None
    #: The `push_preview` the sender attached to the newest message counted (opaque to the
    #: server: an encrypted one in end-to-end encrypted chats), if any.
    preview: str | None = None


class PushOutcome(msgspec.Struct, frozen=True):
    """How a gateway answered one push.

    `sent`: accepted. `retry`: try again later (429, 5xx, a network error), after `retry_after`
    seconds when the gateway said so. `gone`: the target is permanently invalid (FCM
    `UNREGISTERED`/404, APNs 410/`BadDeviceToken`, Web Push 404/410): it is removed.
    """

    result: Literal["sent", "retry", "gone"]
    detail: str = ""
    retry_after: float | None = None


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A `Retry-After` header (seconds, or an HTTP date) as seconds from `now` (epoch s)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - now)
