"""Several nodes form one server: delivery, receipts, presence, typing and device replacement
across nodes, on a single Redis and on a Redis Cluster (sharded pub/sub); `--workers N`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import aiohttp
import pytest

from pigeon.client import PigeonClient, login, register
from pigeon.domain.events import Message, PresenceFrame, Receipt, TypingFrame
from tests.chaos.conftest import StartNodes, connect, env_for
from tests.conftest import PASSWORD, next_of
from tests.support.cluster import Node, wait_healthy

pytestmark = pytest.mark.slow


async def signal_of(client: Any, kind: type[Any], timeout: float = 10.0) -> Any:
    while True:
        frame = await client.next_signal(timeout)
        if isinstance(frame, kind):
            return frame


async def test_two_nodes_act_as_one_server(
    database: str, redis_target: tuple[str, bool], start_nodes: StartNodes, clients: list[Any]
) -> None:
    url, is_cluster = redis_target
    n1, n2 = await start_nodes(2, env_for(database, url, is_cluster))
    await register(n1.url, "alice", PASSWORD)
    bob_id = await register(n2.url, "bob", PASSWORD)
    alice = await connect(clients, n1.url, (await login(n1.url, "alice", PASSWORD)).token)
    bob_token = (await login(n2.url, "bob", PASSWORD)).token
    bob = await connect(clients, n2.url, bob_token)
    chat = await alice.create_chat([bob_id])
    await alice.subscribe_presence([bob_id])

    sent = [await alice.send(chat["id"], f"hello {i}") for i in range(20)]
    got = [await next_of(bob, Message) for _ in range(20)]
    assert [m.id for m in got] == [s.id for s in sent]  # pushed across nodes, in order
    await bob.read(chat["id"], got[-1].seq)
    receipt = await next_of(alice, Receipt)
    while receipt.kind != "read":
        receipt = await next_of(alice, Receipt)
    assert receipt.seq == got[-1].seq

    await bob.typing(chat["id"])
    assert (await signal_of(alice, TypingFrame)).user == bob_id

    # the same device connecting on the other node replaces its first connection (4503)
    await bob.close()
    headers = {"Authorization": f"Bearer {bob_token}"}
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(f"{n2.url}/v1/ws", headers=headers)
        assert json.loads((await first.receive(timeout=10)).data)["t"] == "ready"
        second = await http.ws_connect(f"{n1.url}/v1/ws", headers=headers)
        msg = await first.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:  # sync frames before the close
            msg = await first.receive(timeout=10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4503)
        await first.close()
        await second.close()


async def test_senders_on_two_nodes_need_no_sync_at_the_receiver(
    database: str, redis_target: tuple[str, bool], start_nodes: StartNodes, clients: list[Any]
) -> None:
    """Live events of one device can overtake each other when they are committed on two nodes
    (each node publishes its own commits): the SDK holds the early one for its reorder window
    (protocol.md §1) instead of asking for a sync, and the server pays nothing for it."""
    url, is_cluster = redis_target
    n1, n2 = await start_nodes(2, env_for(database, url, is_cluster))
    reader_id = await register(n1.url, "reader", PASSWORD)
    senders = []
    for name, node in (("left", n1), ("right", n2)):
        await register(node.url, name, PASSWORD)
        senders.append(
            await connect(clients, node.url, (await login(node.url, name, PASSWORD)).token)
        )
    reader = await connect(clients, n1.url, (await login(n1.url, "reader", PASSWORD)).token)
    chats = [await s.create_chat([reader_id]) for s in senders]
    per_sender = 150

    async def burst(sender: PigeonClient, chat_id: str) -> None:
        for i in range(per_sender):
            await sender.send(chat_id, f"m{i}")

    await asyncio.gather(*(burst(s, c["id"]) for s, c in zip(senders, chats, strict=True)))
    got = [await next_of(reader, Message) for _ in range(2 * per_sender)]
    for c in chats:  # each chat in order, nothing lost or twice
        assert [m.body for m in got if m.chat == c["id"]] == [f"m{i}" for i in range(per_sender)]
    assert reader.reorder_syncs == 0
    assert reader.reorder_max_wait < reader.gap_timeout


async def watched_on_second_node(
    database: str,
    redis_target: tuple[str, bool],
    start_nodes: StartNodes,
    clients: list[Any],
    grace: str,
) -> tuple[Node, PigeonClient, PigeonClient]:
    """Two nodes with a 1.5 s session TTL; a watcher on the first subscribed to a user whose
    device is online on the second. Returns (second node, watcher, watched device)."""
    url, is_cluster = redis_target
    env = env_for(
        database,
        url,
        is_cluster,
        PIGEON_PRESENCE__SESSION_TTL="1.5",
        PIGEON_PRESENCE__GRACE=grace,
    )
    n1, n2 = await start_nodes(2, env)
    await register(n1.url, "watcher", PASSWORD)
    user_id = await register(n1.url, "watched", PASSWORD)
    watcher = await connect(clients, n1.url, (await login(n1.url, "watcher", PASSWORD)).token)
    await watcher.create_chat([user_id])
    await watcher.subscribe_presence([user_id])
    account = await login(n1.url, "watched", PASSWORD)
    watched = await connect(clients, n2.url, account.token, reconnect=False)
    assert (await signal_of(watcher, PresenceFrame)).status == "online"
    return n2, watcher, watched


async def test_a_crashed_nodes_users_go_offline_within_the_session_ttl(
    database: str, redis_target: tuple[str, bool], start_nodes: StartNodes, clients: list[Any]
) -> None:
    n2, watcher, _ = await watched_on_second_node(
        database, redis_target, start_nodes, clients, grace="0.2"
    )
    killed_at = asyncio.get_running_loop().time()
    n2.kill()
    offline = await signal_of(watcher, PresenceFrame, timeout=10)
    assert offline.status == "offline"
    # within the TTL, plus one refresh period of the surviving node's reaper
    assert asyncio.get_running_loop().time() - killed_at < 1.5 + 0.5 + 1.0


async def test_workers_share_one_port_and_are_restarted(
    database: str, redis_url: str, start_nodes: StartNodes, clients: list[Any]
) -> None:
    (node,) = await start_nodes(1, env_for(database, redis_url), workers=2)
    pids = await _pids_behind(node.url, want=2)
    assert len(pids) == 2
    os.kill(next(iter(pids)), signal.SIGKILL)  # the supervisor starts a new worker
    replaced = await _pids_behind(node.url, want=1, exclude=pids)
    assert replaced

    await register(node.url, "worker_a", PASSWORD)
    w2 = await register(node.url, "worker_b", PASSWORD)
    a = await connect(clients, node.url, (await login(node.url, "worker_a", PASSWORD)).token)
    b = await connect(clients, node.url, (await login(node.url, "worker_b", PASSWORD)).token)
    chat = await a.create_chat([w2])
    sent = await a.send(chat["id"], "through either worker")
    assert (await next_of(b, Message)).id == sent.id
    for c in (a, b):
        await c.close()
    assert await node.terminate() == 0


async def _pids_behind(
    url: str, want: int, exclude: frozenset[int] | set[int] = frozenset()
) -> set[int]:
    """Worker pids seen through fresh connections until `want` distinct ones (not excluded)."""
    seen: set[int] = set()
    async with asyncio.timeout(30):
        while len(seen) < want:
            try:
                body = await wait_healthy(url)
            except TimeoutError:
                continue
            pid = int(body["pid"])  # type: ignore[call-overload]
            if pid not in exclude:
                seen.add(pid)
    return seen


async def test_a_node_dying_within_the_grace_period_still_gets_its_user_offline(
    database: str, redis_target: tuple[str, bool], start_nodes: StartNodes, clients: list[Any]
) -> None:
    n2, watcher, watched = await watched_on_second_node(
        database, redis_target, start_nodes, clients, grace="1.5"
    )
    await watched.close()  # n2 starts its grace timer...
    n2.kill()  # ...and dies with it
    offline = await signal_of(watcher, PresenceFrame, timeout=15)
    assert offline.status == "offline" and offline.last_seen is not None
