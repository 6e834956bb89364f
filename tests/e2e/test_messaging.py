"""The message path end to end: online, offline, groups, devices, idempotency, order."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from pigeon.client import ClientError, PigeonClient
from pigeon.client.http import login
from pigeon.domain.events import ChatUpdate, Message
from tests.conftest import PASSWORD, ManualClock, Server, next_of


async def test_offline_recipient_gets_messages_in_order_on_connect(server: Server) -> None:
    alice = await server.new_client("alice")
    bob_name, bob_id = await server.user("bob")
    bob_account = await server.device(bob_name)
    chat = await alice.create_chat([bob_id])
    sent = [await alice.send(chat["id"], f"m{i}") for i in range(20)]

    bob = await server.client(bob_account)
    got = [await next_of(bob, Message) for _ in range(20)]
    assert [m.id for m in got] == [s.id for s in sent]
    assert [m.seq for m in got] == list(range(1, 21))
    await asyncio.wait_for(bob.synced.wait(), 5)


async def test_unacked_messages_come_back_after_reconnect(server: Server) -> None:
    alice = await server.new_client("alice")
    bob_name, bob_id = await server.user("bob")
    account = await server.device(bob_name)
    bob = await server.client(account, auto_ack=False)
    chat = await alice.create_chat([bob_id])
    sent = await alice.send(chat["id"], "once more")
    first = await next_of(bob, Message)
    assert first.id == sent.id
    await bob.close()  # never acked

    again = await server.client(account)
    assert (await next_of(again, Message)).id == sent.id


async def test_group_of_100_mixed_online_offline(make_server) -> None:  # type: ignore[no-untyped-def]
    server = await make_server()
    users = [await server.user("g") for _ in range(100)]
    accounts = [await server.device(name) for name, _ in users]
    online = [await server.client(a) for a in accounts[:50]]  # includes the creator
    creator = online[0]
    chat = await creator.create_chat([uid for _, uid in users[1:]], name="hundred")
    assert chat["kind"] == "group" and len(chat["members"]) == 100
    sent = [await creator.send(chat["id"], f"hello {i}") for i in range(3)]

    async def receive_all(client: PigeonClient) -> list[str]:
        return [(await next_of(client, Message, timeout=10)).id for _ in range(3)]

    results = await asyncio.gather(*(receive_all(c) for c in online[1:]))
    assert all(r == [s.id for s in sent] for r in results)
    offline = await asyncio.gather(*(server.client(a) for a in accounts[50:]))
    results = await asyncio.gather(*(receive_all(c) for c in offline))
    assert all(r == [s.id for s in sent] for r in results)


async def test_three_devices_per_user_the_fourth_is_refused(server: Server) -> None:
    name, _ = await server.user("multi")
    accounts = [await server.device(name, f"d{i}") for i in range(3)]
    with pytest.raises(ClientError) as err:
        await login(server.url, name, PASSWORD, "d4")
    assert err.value.code == "too_many_devices"

    phone, laptop, tablet = [await server.client(a) for a in accounts]
    friend = await server.new_client("friend")
    assert phone.user is not None
    chat = await friend.create_chat([phone.user])
    sent = await friend.send(chat["id"], "to all your devices")
    for device in (phone, laptop, tablet):
        assert (await next_of(device, Message)).id == sent.id
    # the sender's own other devices get their message too
    mine = await phone.send(chat["id"], "from my phone")
    for device in (laptop, tablet, friend):
        assert (await next_of(device, Message)).id == mine.id


async def test_idempotent_resend_returns_the_original(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user is not None
    chat = await alice.create_chat([bob.user])
    first = await alice.send(chat["id"], "only once", cmid="c-1")
    again = await alice.send(chat["id"], "only once", cmid="c-1")
    assert (again.id, again.seq, again.at) == (first.id, first.seq, first.at)
    assert again.duplicate and not first.duplicate
    after = await alice.send(chat["id"], "next", cmid="c-2")
    assert after.seq == first.seq + 1
    got = [await next_of(bob, Message) for _ in range(2)]
    assert [m.id for m in got] == [first.id, after.id]
    assert bob.pending_events() == 0


async def test_one_order_per_chat_under_concurrent_senders(server: Server) -> None:
    senders = [await server.new_client("s") for _ in range(4)]
    watcher = await server.new_client("w")
    ids = [c.user for c in senders[1:]] + [watcher.user]
    chat = await senders[0].create_chat([i for i in ids if i], name="race")

    async def blast(client: PigeonClient, n: int) -> list[int]:
        results = await asyncio.gather(*(client.send(chat["id"], f"{n}-{i}") for i in range(50)))
        return [r.seq for r in results]

    seqs = await asyncio.gather(*(blast(c, n) for n, c in enumerate(senders)))
    flat = sorted(s for group in seqs for s in group)
    assert flat == list(range(1, 201))  # gap-free, no duplicates
    got = [await next_of(watcher, Message, timeout=10) for _ in range(200)]
    assert [m.seq for m in got] == list(range(1, 201))
    # each sender's messages keep the order in which that connection issued them
    by_sender: dict[str, list[int]] = defaultdict(list)
    for m in got:
        by_sender[m.sender].append(int(m.body.split("-")[1]) if m.body else -1)
    assert all(v == sorted(v) for v in by_sender.values())


async def test_membership_changes_reach_every_device(server: Server) -> None:
    admin = await server.new_client("admin")
    member = await server.new_client("member")
    newcomer = await server.new_client("new")
    assert member.user and newcomer.user
    chat = await admin.create_chat([member.user], name="club")
    await admin.send(chat["id"], "before you came")
    await admin.modify_participants(chat["id"], add=[newcomer.user])
    update = await next_of(newcomer, ChatUpdate)
    assert update.added == [newcomer.user]
    sent = await admin.send(chat["id"], "welcome")
    got = await next_of(newcomer, Message)
    assert got.id == sent.id  # the newcomer does not see older messages

    with pytest.raises(ClientError) as err:
        await member.modify_participants(chat["id"], remove=[admin.user or ""])
    assert err.value.code == "forbidden"

    await admin.modify_participants(chat["id"], remove=[member.user])
    removed = await next_of(member, ChatUpdate)
    while not removed.removed:
        removed = await next_of(member, ChatUpdate)
    assert removed.removed == [member.user]
    with pytest.raises(ClientError) as err:
        await member.send(chat["id"], "still here?")
    assert err.value.code == "forbidden"

    await admin.leave_chat(chat["id"])
    left = await next_of(newcomer, ChatUpdate)
    while left.change != "left":
        left = await next_of(newcomer, ChatUpdate)
    assert left.chat.members[0].user == newcomer.user and left.chat.members[0].role == "admin"


async def test_list_chats_newest_first_with_unread(make_server) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()  # activity times are milliseconds: keep the two sends apart
    server: Server = await make_server(clock=clock)
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    carol = await server.new_client("carol")
    assert bob.user and carol.user
    with_bob = await alice.create_chat([bob.user])
    with_carol = await alice.create_chat([carol.user])
    again = await alice.create_chat([bob.user])
    assert again["id"] == with_bob["id"]  # one direct chat per pair
    await bob.send(with_bob["id"], "one")
    await bob.send(with_bob["id"], "two")
    clock.offset_ms += 1
    await carol.send(with_carol["id"], "newest")
    chats = await alice.list_chats()
    assert [c["id"] for c in chats] == [with_carol["id"], with_bob["id"]]
    assert [c["unread"] for c in chats] == [1, 2]
    assert chats[0]["last_preview"] == "newest"
    await alice.read(with_bob["id"], 2)
    chats = await alice.list_chats()
    assert [c["unread"] for c in chats] == [1, 0]
