"""Olm between simulated devices (pigeon.client.e2e.olm): the pre-key path, replies, the
fallback key, and payloads that are tampered with, replayed, or from or for someone else."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pigeon.client.e2e import (
    InvalidSignature,
    NoSession,
    OlmDecryptionFailed,
    SenderMismatch,
)
from tests.support.e2e_devices import Device, Directory, new_device


@pytest.fixture
def directory() -> Directory:
    return Directory()


@pytest.fixture
def alice(tmp_path: Path, directory: Directory) -> Device:
    return new_device(tmp_path, directory, "alice")


@pytest.fixture
def bob(tmp_path: Path, directory: Directory) -> Device:
    return new_device(tmp_path, directory, "bob")


def test_a_pre_key_message_starts_the_session_and_replies_flow_both_ways(
    alice: Device, bob: Device, directory: Directory
) -> None:
    bob_keys = len(directory.one_time[bob.info.device])
    first = alice.send_to_device(bob, {"hello": "bob"})
    assert json.loads(first)["type"] == 0  # pre-key
    assert len(directory.one_time[bob.info.device]) == bob_keys - 1  # one key claimed
    assert bob.store.olm.decrypt(alice.info, first) == {"hello": "bob"}
    reply = bob.store.olm.encrypt(alice.info, {"hi": "alice"})  # bob has a session now
    assert json.loads(reply)["type"] == 1
    assert alice.store.olm.decrypt(bob.info, reply) == {"hi": "alice"}
    for i in range(3):
        payload = alice.store.olm.encrypt(bob.info, {"n": i})
        assert json.loads(payload)["type"] == 1  # bob replied: no more pre-key messages
        assert bob.store.olm.decrypt(alice.info, payload) == {"n": i}


def test_the_fallback_key_starts_sessions_once_one_time_keys_ran_out(
    tmp_path: Path, alice: Device, bob: Device, directory: Directory
) -> None:
    directory.one_time[bob.info.device].clear()
    carol = new_device(tmp_path, directory, "carol")
    for sender in (alice, carol):  # the same fallback key, twice
        payload = sender.send_to_device(bob, {"from": sender.info.user})
        assert bob.store.olm.decrypt(sender.info, payload) == {"from": sender.info.user}
    assert directory.fallback_used[bob.info.device]
    directory.upload(bob.store)  # the top-up: new one-time keys and a new fallback key
    assert len(directory.one_time[bob.info.device]) == 5
    assert not directory.fallback_used[bob.info.device]


def test_sessions_started_by_both_sides_at_once_both_work(alice: Device, bob: Device) -> None:
    to_bob = alice.send_to_device(bob, {"a": 1})
    to_alice = bob.send_to_device(alice, {"b": 1})
    assert bob.store.olm.decrypt(alice.info, to_bob) == {"a": 1}
    assert alice.store.olm.decrypt(bob.info, to_alice) == {"b": 1}
    for _ in range(2):
        assert bob.store.olm.decrypt(alice.info, alice.store.olm.encrypt(bob.info, {})) == {}
        assert alice.store.olm.decrypt(bob.info, bob.store.olm.encrypt(alice.info, {})) == {}


def test_no_session_and_a_forged_claimed_key_are_errors(
    alice: Device, bob: Device, directory: Directory
) -> None:
    with pytest.raises(NoSession):
        alice.store.olm.encrypt(bob.info, {})
    key, _ = directory.claim(bob.info.device)
    with pytest.raises(InvalidSignature):  # the server swapped in a key of its own
        alice.store.olm.start(
            bob.info, key.id, alice.info.curve25519, key.signature, fallback=False
        )


def test_a_payload_from_another_device_than_the_server_says_is_refused(
    tmp_path: Path, alice: Device, bob: Device, directory: Directory
) -> None:
    carol = new_device(tmp_path, directory, "carol")
    payload = carol.send_to_device(bob, {"i am": "alice"})
    with pytest.raises(SenderMismatch):  # sent by carol, delivered as from alice
        bob.store.olm.decrypt(alice.info, payload)


def test_a_payload_for_another_device_is_refused(
    tmp_path: Path, alice: Device, bob: Device, directory: Directory
) -> None:
    directory_b = Directory(identities=directory.identities)
    bob2 = new_device(tmp_path, directory_b, "bob")
    payload = alice.send_to_device(bob, {"x": 1})
    with pytest.raises(OlmDecryptionFailed):  # bob's other device has no such session
        bob2.store.olm.decrypt(alice.info, payload)


def test_tampered_and_replayed_payloads_are_refused(alice: Device, bob: Device) -> None:
    first = alice.send_to_device(bob, {"n": 0})
    message = json.loads(first)
    body = bytearray(base64.b64decode(message["body"] + "=="))
    body[-5] ^= 1
    tampered = dict(message, body=base64.b64encode(bytes(body)).decode())
    with pytest.raises(OlmDecryptionFailed):
        bob.store.olm.decrypt(alice.info, json.dumps(tampered))
    assert bob.store.olm.decrypt(alice.info, first) == {"n": 0}  # the genuine one still works
    with pytest.raises(OlmDecryptionFailed):  # the same pre-key message again
        bob.store.olm.decrypt(alice.info, first)
    second = alice.store.olm.encrypt(bob.info, {"n": 1})
    assert bob.store.olm.decrypt(alice.info, second) == {"n": 1}
    with pytest.raises(OlmDecryptionFailed):
        bob.store.olm.decrypt(alice.info, second)
    garbage_payloads = [
        "not json",
        '{"algorithm":"x"}',
        json.dumps(dict(message, algorithm="y")),
        json.dumps(dict(message, type=-1)),
        json.dumps(dict(message, type=7)),
        json.dumps(dict(message, body="***")),
    ]
    for garbage in garbage_payloads:
        with pytest.raises(OlmDecryptionFailed):
            bob.store.olm.decrypt(alice.info, garbage)
