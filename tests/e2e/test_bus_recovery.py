"""After a bus outage (frames may have been lost), every connection catches up from its inbox."""

from __future__ import annotations

from pigeon.app import STORE
from pigeon.domain.events import Message
from pigeon.domain.ids import new_id
from pigeon.gateway.keys import SERVICES
from pigeon.ports import SendRequest
from tests.conftest import Server, next_of


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
