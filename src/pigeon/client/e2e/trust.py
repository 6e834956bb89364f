"""Safety numbers, and the identity keys this device has seen for each of its peers' devices.

Why it exists: the server hands out the keys, so a malicious or compromised server could hand
out keys of a device it made up. Two defences, both on the client:
- **safety numbers**: two people compare (read out, or scan) a number derived from both users'
  device identity keys; if the server swapped a key, their numbers differ;
- **key continuity**: a device id whose identity key changes is never silently accepted (a
  device's keys never change: a reinstalled app logs in as a new device), so `KnownDevices`
  reports the change as `IdentityKeyChanged` and keeps trusting the keys it knew until the
  application accepts the new ones;
- **revocation is final**: a revoked device leaves a tombstone (its id and the identity keys
  last trusted for it). Device ids are never reused, so a device id that comes back, with the
  same keys or others, is a server replaying or forging it: `check` reports it as
  `IdentityKeyChanged(revoked=True)` and it is never trusted again (`accept` refuses it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

from pigeon.client.e2e.errors import DeviceRevoked
from pigeon.client.e2e.keys import DeviceInfo, b64decode

#: Rounds of SHA-512 per side: makes finding keys that give a chosen number costlier.
SAFETY_ROUNDS = 5200
_VERSION = b"pigeon-safety-number-v1\x00"


def _side(user: str, ed25519_keys: Iterable[str]) -> str:
    keys = b"".join(sorted(b64decode(key) for key in set(ed25519_keys)))
    digest = hashlib.sha512(_VERSION + user.encode() + b"\x00" + keys).digest()
    for _ in range(SAFETY_ROUNDS):
        digest = hashlib.sha512(digest + keys).digest()
    # 30 digits: six groups of five, each from five bytes of the digest.
    groups = (int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 30, 5))
    return "".join(f"{group:05d}" for group in groups)


def safety_number(user_a: str, keys_a: Iterable[str], user_b: str, keys_b: Iterable[str]) -> str:
    """The 60-digit number (12 groups of 5, space-separated) that users A and B compare, from
    the Ed25519 identity keys of all their devices. The same for both of them (the order of the
    two users does not matter) and stable (the order of the keys does not matter); it changes
    when either user's set of device keys does."""
    halves = sorted([_side(user_a, keys_a), _side(user_b, keys_b)])
    digits = "".join(halves)
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


class NewDevice(msgspec.Struct, frozen=True, kw_only=True):
    """A device seen for the first time; its keys are now the ones expected of it."""

    device: DeviceInfo


class KnownKeys(msgspec.Struct, frozen=True, kw_only=True):
    """The device's keys are those seen before."""

    device: DeviceInfo


class IdentityKeyChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A known device now has other identity keys: warn the user. `known` stays the trusted
    one until `KnownDevices.accept(new)`; do not encrypt to `new` before.

    With `revoked`, the device was revoked and its id is announced again (with the keys it had
    or others): never trusted again, whatever the application accepts. `known` then holds the
    keys it had when revoked (empty strings if this device never saw them)."""

    known: DeviceInfo
    new: DeviceInfo
    revoked: bool = False


KeyCheck = NewDevice | KnownKeys | IdentityKeyChanged


class KnownDevices:
    """The identity keys first seen for each (user, device): trust on first use; and the
    tombstones of revoked devices, never trusted again."""

    def __init__(
        self, devices: Iterable[DeviceInfo] = (), revoked: Iterable[DeviceInfo] = ()
    ) -> None:
        self._devices = {(d.user, d.device): d for d in devices}
        self._revoked = {(d.user, d.device): d for d in revoked}
        for where in self._revoked:
            self._devices.pop(where, None)

    def check(self, device: DeviceInfo) -> KeyCheck:
        """Compare a device from `keys_query` (verified) with what was seen before; a new one
        is remembered. A revoked one is `IdentityKeyChanged(revoked=True)`, keys alike or not."""
        tombstone = self._revoked.get((device.user, device.device))
        if tombstone is not None:
            return IdentityKeyChanged(known=tombstone, new=device, revoked=True)
        known = self._devices.get((device.user, device.device))
        if known is None:
            self._devices[(device.user, device.device)] = device
            return NewDevice(device=device)
        if (known.curve25519, known.ed25519) == (device.curve25519, device.ed25519):
            return KnownKeys(device=known)
        return IdentityKeyChanged(known=known, new=device)

    def accept(self, device: DeviceInfo) -> None:
        """Trust these keys for the device from now on (the user accepted a change).
        `DeviceRevoked` for a revoked device: revocation is final."""
        if (device.user, device.device) in self._revoked:
            raise DeviceRevoked(f"{device.user}/{device.device} was revoked")
        self._devices[(device.user, device.device)] = device

    def forget(self, user: str, device: str) -> None:
        """Drop what is known of the device, leaving no tombstone (it may be met anew)."""
        self._devices.pop((user, device), None)

    def revoke(self, user: str, device: str) -> DeviceInfo:
        """The device was revoked: its keys are no longer trusted and a tombstone (its id and
        the keys last trusted for it, or empty ones if none were seen) is kept for good, so
        that the id is refused if it is ever announced again. Returns the tombstone."""
        where = (user, device)
        known = self._devices.pop(where, None)
        tombstone = self._revoked.get(where) or known
        if tombstone is None:
            tombstone = DeviceInfo(user=user, device=device, curve25519="", ed25519="")
        self._revoked[where] = tombstone
        return tombstone

    def is_revoked(self, user: str, device: str) -> bool:
        """Whether the device was revoked (a tombstone is kept for it)."""
        return (user, device) in self._revoked

    def revoked(self) -> list[DeviceInfo]:
        """Every tombstone (for the store)."""
        return list(self._revoked.values())

    def get(self, user: str, device: str) -> DeviceInfo | None:
        """The trusted keys of a device, if it was seen."""
        return self._devices.get((user, device))

    def of_user(self, user: str) -> list[DeviceInfo]:
        """The known devices of a user (for `safety_number`)."""
        return [d for (u, _), d in sorted(self._devices.items()) if u == user]

    def all(self) -> list[DeviceInfo]:
        """Every known device (for the store)."""
        return list(self._devices.values())
