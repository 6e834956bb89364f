"""After a bus outage (frames may have been lost), every connection catches up from its inbox."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pigeon.app import STORE
from pigeon.domain.events import Message
from pigeon.domain.ids import new_id
from pigeon.gateway.keys import SERVICES
from pigeon.ports import SendRequest
from tests.conftest import Server, ServerFactory, next_of
from tests.support.redis import RedisServer


async def test_connections_resync_when_the_bus_recovers(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert alice.user and alice.device and bob.user
    chat = await alice.create_chat([bob.user])
    # A message committed whose push the bus lost: written to the store, never published.
    lost = await server.app[STORE].messages.send(
        SendRequest(
            message_id=new_id(),
            chat=chat["id"],
            sender=alice.user,
            sender_device=alice.device,
            cmid=new_id(),
            at=1,
            body="lost in transit",
            attachment=None,
            preview=None,
        )
    )
    assert lost.deliveries
    server.app[SERVICES].hub._bus_recovered()  # what a bus adapter calls after an outage
    got = await next_of(bob, Message)
    assert (got.id, got.body) == (lost.message.id, "lost in transit")


async def test_a_hung_bus_does_not_hold_back_the_senders_ok(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    await redis.start()
    try:
        server = await make_server(bus={"type": "redis"}, redis={"url": redis.url})
        alice = await server.new_client("alice")
        bob = await server.new_client("bob")
        assert bob.user
        chat = await alice.create_chat([bob.user])
        await alice.send(chat["id"], "before")
        assert (await next_of(bob, Message)).body == "before"
        redis.pause()  # hung, not dead: connections stay open, nothing answers
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = await alice.send(chat["id"], "while redis hangs")
        assert loop.time() - start < 1.0  # committed: the ok does not wait for the push
        redis.resume()
        got = await next_of(bob, Message, timeout=30)  # published (or re-published) after
        assert got.id == sent.id
    finally:
        redis.resume()
        await redis.close()
