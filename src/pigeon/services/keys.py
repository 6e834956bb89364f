"""The key directory of end-to-end encryption, device-list announcements and to-device messages.

Why a service of its own: these are the rules the server keeps while knowing no plaintext.
Devices publish public keys whose shape and size are checked here (never their signatures:
clients verify those); only people who share a chat may read someone's device list and keys,
take their one-time keys or write to their devices' inboxes (`services.peers`, the same rule
as presence); uploads, queries and claims spend rate limits of their own (`Throttle`), and
to-device writes the send limits. The store does the atomic parts (`KeyStore`); every inbox
entry it writes is pushed by the fan-out after commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pigeon.domain.errors import BadRequest, TooManyKeys
from pigeon.domain.events import Delivery
from pigeon.domain.ids import is_id
from pigeon.domain.keys import (
    ClaimedKey,
    DeviceChange,
    DeviceIdentity,
    DeviceKeys,
    KeyCounts,
    KeyLimits,
    OneTimeKey,
    check_identity,
    check_one_time_key,
    check_payload,
)
from pigeon.domain.models import Device
from pigeon.ports import ChatStore, Clock, KeyStore
from pigeon.services.fanout import Fanout
from pigeon.services.peers import require_peers
from pigeon.services.throttle import Throttle

_STRANGERS = "keys and devices are visible only to people who share a chat"


def _second(result: tuple[Any, list[Delivery]]) -> list[Delivery]:
    return result[1]


def _same(deliveries: list[Delivery]) -> list[Delivery]:
    return deliveries


class KeyService:
    """Uploads, queries and claims of device keys; announcements of device-list changes;
    to-device messages."""

    def __init__(
        self,
        keys: KeyStore,
        chats: ChatStore,
        fanout: Fanout,
        clock: Clock,
        limits: KeyLimits,
        throttle: Throttle | None = None,
    ) -> None:
        self._keys = keys
        self._chats = chats
        self._fanout = fanout
        self._clock = clock
        self._limits = limits
        self._throttle = throttle

    async def upload(
        self,
        device: Device,
        identity: DeviceIdentity | None,
        one_time_keys: list[OneTimeKey],
        fallback: OneTimeKey | None,
    ) -> KeyCounts:
        """Publish the device's identity keys (once), add one-time keys, replace the fallback
        key; with nothing to upload, only tell what the device holds."""
        limits = self._limits
        if identity is not None:
            check_identity(identity, limits)
        for k in one_time_keys:
            check_one_time_key(k, limits, "one_time_keys[]")
        if fallback is not None:
            check_one_time_key(fallback, limits, "fallback_key")
        if len({k.id for k in one_time_keys}) != len(one_time_keys):
            raise BadRequest("one-time key ids must be distinct")
        if len(one_time_keys) > limits.max_one_time_keys:
            raise TooManyKeys(f"a device holds at most {limits.max_one_time_keys} one-time keys")
        if self._throttle is not None:
            await self._throttle.key_uploads(device.id)
        if identity is None and not one_time_keys and fallback is None:
            counts = await self._keys.counts(device.id)
        else:
            change = self._keys.upload(
                device,
                identity,
                one_time_keys,
                fallback,
                limits.max_one_time_keys,
                self._clock.now_ms(),
            )
            counts, _ = await self._fanout.commit(change, _second)
        return KeyCounts(
            one_time_keys=counts.one_time_keys,
            max_one_time_keys=limits.max_one_time_keys,
            fallback_key=counts.fallback_key,
            fallback_used=counts.fallback_used,
        )

    async def query(self, device: Device, users: list[str]) -> list[DeviceKeys]:
        """The devices, with their identity keys, of the caller or people who share a chat
        with them; `Forbidden` if any other user is asked for."""
        users = self._targets(users, "users", "user ids")
        if self._throttle is not None:
            await self._throttle.key_queries(device.id)
        await require_peers(self._chats, device.user_id, users, _STRANGERS)
        return await self._keys.query(users)

    async def claim(self, device: Device, devices: list[str]) -> list[ClaimedKey]:
        """One key for each named device (a one-time key, else its fallback key). Devices that
        no longer exist are left out. A device whose keys the caller's user took too often
        lately (`Throttle.key_claims`) gets its fallback key instead of a one-time key: the
        claimer can still start a session (with weaker forward secrecy for its first
        message), and the device's one-time keys stay for everyone else. A device of someone
        who shares no chat with the caller is `Forbidden` (and nothing is taken)."""
        devices = self._targets(devices, "devices", "device ids")
        owners = await self._keys.owners(devices)
        await require_peers(self._chats, device.user_id, list(owners.values()), _STRANGERS)
        targets = [d for d in devices if d in owners]
        if not targets:
            return []
        fallback_only: frozenset[str] = frozenset()
        if self._throttle is not None:
            within = await self._throttle.key_claims(device, targets)
            fallback_only = frozenset(targets).difference(within)
        change = self._keys.claim(targets, self._clock.now_ms(), fallback_only=fallback_only)
        claimed, _ = await self._fanout.commit(change, _second)
        return claimed

    async def send_to_device(
        self, device: Device, messages: Sequence[tuple[str, str]]
    ) -> list[str]:
        """Write each payload into the named device's inbox (the caller's own devices, or
        those of people who share a chat with the caller). Spends the send rate limits (one
        message and the payloads' bytes). Returns the devices that no longer exist (nothing
        was written for them)."""
        if not messages:
            raise BadRequest("messages must not be empty")
        targets = self._targets([d for d, _ in messages], "messages", "device ids")
        if len(targets) != len(messages):
            raise BadRequest("each device may be named once")
        size = sum(check_payload(payload, self._limits) for _, payload in messages)
        if self._throttle is not None:
            await self._throttle.send(device, size)
        owners = await self._keys.owners(targets)
        await require_peers(self._chats, device.user_id, list(owners.values()), _STRANGERS)
        present = [(d, p) for d, p in messages if d in owners]
        if present:
            change = self._keys.to_device(device, present, self._clock.now_ms())
            await self._fanout.commit(change, _same)
        return [d for d in targets if d not in owners]

    async def device_changed(self, user_id: str, device_id: str, change: DeviceChange) -> None:
        """Tell everyone sharing a chat with the user, and the user's other devices, that a
        device was added or revoked (committed already: this is its announcement)."""
        announcement = self._keys.announce(user_id, device_id, change, self._clock.now_ms())
        await self._fanout.commit(announcement, _same)

    def _targets(self, ids: list[str], field: str, what: str) -> list[str]:
        unique = list(dict.fromkeys(ids))
        if not unique or not all(is_id(i) for i in unique):
            raise BadRequest(f"{field} must be a non-empty list of {what}")
        if len(unique) > self._limits.max_targets:
            raise BadRequest(f"at most {self._limits.max_targets} {what} per request")
        return unique
