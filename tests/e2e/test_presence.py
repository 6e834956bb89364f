"""Presence (online / last seen, privacy, flapping) and typing indicators over real WebSockets."""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

import aiohttp
import pytest

from pigeon.client import ClientError, PigeonClient
from pigeon.domain.events import PresenceFrame, TypingFrame
from tests.conftest import Server

S = TypeVar("S")
FAST = {"presence": {"grace": 0.2, "typing_ttl": 0.5, "typing_min_interval": 2.0}}


async def signal_of(client: PigeonClient, kind: type[S], timeout: float = 5.0) -> S:
    while True:
        frame = await client.next_signal(timeout)
        if isinstance(frame, kind):
            return frame


async def nothing_within(client: PigeonClient, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await client.next_signal(seconds)


async def pair(server: Server) -> tuple[PigeonClient, str, str]:
    """A watcher sharing a chat with a user who has one (not yet connected) device."""
    watcher = await server.new_client("watcher")
    name, user_id = await server.user("watched")
    await watcher.create_chat([user_id])
    return watcher, name, user_id


async def test_online_then_offline_after_clean_close(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(**FAST)
    watcher, name, user_id = await pair(server)
    (state,) = await watcher.subscribe_presence([user_id])
    assert (state["status"], state["last_seen"]) == ("offline", None)  # never seen

    account = await server.device(name)
    watched = await server.client(account)
    online = await signal_of(watcher, PresenceFrame)
    assert (online.user, online.status) == (user_id, "online")
    before = int(time.time() * 1000)
    await watched.close()
    offline = await signal_of(watcher, PresenceFrame)
    after = int(time.time() * 1000)
    assert offline.status == "offline"
    assert offline.last_seen is not None and before - 50 <= offline.last_seen <= after
    (state,) = await watcher.subscribe_presence([user_id])  # idempotent; current state
    assert (state["status"], state["last_seen"]) == ("offline", offline.last_seen)


async def test_heartbeat_timeout_makes_a_user_offline(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(gateway={"ping_interval": 0.1, "idle_timeout": 0.4}, **FAST)
    watcher, name, user_id = await pair(server)
    await watcher.subscribe_presence([user_id])
    account = await server.device(name)
    async with aiohttp.ClientSession() as http:
        silent = await http.ws_connect(
            f"{server.url}/v1/ws",
            headers={"Authorization": f"Bearer {account.token}"},
            autoping=False,
        )
        assert (await signal_of(watcher, PresenceFrame)).status == "online"
        connected_at = int(time.time() * 1000)
        offline = await signal_of(watcher, PresenceFrame)
        assert offline.status == "offline"
        # last seen is the last sign of life, not the moment the timeout fired
        assert offline.last_seen is not None and offline.last_seen <= connected_at + 100
        await silent.close()


async def test_quick_reconnect_is_not_announced(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(presence={"grace": 1.0})
    watcher, name, user_id = await pair(server)
    await watcher.subscribe_presence([user_id])
    watched = await server.client(await server.device(name))
    assert (await signal_of(watcher, PresenceFrame)).status == "online"
    await watched.drop_connection()  # the SDK reconnects at once
    await nothing_within(watcher, 1.5)


async def test_hidden_presence_shows_unknown(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(**FAST)
    watcher, name, user_id = await pair(server)
    await watcher.subscribe_presence([user_id])
    watched = await server.client(await server.device(name))
    # wait for the arrival itself: subscribing after connecting races with its announcement
    assert (await signal_of(watcher, PresenceFrame)).status == "online"
    await watched.set_visibility("nobody")
    assert (await signal_of(watcher, PresenceFrame)).status == "unknown"
    (state,) = await watcher.subscribe_presence([user_id])
    assert (state["status"], state["last_seen"]) == ("unknown", None)
    await watched.close()
    await nothing_within(watcher, 0.6)  # the departure is not announced either

    again = await server.client(await server.device(name, "second"))
    await again.set_visibility("chats")
    frame = await signal_of(watcher, PresenceFrame)
    assert frame.status == "online"


async def test_only_chat_partners_may_subscribe(server: Server) -> None:
    stranger = await server.new_client("stranger")
    _, user_id = await server.user("private")
    with pytest.raises(ClientError) as err:
        await stranger.subscribe_presence([user_id])
    assert err.value.code == "forbidden"
    assert stranger.user
    (me,) = await stranger.subscribe_presence([stranger.user])
    assert me["status"] == "online"
    with pytest.raises(ClientError) as err:
        await stranger.subscribe_presence(["not-an-id"])
    assert err.value.code == "bad_request"


async def test_subscriptions_die_with_the_connection(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(**FAST)
    watcher, _, user_id = await pair(server)
    await watcher.subscribe_presence([user_id])
    service = server.app[__import__("pigeon.gateway.keys").gateway.keys.SERVICES].presence
    assert user_id in service._watchers
    await watcher.close()
    await asyncio.wait_for(_until_empty(service), 5)


async def _until_empty(service) -> None:  # type: ignore[no-untyped-def]
    while service._watchers:  # noqa: ASYNC110 - the server side of a close has no event
        await asyncio.sleep(0.01)


async def test_typing_reaches_online_members_only_and_expires(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(**FAST)
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    carol_name, carol_id = await server.user("carol")
    carol_account = await server.device(carol_name)
    assert bob.user
    chat = await alice.create_chat([bob.user, carol_id], name="three")
    assert await alice.typing(chat["id"])
    frame = await signal_of(bob, TypingFrame)
    assert (frame.chat, frame.user, frame.typing, frame.ttl_ms) == (
        chat["id"],
        alice.user,
        True,
        500,
    )
    assert not await alice.typing(chat["id"])  # renewal within min_interval: not forwarded
    expired = await signal_of(bob, TypingFrame)  # ttl passes with no renewal forwarded
    assert expired.typing is False

    carol = await server.client(carol_account)  # was offline: nothing stored for her
    await nothing_within(carol, 0.3)
    with pytest.raises(ClientError) as err:
        await (await server.new_client("outsider")).typing(chat["id"])
    assert err.value.code == "forbidden"


async def test_typing_stops_when_the_typist_leaves(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(presence={"typing_ttl": 30.0})
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    await alice.typing(chat["id"])
    assert (await signal_of(bob, TypingFrame)).typing
    await alice.close()
    assert (await signal_of(bob, TypingFrame)).typing is False


async def test_a_typist_leaving_stops_its_typing_in_every_chat_not_others(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(presence={"typing_ttl": 30.0})
    alice = await server.new_client("alice")
    carol = await server.new_client("carol")
    bob = await server.new_client("bob")
    assert bob.user and carol.user
    chats = [await alice.create_chat([bob.user], name=f"g{i}") for i in range(2)]
    theirs = await carol.create_chat([bob.user])
    for chat in (*chats, theirs):
        typist = carol if chat is theirs else alice
        await typist.typing(chat["id"])
        assert (await signal_of(bob, TypingFrame)).chat == chat["id"]
    await alice.close()
    stops = [await signal_of(bob, TypingFrame) for _ in chats]
    assert sorted((f.chat, f.user, f.typing) for f in stops) == sorted(
        (c["id"], alice.user, False) for c in chats
    )
    await carol.typing(theirs["id"], False)  # carol was still typing: her stop is forwarded
    frame = await signal_of(bob, TypingFrame)
    assert (frame.chat, frame.user, frame.typing) == (theirs["id"], carol.user, False)


async def test_typist_who_left_the_chat_still_goes_offline(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(presence={"grace": 0.1, "typing_ttl": 30.0})
    watcher, name, user_id = await pair(server)  # shares a direct chat with the typist
    typist = await server.client(await server.device(name))
    group = await watcher.create_chat([user_id], name="g")
    await watcher.subscribe_presence([user_id])
    await typist.typing(group["id"])
    await typist.leave_chat(group["id"])
    await typist.close()
    frame = await signal_of(watcher, PresenceFrame)
    while frame.status != "offline":
        frame = await signal_of(watcher, PresenceFrame)
