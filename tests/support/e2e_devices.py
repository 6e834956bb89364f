"""Simulated devices for the unit tests of the SDK's E2E core: real vodozemac, real key
stores in a temporary directory, and an in-process stand-in for the server's key directory
and to-device mailbox (no server, no network)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from pigeon.client.e2e import (
    CryptoStore,
    DeviceIdentity,
    DeviceInfo,
    Envelope,
    RotationPolicy,
    SignedKey,
    verify_identity,
)


class FakeClock:
    """A clock the tests move by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Directory:
    """What the server keeps: identities, one-time keys (taken once) and fallback keys."""

    identities: dict[tuple[str, str], DeviceIdentity] = field(default_factory=dict)
    one_time: dict[str, list[SignedKey]] = field(default_factory=dict)
    fallback: dict[str, SignedKey] = field(default_factory=dict)
    fallback_used: dict[str, bool] = field(default_factory=dict)

    def upload(self, store: CryptoStore, target: int = 5) -> None:
        """One `keys_upload` round: the device tops up to `target` and publishes."""
        me = store.me
        first = (me.user, me.device) not in self.identities
        keys = store.keys_to_upload(
            on_server=len(self.one_time.get(me.device, [])),
            target=target,
            fallback_needed=me.device not in self.fallback or self.fallback_used[me.device],
            first=first,
        )
        if keys.identity is not None:
            self.identities[(me.user, me.device)] = keys.identity
        self.one_time.setdefault(me.device, []).extend(keys.one_time_keys)
        if keys.fallback_key is not None:
            self.fallback[me.device] = keys.fallback_key
            self.fallback_used[me.device] = False
        store.keys_published()

    def query(self, user: str, device: str) -> DeviceInfo:
        """`keys_query` for one device, verified as a client must."""
        return verify_identity(self.identities[(user, device)], user, device)

    def claim(self, device: str) -> tuple[SignedKey, bool]:
        """`keys_claim`: a one-time key taken for good, else the fallback key."""
        if self.one_time.get(device):
            return self.one_time[device].pop(0), False
        self.fallback_used[device] = True
        return self.fallback[device], True


@dataclass
class Device:
    """A device: its key store and the directory it publishes to."""

    store: CryptoStore
    directory: Directory

    @property
    def info(self) -> DeviceInfo:
        return self.store.me

    def ensure_session(self, peer: DeviceInfo) -> None:
        """Claim a key of `peer` and start an Olm session with it, if none yet."""
        if not self.store.olm.has_session(peer):
            key, fallback = self.directory.claim(peer.device)
            self.store.olm.start(peer, key.id, key.key, key.signature, fallback=fallback)

    def send_to_device(self, peer: Device, content: dict[str, Any]) -> str:
        """Encrypt `content` for `peer` over Olm (claiming a key if needed): the payload."""
        self.ensure_session(peer.info)
        return self.store.olm.encrypt(peer.info, content)

    def send(self, chat: str, members: list[Device], content: dict[str, Any]) -> Envelope:
        """What the SDK will do on `send()`: share the room key with member devices that lack
        it (Olm, delivered at once), then encrypt the message."""
        for peer_info, room_key in self.store.groups.share(chat, [m.info for m in members]):
            peer = next(m for m in members if m.info == peer_info)
            payload = self.send_to_device(peer, msgspec.to_builtins(room_key))
            peer.receive_to_device(self.info, payload)
        return self.store.groups.encrypt(chat, content)

    def receive_to_device(self, sender: DeviceInfo, payload: str) -> None:
        content = self.store.olm.decrypt(sender, payload)
        assert self.store.groups.import_room_key(sender, content) is not None


def new_device(
    tmp: Path,
    directory: Directory,
    user: str,
    *,
    policy: RotationPolicy | None = None,
    clock: FakeClock | None = None,
    key: bytes | None = None,
) -> Device:
    """A freshly logged-in device of `user` that published its keys."""
    device = f"{user}-dev-{secrets.token_hex(3)}"
    store = CryptoStore.create(
        tmp / f"{device}.keys",
        key or bytes(32),
        user=user,
        device=device,
        policy=policy,
        clock=clock or FakeClock(),
    )
    directory.upload(store)
    return Device(store=store, directory=directory)
