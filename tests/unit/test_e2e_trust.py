"""Safety numbers and key continuity (pigeon.client.e2e.trust): the number is the same for
both users and stable, a known device whose identity key changes is reported, and a revoked
device is never trusted again, whatever keys it comes back with."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from pigeon.client.e2e import (
    CryptoStore,
    DeviceInfo,
    DeviceRevoked,
    IdentityKeyChanged,
    KnownDevices,
    KnownKeys,
    NewDevice,
    safety_number,
)
from tests.support.e2e_devices import Directory, new_device

A1 = "ZvROFs7Yw4gsGGpj2cz2cQjZYKK4437esktSoSiAVBw"
A2 = "QdasD9DVujVUHxRsVdvcg5I4Zbq5sggsZJWFxg5afFM"
B1 = "vQ2nk8bB7X1cS8a0w9Ua6FzUqvJ4dC1kR2JX2mEoYeE"


def test_both_users_get_the_same_human_comparable_number() -> None:
    ab = safety_number("alice", [A1, A2], "bob", [B1])
    assert ab == safety_number("bob", [B1], "alice", [A2, A1])  # either order, either side
    assert re.fullmatch(r"(\d{5} ){11}\d{5}", ab)


def test_the_number_is_stable_and_tracks_every_key() -> None:
    ab = safety_number("alice", [A1, A2], "bob", [B1])
    assert ab == safety_number("alice", [A1, A2, A1], "bob", [B1])  # a repeated key
    # A golden value: the number must not change between versions of the SDK.
    golden = "70406 10429 39483 79055 84738 40525 72463 00946 99183 80332 29993 60740"
    assert ab == golden
    assert ab != safety_number("alice", [A1], "bob", [B1])  # a device less
    assert ab != safety_number("alice", [A1, B1], "bob", [A2])  # keys swapped between users
    assert ab != safety_number("alice", [A1, A2], "carol", [B1])  # another user id


def test_a_changed_identity_key_of_a_known_device_is_reported(tmp_path: Path) -> None:
    directory = Directory()
    bob = new_device(tmp_path, directory, "bob").info
    known = KnownDevices()
    assert known.check(bob) == NewDevice(device=bob)
    assert known.check(bob) == KnownKeys(device=bob)
    impostor = CryptoStore.create(tmp_path / "x", bytes(32), user="bob", device=bob.device).me
    change = known.check(impostor)
    assert change == IdentityKeyChanged(known=bob, new=impostor)
    assert known.get("bob", bob.device) == bob  # still the trusted keys
    known.accept(impostor)
    assert known.check(impostor) == KnownKeys(device=impostor)
    known.forget("bob", bob.device)
    assert known.get("bob", bob.device) is None


def test_known_devices_are_kept_in_the_store(tmp_path: Path) -> None:
    directory = Directory()
    alice = new_device(tmp_path, directory, "alice")
    bob = new_device(tmp_path, directory, "bob")
    alice.store.devices.check(bob.info)
    alice.store.save()
    reopened = CryptoStore.open(alice.store.path, bytes(32))
    assert reopened.devices.of_user("bob") == [bob.info]
    moved = msgspec.structs.replace(bob.info, curve25519=alice.info.curve25519)
    assert isinstance(reopened.devices.check(moved), IdentityKeyChanged)


def test_a_revoked_device_is_never_trusted_again(tmp_path: Path) -> None:
    directory = Directory()
    bob = new_device(tmp_path, directory, "bob").info
    known = KnownDevices()
    known.check(bob)
    assert known.revoke("bob", bob.device) == bob
    assert known.is_revoked("bob", bob.device) and known.get("bob", bob.device) is None
    assert known.check(bob) == IdentityKeyChanged(known=bob, new=bob, revoked=True)  # same keys
    impostor = CryptoStore.create(tmp_path / "x", bytes(32), user="bob", device=bob.device).me
    assert known.check(impostor) == IdentityKeyChanged(known=bob, new=impostor, revoked=True)
    with pytest.raises(DeviceRevoked) as caught:
        known.accept(impostor)
    assert caught.value.code == "e2e_device_revoked"
    assert known.get("bob", bob.device) is None and known.of_user("bob") == []
    known.revoke("bob", bob.device)  # told twice: the keys it had are kept
    assert known.revoked() == [bob]


def test_a_device_revoked_before_its_keys_were_seen_is_refused_too(tmp_path: Path) -> None:
    bob = new_device(tmp_path, Directory(), "bob").info
    known = KnownDevices()
    unseen = DeviceInfo(user="bob", device=bob.device, curve25519="", ed25519="")
    assert known.revoke("bob", bob.device) == unseen
    assert known.check(bob) == IdentityKeyChanged(known=unseen, new=bob, revoked=True)


def test_tombstones_are_kept_in_the_store(tmp_path: Path) -> None:
    directory = Directory()
    alice = new_device(tmp_path, directory, "alice")
    bob = new_device(tmp_path, directory, "bob")
    alice.store.devices.check(bob.info)
    alice.store.devices.revoke("bob", bob.info.device)
    alice.store.save()
    reopened = CryptoStore.open(alice.store.path, bytes(32))
    assert reopened.devices.is_revoked("bob", bob.info.device)
    assert reopened.devices.get("bob", bob.info.device) is None
    check = reopened.devices.check(bob.info)
    assert isinstance(check, IdentityKeyChanged) and check.revoked
