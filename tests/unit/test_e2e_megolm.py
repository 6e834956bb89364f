"""Megolm across simulated devices (pigeon.client.e2e.megolm): Alice, Bob with two devices and
Carol in one chat; rotation when members or devices go and by count or age; a device added
later; the results for messages that cannot, or must not, be shown; and keys sent again on
request, only to devices entitled to them and from the index they were entitled to."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.client.e2e import (
    CryptoStore,
    Decrypted,
    Envelope,
    ForwardedRoomKey,
    KeyRequest,
    MissingKey,
    NoSession,
    Replayed,
    RotationPolicy,
    Undecryptable,
)
from pigeon.domain import keys as server_keys
from tests.support.e2e_devices import Device, Directory, FakeClock, new_device

CHAT = "chat-1"


class World:
    def __init__(self, tmp: Path, policy: RotationPolicy | None = None) -> None:
        self.directory = Directory()
        self.clock = FakeClock()
        self.alice = self.new("alice", tmp, policy)
        self.bob1 = self.new("bob", tmp, policy)
        self.bob2 = self.new("bob", tmp, policy)
        self.carol = self.new("carol", tmp, policy)
        self.members = [self.alice, self.bob1, self.bob2, self.carol]
        self.ids = iter(range(1_000_000))

    def new(self, user: str, tmp: Path, policy: RotationPolicy | None = None) -> Device:
        return new_device(tmp, self.directory, user, policy=policy, clock=self.clock)

    def send(self, sender: Device, text: str) -> tuple[str, Envelope]:
        return f"msg-{next(self.ids)}", sender.send(CHAT, self.members, {"body": text})

    @staticmethod
    def read(reader: Device, sender: Device, message: tuple[str, Envelope]) -> object:
        message_id, envelope = message
        return reader.store.groups.decrypt(
            CHAT,
            envelope,
            sender=sender.info.user,
            sender_device=sender.info.device,
            message_id=message_id,
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def body(result: object) -> str:
    assert isinstance(result, Decrypted), result
    return str(result.content["body"])


def test_every_member_device_decrypts_and_knows_the_sender(world: World) -> None:
    message = world.send(world.alice, "hello all")
    for reader in world.members:  # the sender reads its own echo too
        result = world.read(reader, world.alice, message)
        assert body(result) == "hello all"
        assert isinstance(result, Decrypted)
        assert (result.sender, result.sender_device) == ("alice", world.alice.info.device)
        assert result.sender_ed25519 == world.alice.info.ed25519
    reply = world.send(world.bob2, "hi alice")
    assert body(world.read(world.alice, world.bob2, reply)) == "hi alice"
    assert body(world.read(world.bob1, world.bob2, reply)) == "hi alice"


def test_keys_are_shared_once_per_session(world: World) -> None:
    world.send(world.alice, "one")
    assert world.alice.store.groups.share(CHAT, [m.info for m in world.members]) == []


def test_a_removed_member_cannot_read_later_messages(world: World) -> None:
    before = world.send(world.alice, "before")
    assert body(world.read(world.carol, world.alice, before)) == "before"
    world.members.remove(world.carol)  # carol is removed: her devices leave the list
    after = world.send(world.alice, "after")
    assert after[1].session_id != before[1].session_id  # rotated
    assert isinstance(world.read(world.carol, world.alice, after), MissingKey)
    assert body(world.read(world.bob2, world.alice, after)) == "after"


def test_leaving_rotates_explicitly_too(world: World) -> None:
    first = world.send(world.alice, "a")
    world.alice.store.groups.rotate(CHAT)  # e.g. a `chat_update` said someone left
    with pytest.raises(NoSession):
        world.alice.store.groups.encrypt(CHAT, {"body": "skipped share"})
    assert world.send(world.alice, "b")[1].session_id != first[1].session_id


def test_a_revoked_device_gets_no_later_key(world: World) -> None:
    first = world.send(world.alice, "a")
    assert world.alice.store.groups.device_revoked("bob", world.bob2.info.device) == [CHAT]
    world.members.remove(world.bob2)
    later = world.send(world.alice, "b")
    assert later[1].session_id != first[1].session_id
    assert isinstance(world.read(world.bob2, world.alice, later), MissingKey)
    assert body(world.read(world.bob1, world.alice, later)) == "b"


def test_rotation_every_n_messages_and_t_seconds(tmp_path: Path) -> None:
    world = World(tmp_path, RotationPolicy(max_messages=3, max_age=3600))
    sessions = [world.send(world.alice, str(i))[1].session_id for i in range(7)]
    assert sessions[0] == sessions[1] == sessions[2] != sessions[3]
    assert sessions[3] == sessions[4] == sessions[5] != sessions[6]
    assert not world.alice.store.groups.needs_rotation(CHAT)
    world.clock.now += 3599
    assert world.send(world.alice, "x")[1].session_id == sessions[6]
    world.clock.now += 1
    assert world.alice.store.groups.needs_rotation(CHAT)
    latest = world.send(world.alice, "y")
    assert latest[1].session_id != sessions[6]
    for reader in world.members:
        assert body(world.read(reader, world.alice, latest)) == "y"


def test_a_device_added_later_reads_only_what_follows(world: World, tmp_path: Path) -> None:
    before = world.send(world.alice, "before")
    bob3 = world.new("bob", tmp_path)
    world.members.append(bob3)
    after = world.send(world.alice, "after")
    assert after[1].session_id == before[1].session_id  # no rotation for a new device
    assert body(world.read(bob3, world.alice, after)) == "after"
    missing = world.read(bob3, world.alice, before)
    assert isinstance(missing, MissingKey)
    assert missing.message_index == 0  # it holds the key from index 1 on


def test_an_unknown_session_is_a_missing_key_not_an_exception(world: World) -> None:
    envelope = world.alice.send(CHAT, [world.alice], {"body": "nobody has the key"})
    result = world.read(world.bob1, world.alice, ("m", envelope))
    assert result == MissingKey(
        chat=CHAT, sender_key=world.alice.info.curve25519, session_id=envelope.session_id
    )


def test_a_tampered_ciphertext_is_undecryptable(world: World) -> None:
    message_id, envelope = world.send(world.alice, "genuine")
    raw = bytearray(base64.b64decode(envelope.ciphertext + "=="))
    raw[12] ^= 0x01
    tampered = msgspec.structs.replace(
        envelope, ciphertext=base64.b64encode(bytes(raw)).decode().rstrip("=")
    )
    result = world.read(world.bob1, world.alice, (message_id, tampered))
    assert isinstance(result, Undecryptable)
    garbage = msgspec.structs.replace(envelope, ciphertext="bm90IG1lZ29sbQ")
    assert isinstance(world.read(world.bob1, world.alice, (message_id, garbage)), Undecryptable)
    assert body(world.read(world.bob1, world.alice, (message_id, envelope))) == "genuine"


def test_a_replayed_message_index_is_detected_and_redelivery_is_not(world: World) -> None:
    message_id, envelope = world.send(world.alice, "pay 10")
    assert body(world.read(world.bob1, world.alice, (message_id, envelope))) == "pay 10"
    assert body(world.read(world.bob1, world.alice, (message_id, envelope))) == "pay 10"
    replay = world.read(world.bob1, world.alice, ("another-id", envelope))
    assert replay == Replayed(
        session_id=envelope.session_id, message_index=0, first_message_id=message_id
    )


def test_a_message_from_another_device_or_chat_is_undecryptable(world: World) -> None:
    message_id, envelope = world.send(world.alice, "x")
    groups = world.bob1.store.groups
    as_carol = groups.decrypt(
        CHAT, envelope, sender="carol", sender_device=world.carol.info.device, message_id="m"
    )
    assert isinstance(as_carol, Undecryptable)
    elsewhere = groups.decrypt(
        "chat-2", envelope, sender="alice", sender_device=world.alice.info.device, message_id="m"
    )
    assert isinstance(elsewhere, Undecryptable)
    other = msgspec.structs.replace(envelope, algorithm="rot13")
    assert isinstance(world.read(world.bob1, world.alice, (message_id, other)), Undecryptable)


def test_a_room_key_sent_by_another_device_than_its_session_is_refused(world: World) -> None:
    keys = world.alice.store.groups.share(CHAT, [world.bob1.info])
    ((_, room_key),) = keys
    # carol forwards alice's key as her own: it is filed under carol's key, not alice's
    world.bob1.store.groups.import_room_key(world.carol.info, msgspec.to_builtins(room_key))
    envelope = world.alice.store.groups.encrypt(CHAT, {"body": "x"})
    assert isinstance(world.read(world.bob1, world.alice, ("m", envelope)), MissingKey)
    assert world.bob1.store.groups.import_room_key(world.alice.info, {"type": "junk"}) is None


def test_sessions_survive_a_reopen_of_the_store(world: World) -> None:
    first = world.send(world.alice, "one")
    assert body(world.read(world.bob2, world.alice, first)) == "one"
    for device in world.members:
        device.store.save()
        device.store = CryptoStore.open(device.store.path, bytes(32), clock=world.clock)
    second = world.send(world.alice, "two")
    assert second[1].session_id == first[1].session_id  # same outbound session, reloaded
    assert body(world.read(world.bob2, world.alice, second)) == "two"
    assert body(world.read(world.bob1, world.alice, first)) == "one"
    replay = world.read(world.bob2, world.alice, ("replay", first[1]))
    assert isinstance(replay, Replayed)  # the record of used indexes was saved
    reply = world.send(world.carol, "three")  # Olm sessions reloaded on both sides
    assert body(world.read(world.alice, world.carol, reply)) == "three"


def request_for(message: tuple[str, Envelope], chat: str = CHAT) -> KeyRequest:
    _, envelope = message
    return KeyRequest(chat=chat, sender_key=envelope.sender_key, session_id=envelope.session_id)


def forwarded(key: ForwardedRoomKey | None) -> dict[str, object]:
    assert key is not None
    return dict(msgspec.to_builtins(key))


def test_a_device_that_missed_its_room_key_gets_it_from_the_sender(
    world: World, tmp_path: Path
) -> None:
    first = world.send(world.alice, "one")
    late = world.new("dave", tmp_path)  # a member device whose room key was lost in transit
    world.members.append(late)
    keys = world.alice.store.groups.share(CHAT, [m.info for m in world.members])
    assert [device for device, _ in keys] == [late.info]  # counted as shared, never received
    second = ("msg-two", world.alice.store.groups.encrypt(CHAT, {"body": "two"}))
    assert isinstance(world.read(late, world.alice, second), MissingKey)
    answer = world.alice.store.groups.forward(request_for(second), late.info)
    assert answer is not None and answer.first_index == 1  # shared at index 1, not before
    assert (answer.sender, answer.sender_key) == ("alice", world.alice.info.curve25519)
    assert late.store.groups.import_forwarded_key(world.alice.info, forwarded(answer))
    assert body(world.read(late, world.alice, second)) == "two"
    missing = world.read(late, world.alice, first)
    assert isinstance(missing, MissingKey) and missing.message_index == 0


def test_only_entitled_devices_get_a_key_on_request(world: World, tmp_path: Path) -> None:
    message = world.send(world.alice, "for members")
    stranger = world.new("eve", tmp_path)
    groups = world.alice.store.groups
    assert groups.forward(request_for(message), stranger.info) is None  # never shared with
    assert groups.forward(request_for(message, "chat-2"), world.bob1.info) is None  # chat
    # carol holds alice's session but it is not hers: she forwards it to nobody of another user
    assert world.carol.store.groups.forward(request_for(message), world.bob1.info) is None
    assert groups.forward(request_for(message), world.alice.info) is None  # itself
    unknown = KeyRequest(chat=CHAT, sender_key=world.alice.info.curve25519, session_id="nope")
    assert groups.forward(unknown, world.bob1.info) is None


def test_a_users_other_device_gets_what_this_one_holds(world: World, tmp_path: Path) -> None:
    message = world.send(world.alice, "history")
    world.send(world.alice, "more")
    bob3 = world.new("bob", tmp_path)  # bob's new device, never sent alice's session
    answer = world.bob1.store.groups.forward(request_for(message), bob3.info)
    assert answer is not None and answer.first_index == 0
    assert (answer.sender, answer.sender_device) == ("alice", world.alice.info.device)
    assert bob3.store.groups.import_forwarded_key(world.alice.info, forwarded(answer))
    assert body(world.read(bob3, world.alice, message)) == "history"


def test_a_forwarded_key_must_name_its_sessions_device(world: World, tmp_path: Path) -> None:
    message = world.send(world.alice, "x")
    bob3 = world.new("bob", tmp_path)
    answer = forwarded(world.bob1.store.groups.forward(request_for(message), bob3.info))
    groups = bob3.store.groups
    assert groups.import_forwarded_key(world.carol.info, answer) is None  # not carol's
    assert groups.import_forwarded_key(world.alice.info, {**answer, "session_key": "AAAA"}) is None
    assert groups.import_forwarded_key(world.alice.info, {**answer, "session_id": "x"}) is None
    assert groups.import_forwarded_key(world.alice.info, {"type": "junk"}) is None
    assert isinstance(world.read(bob3, world.alice, message), MissingKey)


def test_who_got_a_session_is_kept_in_the_store(world: World, tmp_path: Path) -> None:
    message = world.send(world.alice, "x")
    world.alice.store.save()
    world.alice.store = CryptoStore.open(world.alice.store.path, bytes(32), clock=world.clock)
    assert world.alice.store.groups.forward(request_for(message), world.carol.info) is not None
    stranger = world.new("eve", tmp_path)
    assert world.alice.store.groups.forward(request_for(message), stranger.info) is None


_text = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ !{}")


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    algorithm=st.sampled_from(["pigeon.megolm.v1", "other"]),
    ciphertext=st.one_of(
        _text, st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
    ),
    mangle=st.integers(min_value=0, max_value=400),
)
def test_decrypt_never_raises(world: World, algorithm: str, ciphertext: str, mangle: int) -> None:
    _, real = world.send(world.alice, "x")
    raw = bytearray(base64.b64decode(real.ciphertext + "=="))
    raw[mangle % len(raw)] ^= 0xFF
    for text in (ciphertext, base64.b64encode(bytes(raw)).decode()):
        for session_id in (real.session_id, "nope"):
            envelope = Envelope(
                algorithm=algorithm,
                sender_key=real.sender_key,
                session_id=session_id,
                ciphertext=text,
            )
            result = world.read(world.bob1, world.alice, ("other", envelope))
            assert isinstance(result, MissingKey | Undecryptable | Replayed)


def test_envelopes_and_payloads_have_the_shapes_the_server_checks(world: World) -> None:
    """What the server accepts (pigeon.domain.keys): an `e2e` envelope, a to-device payload."""
    limits = server_keys.KeyLimits()
    _, envelope = world.send(world.alice, "x")
    wire = msgspec.json.encode(envelope)
    server_keys.check_envelope(msgspec.json.decode(wire, type=server_keys.E2EEnvelope), limits)
    payload = world.alice.send_to_device(world.carol, {"type": "ping"})
    assert server_keys.check_payload(payload, limits) == len(payload.encode())
