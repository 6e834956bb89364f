"""The key bundles a device publishes and how a peer's are verified (pigeon.client.e2e.keys):
a bundle or key that the server altered, or moved to another device, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from pigeon.client.e2e import (
    CryptoStore,
    DeviceIdentity,
    InvalidSignature,
    one_time_keys_to_generate,
    verify_claimed_key,
    verify_identity,
)
from pigeon.domain import keys as server_keys
from tests.support.e2e_devices import Directory, new_device


@pytest.fixture
def store(tmp_path: Path) -> CryptoStore:
    return CryptoStore.create(tmp_path / "k", bytes(32), user="alice", device="phone")


def test_the_identity_verifies_and_names_its_device(store: CryptoStore) -> None:
    upload = store.keys_to_upload(on_server=0, target=3, fallback_needed=True, first=True)
    assert upload.identity is not None
    bundle = json.loads(upload.identity.bundle)
    assert bundle == {
        "curve25519": store.me.curve25519,
        "device": "phone",
        "ed25519": store.me.ed25519,
        "user": "alice",
    }
    assert verify_identity(upload.identity, "alice", "phone") == store.me


@pytest.mark.parametrize(
    ("user", "device", "change"),
    [
        ("mallory", "phone", {}),  # served as someone else's device
        ("alice", "laptop", {}),  # as another device of hers
        ("alice", "phone", {"curve25519": "A" * 43}),  # a swapped Olm key
        ("alice", "phone", {"bundle": '{"user":"alice"}'}),  # another text
        ("alice", "phone", {"signature": "B" * 86}),  # a forged signature
        ("alice", "phone", {"ed25519": "nope"}),  # not a key
    ],
)
def test_an_altered_identity_is_refused(
    store: CryptoStore, user: str, device: str, change: dict[str, str]
) -> None:
    upload = store.keys_to_upload(on_server=0, target=0, fallback_needed=False, first=True)
    assert upload.identity is not None
    altered = msgspec.structs.replace(upload.identity, **change)
    with pytest.raises(InvalidSignature):
        verify_identity(altered, user, device)


def test_one_time_and_fallback_keys_are_signed_for_their_device_and_kind(
    store: CryptoStore,
) -> None:
    upload = store.keys_to_upload(on_server=0, target=3, fallback_needed=True)
    assert len(upload.one_time_keys) == 3
    assert upload.fallback_key is not None
    for key in upload.one_time_keys:
        verify_claimed_key(store.me, key.id, key.key, key.signature, fallback=False)
        with pytest.raises(InvalidSignature):  # passed off as a fallback key
            verify_claimed_key(store.me, key.id, key.key, key.signature, fallback=True)
    fb = upload.fallback_key
    verify_claimed_key(store.me, fb.id, fb.key, fb.signature, fallback=True)
    other = msgspec.structs.replace(store.me, device="laptop")
    with pytest.raises(InvalidSignature):  # moved to another device
        verify_claimed_key(other, fb.id, fb.key, fb.signature, fallback=True)
    a, b = upload.one_time_keys[:2]
    with pytest.raises(InvalidSignature):  # another key under a's signature
        verify_claimed_key(store.me, a.id, b.key, a.signature, fallback=False)


def test_published_keys_are_not_sent_again_and_a_retry_sends_the_same(
    store: CryptoStore,
) -> None:
    first = store.keys_to_upload(on_server=0, target=4, fallback_needed=True)
    retry = store.keys_to_upload(on_server=0, target=4, fallback_needed=True)
    assert retry == first  # not accepted yet: the same keys, no new ones
    store.keys_published()
    after = store.keys_to_upload(on_server=4, target=4, fallback_needed=False)
    assert after.one_time_keys == [] and after.fallback_key is None
    top_up = store.keys_to_upload(on_server=1, target=4, fallback_needed=True)
    assert len(top_up.one_time_keys) == 3
    assert top_up.fallback_key is not None and top_up.fallback_key != first.fallback_key
    assert {k.id for k in top_up.one_time_keys}.isdisjoint(k.id for k in first.one_time_keys)


@pytest.mark.parametrize(
    ("on_server", "target", "account_max", "expected"),
    [
        (0, 20, 50, 20),
        (15, 20, 50, 5),
        (20, 20, 50, 0),
        (30, 20, 50, 0),
        (0, 100, 50, 50),
        (40, 100, 50, 10),
        (-1, 5, 50, 5),
    ],
)
def test_how_many_one_time_keys_top_up_to_the_target(
    on_server: int, target: int, account_max: int, expected: int
) -> None:
    assert one_time_keys_to_generate(on_server, target, account_max) == expected


def test_the_upload_has_the_shapes_the_server_checks(tmp_path: Path) -> None:
    """The structs encode to what pigeon.domain.keys accepts (the server's shape checks)."""
    directory = Directory()
    alice = new_device(tmp_path, directory, "alice")
    limits = server_keys.KeyLimits()
    identity = directory.identities[("alice", alice.info.device)]
    wire = msgspec.json.encode(identity)
    server_keys.check_identity(msgspec.json.decode(wire, type=server_keys.DeviceIdentity), limits)
    for key in [*directory.one_time[alice.info.device], directory.fallback[alice.info.device]]:
        decoded = msgspec.json.decode(msgspec.json.encode(key), type=server_keys.OneTimeKey)
        server_keys.check_one_time_key(decoded, limits, "key")
    assert isinstance(identity, DeviceIdentity)
