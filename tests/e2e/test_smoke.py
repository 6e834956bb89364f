"""1:1 chat between two online users over real WebSockets."""

from __future__ import annotations

from pigeon.domain.events import ChatUpdate, Message, Receipt
from tests.conftest import Server


async def test_one_to_one_online(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user is not None
    chat = await alice.create_chat([bob.user])
    assert chat["kind"] == "direct"
    # both get the chat_update first
    assert isinstance(await bob.next_event(5), ChatUpdate)
    assert isinstance(await alice.next_event(5), ChatUpdate)
    sent = await alice.send(chat["id"], "hello bob")
    assert sent.seq == 1
    msg = await bob.next_event(5)
    assert isinstance(msg, Message)
    assert (msg.body, msg.seq, msg.id, msg.sender) == ("hello bob", 1, sent.id, alice.user)
    receipt = await alice.next_event(5)
    assert isinstance(receipt, Receipt)
    assert (receipt.kind, receipt.seq, receipt.user, receipt.all_seq) == (
        "delivered",
        1,
        bob.user,
        1,
    )
