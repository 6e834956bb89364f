"""The SDK's E2E wiring (pigeon.client.encryption.DeviceCrypto) against an in-memory stand-in for
the server: messages that wait for their key survive a restart and are bounded; key requests go
out once per session per interval and are answered only for devices entitled to the key; and
a revoked device stays refused when it is announced again."""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import vodozemac

from pigeon.client import ClientError, DeviceList, Message, ToDevice
from pigeon.client.e2e import DeviceInfo, IdentityKeyChanged, KeyRequest
from pigeon.client.e2e.keys import signed_identity
from pigeon.client.encryption import (
    DecryptedMessage,
    DeviceCrypto,
    E2EConfig,
    Unreadable,
    WaitingForKey,
)
from pigeon.domain.keys import E2EEnvelope
from tests.support.e2e_devices import Directory, FakeClock

CHAT = "chat-1"


class Hub:
    """What the server does for `DeviceCrypto`, in memory: the chats' members, the key
    directory, and each device's to-device inbox. `gone`: revoked devices (left out of
    `keys_query`); `extra`: entries a lying server adds to `keys_query` replies."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.directory = Directory()
        self.clock = FakeClock()
        self.chats: dict[str, set[str]] = {}
        self.inbox: dict[str, list[ToDevice]] = defaultdict(list)
        self.calls: list[tuple[str, str]] = []
        self.gone: set[tuple[str, str]] = set()
        self.extra: list[dict[str, Any]] = []
        self.ids = iter(range(1_000_000))

    def device(self, user: str, **config: Any) -> DeviceCrypto:
        """A new device of `user`, its keys published."""
        name = f"{user}-{secrets.token_hex(3)}"
        crypto = self.reopen(user, name, **config)
        assert crypto.store is not None
        self.directory.upload(crypto.store)
        return crypto

    def reopen(self, user: str, name: str, **config: Any) -> DeviceCrypto:
        """The device `name` of `user` (a new app process on its store)."""
        e2e = E2EConfig(store=self.tmp / f"{name}.keys", pickle_key=bytes(32), **config)
        crypto = DeviceCrypto(e2e, partial(self.request, user, name), clock=self.clock)
        crypto.open(user, name)
        return crypto

    async def request(self, user: str, device: str, t: str, **fields: Any) -> Any:
        self.calls.append((device, t))
        if t == "list_chats":
            chats = [
                {"id": chat, "members": sorted(members), "encrypted": True}
                for chat, members in self.chats.items()
                if user in members
            ]
            return {"chats": chats}
        if t == "keys_query":
            listed = [
                {"user": u, "device": d, "identity": msgspec.to_builtins(identity)}
                for (u, d), identity in self.directory.identities.items()
                if u in fields["users"] and (u, d) not in self.gone
            ]
            return {"devices": listed + [e for e in self.extra if e["user"] in fields["users"]]}
        if t == "keys_claim":
            owners = {d: u for u, d in self.directory.identities}
            keys = []
            for target in fields["devices"]:
                key, fallback = self.directory.claim(target)
                keys.append({"user": owners[target], "device": target, **msgspec.to_builtins(key)})
                keys[-1]["fallback"] = fallback
            return {"keys": keys}
        if t == "send_to_device":
            for m in fields["messages"]:
                event = ToDevice(sender=user, sender_device=device, payload=m["payload"], at=0)
                self.inbox[m["device"]].append(event)
            return {"unknown_devices": []}
        raise ClientError("unknown_command", t)

    async def send(self, sender: DeviceCrypto, text: str, chat: str = CHAT) -> Message:
        """What `PigeonClient.send` does: the envelope, as the server hands it out."""
        envelope = await sender.encrypt(chat, {"body": text})
        me = info(sender)
        return Message(
            id=f"msg-{next(self.ids)}",
            chat=chat,
            seq=1,
            sender=me.user,
            sender_device=me.device,
            cmid="c",
            at=0,
            e2e=msgspec.convert(envelope, E2EEnvelope),
        )

    async def deliver(self, crypto: DeviceCrypto) -> list[Any]:
        """Hand the device every to-device payload waiting for it; what the app then gets."""
        out: list[Any] = []
        inbox = self.inbox[info(crypto).device]
        while inbox:
            out.extend(await crypto.process(inbox.pop(0)))
        return out

    def sends_of(self, crypto: DeviceCrypto) -> int:
        return self.calls.count((info(crypto).device, "send_to_device"))


def info(crypto: DeviceCrypto) -> DeviceInfo:
    assert crypto.store is not None
    return crypto.store.me


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path)


def bodies(events: list[Any]) -> list[str | None]:
    return [e.body for e in events if isinstance(e, DecryptedMessage)]


async def test_a_waiting_message_survives_a_restart(hub: Hub) -> None:
    alice, bob = hub.device("alice"), hub.device("bob")
    hub.chats[CHAT] = {"alice", "bob"}
    message = await hub.send(alice, "see you after the restart")
    (room_key,) = hub.inbox.pop(info(bob).device)  # held back: it arrives later
    (waiting,) = await bob.process(message)
    assert isinstance(waiting, WaitingForKey) and waiting.message == message

    bob = hub.reopen("bob", info(bob).device)  # the app restarts; the message was acked
    (late,) = await bob.process(room_key)
    assert isinstance(late, DecryptedMessage)
    assert (late.id, late.body, late.seq) == (message.id, "see you after the restart", 1)
    assert bob.store is not None and len(bob.store.waiting) == 0
    assert await bob.process(room_key) == []  # nothing comes twice


async def test_waiting_messages_are_bounded_and_asked_for_once_per_interval(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = hub.device("alice"), hub.device("bob", max_waiting=2, key_request_interval=60)
    hub.chats[CHAT] = {"alice", "bob"}
    messages = [await hub.send(alice, f"m{i}") for i in range(3)]
    hub.inbox.pop(info(bob).device)
    for message in messages:
        assert isinstance((await bob.process(message))[0], WaitingForKey)
    assert hub.sends_of(bob) == 1  # three undecryptable messages, one key request
    assert "the oldest 1 dropped" in caplog.text
    assert bob.store is not None
    assert [e.message_id for e in bob.store.waiting.all()] == [m.id for m in messages[1:]]
    hub.clock.now += 60
    await bob.process(await hub.send(alice, "m3"))
    assert hub.sends_of(bob) == 2  # the interval passed: asked again

    assert await hub.deliver(alice) == []  # alice answers both requests
    assert bodies(await hub.deliver(bob)) == ["m2", "m3"]  # m0 was dropped


async def test_a_member_device_that_missed_its_key_gets_it_on_request(hub: Hub) -> None:
    alice, bob = hub.device("alice"), hub.device("bob")
    hub.chats[CHAT] = {"alice", "bob"}
    message = await hub.send(alice, "lost and found")
    hub.inbox.pop(info(bob).device)  # the room key never arrives
    assert isinstance((await bob.process(message))[0], WaitingForKey)
    sent = hub.sends_of(alice)
    await hub.deliver(alice)
    assert hub.sends_of(alice) == sent + 1  # the forwarded key
    (found,) = await hub.deliver(bob)
    assert isinstance(found, DecryptedMessage) and found.body == "lost and found"


async def test_a_new_device_gets_history_from_its_users_other_device(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    alice, phone = hub.device("alice"), hub.device("bob")
    hub.chats[CHAT] = {"alice", "bob"}
    old = await hub.send(alice, "before the tablet")
    await hub.deliver(phone)
    tablet = hub.device("bob")  # alice never shared that session with it
    assert isinstance((await tablet.process(old))[0], WaitingForKey)
    sent = hub.sends_of(alice)
    assert await hub.deliver(alice) == []
    assert hub.sends_of(alice) == sent  # not entitled: alice answers nothing
    assert "refused: not entitled" in caplog.text
    await hub.deliver(phone)  # bob's phone forwards what it holds
    (found,) = await hub.deliver(tablet)
    assert isinstance(found, DecryptedMessage) and found.body == "before the tablet"
    assert found.sender_ed25519 == info(alice).ed25519  # alice's session, not the phone's


async def test_a_requester_who_is_not_a_member_gets_nothing(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob, carol = hub.device("alice"), hub.device("bob"), hub.device("carol")
    hub.chats[CHAT] = {"alice", "bob"}
    hub.chats["chat-2"] = {"alice", "carol"}  # carol may write to alice's devices
    message = await hub.send(alice, "members only")
    assert message.e2e
    # carol's SDK would not ask (she is not in the chat): she asks by hand
    (alice_device,) = await carol.devices_of(["alice"])
    request = KeyRequest(
        chat=CHAT, sender_key=message.e2e.sender_key, session_id=message.e2e.session_id
    )
    await carol._send_olm([(alice_device, msgspec.to_builtins(request))])
    sent = hub.sends_of(alice)
    assert await hub.deliver(alice) == []
    assert hub.sends_of(alice) == sent
    assert "refused: not a member" in caplog.text
    assert hub.inbox[info(carol).device] == []
    await hub.deliver(bob)  # a member reads it
    assert isinstance((await bob.process(message))[0], DecryptedMessage)


async def test_a_forwarded_key_is_taken_only_when_asked_for_and_from_whom_may_give_it(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob, carol = hub.device("alice"), hub.device("bob"), hub.device("carol")
    hub.chats[CHAT] = {"alice", "bob", "carol"}
    message = await hub.send(alice, "group news")
    await hub.deliver(carol)
    hub.inbox.pop(info(bob).device)
    assert carol.store is not None and message.e2e
    request = KeyRequest(
        chat=CHAT, sender_key=message.e2e.sender_key, session_id=message.e2e.session_id
    )
    # carol holds alice's session: she may give it to her own devices, not to bob's
    key = carol.store.groups.forward(request, info(hub.device("carol")))
    assert key is not None
    (bob_device,) = await carol.devices_of(["bob"])
    await carol._send_olm([(bob_device, msgspec.to_builtins(key))])
    assert await hub.deliver(bob) == []
    assert "not asked for" in caplog.text
    assert isinstance((await bob.process(message))[0], WaitingForKey)  # now bob asks
    await carol._send_olm([(bob_device, msgspec.to_builtins(key))])
    assert await hub.deliver(bob) == []
    assert "forwarded another device's key" in caplog.text
    await hub.deliver(alice)
    assert bodies(await hub.deliver(bob)) == ["group news"]


async def test_a_revoked_device_is_refused_when_announced_again(hub: Hub) -> None:
    alice, phone, laptop = hub.device("alice"), hub.device("bob"), hub.device("bob")
    hub.chats[CHAT] = {"alice", "bob"}
    await hub.send(alice, "to both")
    from_laptop = await hub.send(laptop, "from the laptop")
    await hub.deliver(alice)
    await alice.process(DeviceList(user="bob", device=info(laptop).device, change="removed", at=0))
    hub.gone.add(("bob", info(laptop).device))
    identity = hub.directory.identities[("bob", info(laptop).device)]
    hub.extra = [  # the server lists the revoked device again, with its old keys
        {"user": "bob", "device": info(laptop).device, "identity": msgspec.to_builtins(identity)}
    ]
    assert await alice.devices_of(["bob"]) == [info(phone)]
    (notice,) = alice.take_notices()
    assert isinstance(notice, IdentityKeyChanged) and notice.revoked
    assert notice.new == info(laptop)
    hub.inbox.clear()
    await hub.send(alice, "after")
    assert hub.inbox[info(laptop).device] == []  # no key for it
    assert len(hub.inbox[info(phone).device]) == 1  # a new session (rotated), for the phone
    (result,) = await alice.process(from_laptop)
    assert isinstance(result, Unreadable) and result.reason == "the sender's device was revoked"
    forged = signed_identity(vodozemac.Account(), "bob", info(laptop).device)
    hub.extra = [  # or with other keys, properly self-signed
        {"user": "bob", "device": info(laptop).device, "identity": msgspec.to_builtins(forged)}
    ]
    alice._devices.clear()
    assert await alice.devices_of(["bob"]) == [info(phone)]
    (notice,) = alice.take_notices()
    assert isinstance(notice, IdentityKeyChanged) and notice.revoked
    assert notice.known == info(laptop) and notice.new.curve25519 == forged.curve25519
    assert laptop.store is not None
    laptop.store.groups.rotate(CHAT)  # the laptop, still running, shares a new session
    later = await hub.send(laptop, "still here")
    notices = await hub.deliver(alice)  # its room key is dropped; the server's lie reported
    assert notices and all(isinstance(n, IdentityKeyChanged) and n.revoked for n in notices)
    (result,) = await alice.process(later)
    assert isinstance(result, Unreadable)

    alice = hub.reopen("alice", info(alice).device)  # remembered across a restart
    assert await alice.devices_of(["bob"]) == [info(phone)]
    (notice,) = alice.take_notices()
    assert isinstance(notice, IdentityKeyChanged) and notice.revoked
    (result,) = await alice.process(from_laptop)
    assert isinstance(result, Unreadable)
