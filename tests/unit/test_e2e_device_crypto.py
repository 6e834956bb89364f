"""The SDK's E2E wiring (pigeon.client.encryption.DeviceCrypto) against an in-memory stand-in for
the server: messages that wait for their key survive a restart and are bounded; key requests go
out once per session per interval (also when asked again after a connect) and are answered
only for devices entitled to the key; a revoked device stays refused when it is announced
again; and `rate_limited` replies to key commands are waited out a few times, then raised."""

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

from pigeon.client import ClientError, DeviceList, Message, RateLimited, ToDevice
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
    `keys_query`); `extra`: entries a lying server adds to `keys_query` replies; `refusals`:
    per command, the `retry_after` of each `rate_limited` reply it gets before it passes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.directory = Directory()
        self.clock = FakeClock()
        self.chats: dict[str, set[str]] = {}
        self.inbox: dict[str, list[ToDevice]] = defaultdict(list)
        self.calls: list[tuple[str, str]] = []
        self.gone: set[tuple[str, str]] = set()
        self.extra: list[dict[str, Any]] = []
        self.refusals: dict[str, list[float]] = defaultdict(list)
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
        crypto._published.set()  # as `publish_keys` does on connect
        return crypto

    async def request(self, user: str, device: str, t: str, **fields: Any) -> Any:
        self.calls.append((device, t))
        if self.refusals[t]:
            wait = self.refusals[t].pop(0)
            raise ClientError("rate_limited", f"retry in {wait} s", True, wait)
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

    def sends_of(self, crypto: DeviceCrypto, command: str = "send_to_device") -> int:
        return self.calls.count((info(crypto).device, command))


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


async def test_waiting_sessions_are_asked_for_again_after_a_restart_when_due(hub: Hub) -> None:
    alice, carol = hub.device("alice"), hub.device("carol")
    bob = hub.device("bob", key_request_interval=60)
    hub.chats[CHAT] = {"alice", "bob"}
    hub.chats["chat-2"] = {"carol", "bob"}
    messages = [await hub.send(alice, "a0"), await hub.send(alice, "a1")]
    messages.append(await hub.send(carol, "c0", chat="chat-2"))
    hub.inbox.pop(info(bob).device)  # the room keys are lost
    for message in messages:
        assert isinstance((await bob.process(message))[0], WaitingForKey)
    assert hub.sends_of(bob) == 2  # one request per session
    hub.inbox.clear()  # and so are the requests

    bob = hub.reopen("bob", info(bob).device, key_request_interval=60)  # the app restarts
    assert await bob.ask_for_waiting_keys() == 0  # within the interval: nothing
    hub.clock.now += 60
    assert await bob.ask_for_waiting_keys() == 2  # one per session, not per message
    assert await bob.ask_for_waiting_keys() == 0  # recorded: not again before the interval
    assert hub.sends_of(bob) == 4
    await hub.deliver(alice)
    await hub.deliver(carol)
    assert bodies(await hub.deliver(bob)) == ["a0", "a1", "c0"]
    assert bob.store is not None and len(bob.store.waiting) == 0
    hub.clock.now += 60
    assert await bob.ask_for_waiting_keys() == 0  # nothing waits any more


async def test_asking_again_skips_revoked_senders_and_stops_at_the_first_failure(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    alice, carol, bob = hub.device("alice"), hub.device("carol"), hub.device("bob")
    hub.chats[CHAT] = {"alice", "bob", "carol"}
    messages = [await hub.send(sender, "lost key") for sender in (carol, alice)]
    hub.inbox.pop(info(bob).device)
    for message in messages:
        assert isinstance((await bob.process(message))[0], WaitingForKey)
    hub.inbox.clear()
    await bob.process(DeviceList(user="carol", device=info(carol).device, change="removed", at=0))
    hub.clock.now += 60
    sent = hub.sends_of(bob)
    assert await bob.ask_for_waiting_keys() == 1  # not carol's: her device was revoked
    assert hub.inbox[info(carol).device] == [] and len(hub.inbox[info(alice).device]) == 1
    hub.clock.now += 60
    hub.refusals["send_to_device"] = [3600.0]  # refused for an hour: given up at once
    assert await bob.ask_for_waiting_keys() == 0
    assert "stopped: RateLimited" in caplog.text
    assert hub.sends_of(bob) == sent + 2


async def test_rate_limited_key_commands_are_waited_out_a_few_times_then_raised(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = hub.device("alice", max_rate_wait=1.0), hub.device("bob")
    hub.chats[CHAT] = {"alice", "bob"}
    hub.refusals.update(
        keys_query=[0.01, 0.01], keys_claim=[0.01], send_to_device=[0.01, 0.01, 0.01]
    )
    message = await hub.send(alice, "patience")  # three refusals in a row at most: waited out
    commands = ("keys_query", "keys_claim", "send_to_device")
    assert [hub.sends_of(alice, t) for t in commands] == [3, 2, 4]
    await hub.deliver(bob)
    assert bodies(await bob.process(message)) == ["patience"]

    alice._devices.clear()  # queried again for the next send
    hub.refusals["keys_query"] = [0.01] * 4  # one refusal too many
    with pytest.raises(RateLimited) as err:
        await hub.send(alice, "not sent")
    assert (err.value.code, err.value.command, err.value.retry_after) == (
        "rate_limited",
        "keys_query",
        0.01,
    )
    queried = hub.sends_of(alice, "keys_query")
    hub.refusals["keys_query"] = [2.0]  # a longer wait than max_rate_wait: raised at once
    with pytest.raises(RateLimited) as err:
        await hub.send(alice, "not sent")
    assert err.value.retry_after == 2.0 and hub.sends_of(alice, "keys_query") == queried + 1

    # an event being handled is not held up: the room key is kept and used with the next event
    carol = hub.device("carol")
    hub.chats["chat-2"] = {"carol", "bob"}
    later = await hub.send(carol, "from carol", chat="chat-2")
    (room_key,) = hub.inbox.pop(info(bob).device)
    hub.refusals["keys_query"] = [3600.0]  # bob must query carol's device: refused for long
    assert await bob.process(room_key) == []
    assert "could not handle a ToDevice event: RateLimited" in caplog.text
    assert bob.store is not None and len(bob.store.pending_to_device) == 1
    assert bodies(await bob.process(later)) == ["from carol"]
