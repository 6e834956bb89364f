"""A device's key bundles: what it publishes, and how a peer's published keys are verified.

Why this module exists: the server is a directory that checks shapes only (docs/protocol.md,
"End-to-end encryption"); anything it hands out may be forged. So a device signs what it
publishes with its Ed25519 identity key, and everyone verifies before encrypting to it:
- the *device bundle* is canonical JSON naming the user, the device and both identity keys,
  signed as those exact bytes (the server stores the text as given);
- every one-time and fallback key is signed together with its id, owner and kind, so a key
  cannot be moved to another device or passed off as a one-time key.

The structs have the field names of the upload, query and claim shapes, so
`msgspec.to_builtins(...)` is what goes on the wire.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import msgspec
import vodozemac

from pigeon.client.e2e.errors import InvalidSignature

#: Name of the Olm algorithm in to-device payloads, and of Megolm in message envelopes.
OLM_ALGORITHM = "pigeon.olm.v1"
MEGOLM_ALGORITHM = "pigeon.megolm.v1"


def canonical_json(value: Any) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64encode(data: bytes) -> str:
    """Unpadded standard base64, as vodozemac writes it."""
    return base64.b64encode(data).decode().rstrip("=")


def b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not. Raises `ValueError` on anything else."""
    body = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None


class DeviceIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """A device's identity keys as uploaded once (`keys_upload.identity`) and served by
    `keys_query`: both public keys, the signed bundle text and its Ed25519 signature."""

    curve25519: str
    ed25519: str
    bundle: str
    signature: str


class SignedKey(msgspec.Struct, frozen=True, kw_only=True):
    """A one-time or fallback Curve25519 key with its Ed25519 signature (see `key_payload`)."""

    id: str
    key: str
    signature: str


class KeysUpload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One `keys_upload` command's keys; fields left out are not sent."""

    identity: DeviceIdentity | None = None
    one_time_keys: list[SignedKey] = []
    fallback_key: SignedKey | None = None


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A device whose identity keys were verified (`verify_identity`), or this device itself:
    the only form in which a peer is handed to Olm and Megolm."""

    user: str
    device: str
    curve25519: str
    ed25519: str


def bundle_text(user: str, device: str, curve25519: str, ed25519: str) -> str:
    """The canonical text of a device bundle, as signed."""
    body = {"curve25519": curve25519, "device": device, "ed25519": ed25519, "user": user}
    return canonical_json(body).decode()


def key_payload(owner: DeviceInfo, key_id: str, key: str, *, fallback: bool) -> bytes:
    """What a one-time or fallback key's signature covers."""
    body = {
        "device": owner.device,
        "fallback": fallback,
        "id": key_id,
        "key": key,
        "user": owner.user,
    }
    return canonical_json(body)


def own_device(account: vodozemac.Account, user: str, device: str) -> DeviceInfo:
    """This device, described by its account's identity keys."""
    return DeviceInfo(
        user=user,
        device=device,
        curve25519=account.curve25519_key.to_base64(),
        ed25519=account.ed25519_key.to_base64(),
    )


def signed_identity(account: vodozemac.Account, user: str, device: str) -> DeviceIdentity:
    """This device's identity keys and their signed bundle, for `keys_upload.identity`."""
    me = own_device(account, user, device)
    text = bundle_text(user, device, me.curve25519, me.ed25519)
    return DeviceIdentity(
        curve25519=me.curve25519,
        ed25519=me.ed25519,
        bundle=text,
        signature=account.sign(text.encode()).to_base64(),
    )


def _sign_keys(
    account: vodozemac.Account,
    me: DeviceInfo,
    keys: dict[str, vodozemac.Curve25519PublicKey],
    *,
    fallback: bool,
) -> list[SignedKey]:
    out = []
    for key_id, public in sorted(keys.items()):
        text = public.to_base64()
        signature = account.sign(key_payload(me, key_id, text, fallback=fallback))
        out.append(SignedKey(id=key_id, key=text, signature=signature.to_base64()))
    return out


def _fallback_key(account: vodozemac.Account) -> dict[str, vodozemac.Curve25519PublicKey]:
    """The unpublished fallback key, by id (vodozemac 0.10's type stubs omit this property)."""
    keys: dict[str, vodozemac.Curve25519PublicKey] = account.fallback_key  # type: ignore[attr-defined]
    return keys


def one_time_keys_to_generate(on_server: int, target: int, account_max: int) -> int:
    """How many one-time keys to generate so that the server holds `target` again.

    The target is capped at the number vodozemac advises keeping on the server
    (`max_number_of_one_time_keys`, 50): the account keeps the private halves of a bounded
    number of keys and drops the oldest, and staying within its advice keeps every key the
    server hands out one that this device can still accept."""
    return max(0, min(target, account_max) - max(0, on_server))


def prepare_upload(
    account: vodozemac.Account,
    user: str,
    device: str,
    *,
    on_server: int,
    target: int,
    new_fallback: bool,
    with_identity: bool = False,
) -> KeysUpload:
    """Generate and sign what the server lacks: one-time keys up to `target` (given how many it
    reports), a fallback key when it has none or handed it out (`new_fallback`), and the
    identity (first upload). Call `account.mark_keys_as_published()` and save the store once
    the server accepted it; until then a retry sends the same keys again (idempotent)."""
    me = own_device(account, user, device)
    wanted = one_time_keys_to_generate(
        on_server, target, account.max_number_of_one_time_keys
    ) - len(account.one_time_keys)
    if wanted > 0:
        account.generate_one_time_keys(wanted)
    if new_fallback and not _fallback_key(account):
        account.generate_fallback_key()  # type: ignore[attr-defined]
    fallback = _sign_keys(account, me, _fallback_key(account), fallback=True)
    return KeysUpload(
        identity=signed_identity(account, user, device) if with_identity else None,
        one_time_keys=_sign_keys(account, me, account.one_time_keys, fallback=False),
        fallback_key=fallback[0] if fallback else None,
    )


def _verify(ed25519: str, message: bytes, signature: str, what: str) -> None:
    try:
        key = vodozemac.Ed25519PublicKey.from_base64(ed25519)
        key.verify_signature(message, vodozemac.Ed25519Signature.from_base64(signature))
    except (vodozemac.KeyException, vodozemac.SignatureException, ValueError) as exc:
        raise InvalidSignature(f"{what}: {exc}") from None


def verify_identity(identity: DeviceIdentity, user: str, device: str) -> DeviceInfo:
    """Check a device's published identity (from `keys_query`): the bundle is signed by its own
    Ed25519 key and names exactly this user, this device and these two keys. Raises
    `InvalidSignature` otherwise (a server that swaps keys or bundles is caught here)."""
    _verify(identity.ed25519, identity.bundle.encode(), identity.signature, "device bundle")
    expected = bundle_text(user, device, identity.curve25519, identity.ed25519)
    try:
        named = canonical_json(json.loads(identity.bundle)).decode()
    except ValueError:
        raise InvalidSignature("device bundle is not JSON") from None
    if named != expected:
        raise InvalidSignature(f"device bundle does not describe {user}/{device} and its keys")
    return DeviceInfo(
        user=user, device=device, curve25519=identity.curve25519, ed25519=identity.ed25519
    )


def verify_claimed_key(
    owner: DeviceInfo, key_id: str, key: str, signature: str, *, fallback: bool
) -> None:
    """Check a key from `keys_claim` against its (verified) owner before starting an Olm
    session with it. Raises `InvalidSignature`."""
    _verify(owner.ed25519, key_payload(owner, key_id, key, fallback=fallback), signature, "key")
