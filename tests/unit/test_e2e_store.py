"""The device's key store (pigeon.client.e2e.store): sealed on disk, a wrong key is a typed
error, saves replace the file atomically, and a reopened store is the same device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pigeon.client.e2e import CryptoStore, StoreCorrupt, StoreExists, WrongPickleKey
from tests.support.e2e_devices import Directory, new_device

KEY = bytes(range(32))


def test_a_reopened_store_is_the_same_device(tmp_path: Path) -> None:
    path = tmp_path / "device.keys"
    created = CryptoStore.create(path, KEY, user="alice", device="phone")
    opened = CryptoStore.open(path, KEY)
    assert opened.me == created.me
    assert opened.me.user == "alice" and opened.me.device == "phone"


def test_a_wrong_pickle_key_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "device.keys"
    CryptoStore.create(path, KEY, user="alice", device="phone")
    with pytest.raises(WrongPickleKey) as caught:
        CryptoStore.open(path, bytes(32))
    assert caught.value.code == "e2e_wrong_pickle_key"
    for bad in (b"short", KEY + b"x"):
        with pytest.raises(WrongPickleKey):
            CryptoStore.open(path, bad)
        with pytest.raises(WrongPickleKey):
            CryptoStore.create(tmp_path / "other.keys", bad, user="a", device="d")


def test_a_damaged_or_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.keys"
    CryptoStore.create(path, KEY, user="alice", device="phone")
    sealed = bytearray(path.read_bytes())
    sealed[len(sealed) // 2] ^= 1
    path.write_bytes(bytes(sealed))
    with pytest.raises(WrongPickleKey):  # authenticated: a flipped bit does not open
        CryptoStore.open(path, KEY)
    path.write_bytes(b'{"account": "..."}')
    with pytest.raises(StoreCorrupt):
        CryptoStore.open(path, KEY)


def test_creating_over_an_existing_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.keys"
    CryptoStore.create(path, KEY, user="alice", device="phone")
    with pytest.raises(StoreExists):
        CryptoStore.create(path, KEY, user="alice", device="phone")


def test_nothing_readable_is_on_disk(tmp_path: Path) -> None:
    directory = Directory()
    alice = new_device(tmp_path, directory, "alice-4f2a")
    bob = new_device(tmp_path, directory, "bob-77c1")
    alice.send("chat-secret", [alice, bob], {"body": "the plaintext"})  # sessions and bookkeeping
    alice.store.devices.check(bob.info)
    alice.store.save()
    data = alice.store.path.read_bytes()
    for visible in (
        b"alice-4f2a",
        b"bob-77c1",
        b"chat-secret",
        b"the plaintext",
        alice.info.curve25519.encode(),
        bob.info.ed25519.encode(),
    ):
        assert visible not in data
    assert os.stat(alice.store.path).st_mode & 0o077 == 0  # owner only


def test_save_replaces_the_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "device.keys"
    store = CryptoStore.create(path, KEY, user="alice", device="phone")
    before = path.read_bytes()
    store.keys_to_upload(on_server=0, target=5, fallback_needed=True)

    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save()
    assert path.read_bytes() == before  # the old state, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.keys"]  # no temp left
    monkeypatch.undo()
    store.save()
    assert path.read_bytes() != before
    assert len(CryptoStore.open(path, KEY).account.one_time_keys) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.keys"]
