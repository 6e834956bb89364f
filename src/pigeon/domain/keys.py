"""End-to-end encryption as the server sees it: public keys, claims and opaque envelopes.

Why this module exists: the server is a directory and a mailbox for end-to-end encryption, never
a party to it. Devices publish public keys (Curve25519 for Olm sessions, Ed25519 to sign their
own key bundle), others claim one-time keys to start sessions, and ciphertext travels in
envelopes. Everything here is checked for *shape and size only*: the server verifies no
signature and decrypts nothing (a client verifies the signature of a bundle against the
Ed25519 key it trusts). Keys, signatures and ciphertexts are base64 text, as vodozemac writes
them (unpadded standard base64; padded or URL-safe base64 is accepted too).
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from typing import Literal

import msgspec

from pigeon.domain.errors import BadRequest, TooLarge

#: What a device-list change announces: a device logged in (`added`), published its identity
#: keys (`keys`: now it can be encrypted for), or was revoked (`removed`).
DeviceChange = Literal["added", "keys", "removed"]

_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
#: Key ids and algorithm names: short printable ASCII, no spaces.
_TOKEN = re.compile(r"[\x21-\x7e]{1,64}")
_SESSION = re.compile(r"[\x21-\x7e]{1,256}")


class KeyLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Sizes and counts of what a device may publish and send (`e2e` settings)."""

    #: One-time keys a device may hold on the server at once.
    max_one_time_keys: int = 100
    #: Decoded size of a public key (Curve25519 and Ed25519 keys are 32 bytes).
    key_bytes: int = 32
    #: Decoded size of a signature (Ed25519: 64 bytes).
    signature_bytes: int = 64
    #: The signed key bundle, as the device sent it (UTF-8 bytes).
    max_bundle_bytes: int = 4096
    #: One to-device payload (UTF-8 bytes).
    max_to_device_bytes: int = 64 * 1024
    #: The ciphertext of one encrypted message (base64 characters).
    max_ciphertext_bytes: int = 96 * 1024
    #: Users in one `keys_query`, devices in one `keys_claim` or `send_to_device`.
    max_targets: int = 1000


class DeviceIdentity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A device's long-term public keys and its Ed25519 signature over `bundle` (the bundle's
    exact text, typically canonical JSON naming the user, the device and both keys). Stored
    and served as given: verifying the signature is each client's job."""

    curve25519: str
    ed25519: str
    bundle: str
    signature: str


class OneTimeKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Curve25519 key that starts one Olm session (or the device's fallback key), signed by
    the device's Ed25519 key. `id` is the device's own name for it (unique per device)."""

    id: str
    key: str
    signature: str


class KeyCounts(msgspec.Struct, frozen=True, kw_only=True):
    """What a device holds on the server: the `keys_upload` reply, so it knows when to top
    up (and when to replace a fallback key that was handed out)."""

    one_time_keys: int
    max_one_time_keys: int
    #: A fallback key is stored.
    fallback_key: bool
    #: It was handed out at least once since it was uploaded: upload a new one.
    fallback_used: bool


class DeviceKeys(msgspec.Struct, frozen=True, kw_only=True):
    """One device in a `keys_query` reply: its identity keys, or null until it publishes
    them (such a device cannot be encrypted for yet)."""

    user: str
    device: str
    identity: DeviceIdentity | None


class ClaimedKey(msgspec.Struct, frozen=True, kw_only=True):
    """A key taken for one device by `keys_claim`: a one-time key (nobody else gets it) or,
    when those ran out, the device's fallback key (`fallback: true`, may be handed out again)."""

    user: str
    device: str
    id: str
    key: str
    signature: str
    fallback: bool = False


class E2EEnvelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An encrypted message body (e.g. Megolm): which algorithm, the sender device's Curve25519
    key, the session it was encrypted in, and the ciphertext. Stored and forwarded like a body
    and erased like one once delivered; the server reads none of it."""

    algorithm: str
    sender_key: str
    session_id: str
    ciphertext: str


def _decoded_size(text: str, what: str) -> int:
    if not _BASE64.fullmatch(text):
        raise BadRequest(f"{what} must be base64")
    body = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return len(b64decode(body + "=" * (-len(body) % 4), validate=True))
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} must be base64") from None


def check_key(text: str, limits: KeyLimits, what: str) -> None:
    """A public key of exactly `key_bytes` bytes, in base64."""
    if len(text) > 4 * limits.key_bytes or _decoded_size(text, what) != limits.key_bytes:
        raise BadRequest(f"{what} must be {limits.key_bytes} bytes in base64")


def check_signature(text: str, limits: KeyLimits, what: str = "signature") -> None:
    """A signature of exactly `signature_bytes` bytes, in base64."""
    size = limits.signature_bytes
    if len(text) > 4 * size or _decoded_size(text, what) != size:
        raise BadRequest(f"{what} must be {size} bytes in base64")


def check_identity(identity: DeviceIdentity, limits: KeyLimits) -> None:
    """The shape and sizes of a device's identity keys (never the signature's validity)."""
    check_key(identity.curve25519, limits, "identity.curve25519")
    check_key(identity.ed25519, limits, "identity.ed25519")
    check_signature(identity.signature, limits, "identity.signature")
    if not identity.bundle or len(identity.bundle.encode()) > limits.max_bundle_bytes:
        raise BadRequest(f"identity.bundle must be 1 to {limits.max_bundle_bytes} bytes")


def check_one_time_key(key: OneTimeKey, limits: KeyLimits, what: str) -> None:
    """The shape and sizes of a one-time or fallback key."""
    if not _TOKEN.fullmatch(key.id):
        raise BadRequest(f"{what}.id must be 1 to 64 printable ASCII characters")
    check_key(key.key, limits, f"{what}.key")
    check_signature(key.signature, limits, f"{what}.signature")


def check_envelope(envelope: E2EEnvelope, limits: KeyLimits) -> None:
    """An encrypted message's shape: a named algorithm, the sender's Curve25519 key, a session
    id, and base64 ciphertext within `max_ciphertext_bytes`."""
    if not _TOKEN.fullmatch(envelope.algorithm):
        raise BadRequest("e2e.algorithm must be 1 to 64 printable ASCII characters")
    check_key(envelope.sender_key, limits, "e2e.sender_key")
    if not _SESSION.fullmatch(envelope.session_id):
        raise BadRequest("e2e.session_id must be 1 to 256 printable ASCII characters")
    if len(envelope.ciphertext) > limits.max_ciphertext_bytes:
        raise TooLarge(f"e2e.ciphertext exceeds {limits.max_ciphertext_bytes} bytes")
    if not envelope.ciphertext:
        raise BadRequest("e2e.ciphertext must not be empty")
    _decoded_size(envelope.ciphertext, "e2e.ciphertext")


def check_payload(payload: str, limits: KeyLimits) -> int:
    """A to-device payload within `max_to_device_bytes`; returns its UTF-8 size."""
    size = len(payload.encode())
    if size > limits.max_to_device_bytes:
        raise TooLarge(f"a to-device payload exceeds {limits.max_to_device_bytes} bytes")
    if not payload:
        raise BadRequest("a to-device payload must not be empty")
    return size
