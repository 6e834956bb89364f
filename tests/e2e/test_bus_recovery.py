"""After a bus outage (frames may have been lost), the connections of the channels it names catch
up from their inboxes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pigeon.app import STORE
from pigeon.domain.events import Message
from pigeon.domain.ids import new_id
from pigeon.gateway.keys import SERVICES
from pigeon.ports import SendRequest
from pigeon.services import channels
from tests.conftest import Server, ServerFactory, next_of
from tests.support.redis import RedisServer


async def test_the_connections_the_bus_names_resync_when_it_recovers(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    carol = await server.new_client("carol")
    assert alice.user and alice.device and bob.user and bob.device and carol.user
    assert carol.device
    chat = await alice.create_chat([bob.user, carol.user], name="g")
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
    assert len(lost.deliveries) == 2
    hub = server.app[SERVICES].hub
    hub._bus_recovered({channels.device(bob.device)})  # what a bus adapter calls: bob's lost
    got = await next_of(bob, Message)
    assert (got.id, got.body) == (lost.message.id, "lost in transit")
    with pytest.raises(TimeoutError):  # carol's channel was not named: no resync for her
        await next_of(carol, Message, timeout=0.3)
    hub._bus_recovered({channels.device(carol.device), channels.presence(carol.user)})
    got = await next_of(carol, Message)
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
