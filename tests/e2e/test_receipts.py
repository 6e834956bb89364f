"""Receipts: delivered and read, 1:1 and group aggregation, offline senders, read-state sync."""

from __future__ import annotations

import asyncio
import time

import pytest

from pigeon.app import STORE
from pigeon.client import ClientError, PigeonClient
from pigeon.domain.events import Message, ReadState, Receipt
from tests.conftest import Server, next_of


async def test_one_to_one_receipt_lifecycle(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert alice.user and bob.user
    chat = await alice.create_chat([bob.user])
    sent = await alice.send(chat["id"], "see you at 5")
    assert (await next_of(bob, Message)).id == sent.id

    delivered = await next_of(alice, Receipt)
    assert (delivered.kind, delivered.user, delivered.seq, delivered.all_seq) == (
        "delivered",
        bob.user,
        1,
        1,
    )
    await bob.read(chat["id"], sent.seq)
    read = await next_of(alice, Receipt)
    assert (read.kind, read.user, read.seq, read.all_seq) == ("read", bob.user, 1, 1)

    detail = await alice.receipts(chat["id"], sent.id)
    (member,) = detail["members"]
    assert member["user"] == bob.user
    assert member["delivered_at"] <= member["read_at"]


async def test_offline_sender_gets_receipts_later(server: Server) -> None:
    alice_name, _ = await server.user("alice")
    alice_account = await server.device(alice_name)
    alice = await server.client(alice_account)
    bob_name, bob_id = await server.user("bob")
    bob_account = await server.device(bob_name)  # bob has a device, offline for now
    chat = await alice.create_chat([bob_id])
    sent = await alice.send(chat["id"], "call me")
    await alice.close()

    bob = await server.client(bob_account)
    assert (await next_of(bob, Message)).id == sent.id
    await bob.read(chat["id"], sent.seq)

    alice = await server.client(alice_account)
    receipt = await next_of(alice, Receipt)
    if receipt.kind == "delivered":  # bob's ack may land before or after his read
        receipt = await next_of(alice, Receipt)
    assert (receipt.kind, receipt.user, receipt.seq) == ("read", bob_id, sent.seq)


async def test_group_receipts_aggregate_over_all_members(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    carol_name, carol_id = await server.user("carol")
    carol_account = await server.device(carol_name)
    assert bob.user
    chat = await alice.create_chat([bob.user, carol_id], name="trio")
    sent = await alice.send(chat["id"], "hike at 8")
    assert (await next_of(bob, Message)).id == sent.id
    first = await next_of(alice, Receipt)
    assert (first.user, first.seq, first.all_seq) == (bob.user, 1, 0)  # carol has not got it

    detail = await alice.receipts(chat["id"], sent.id)
    by_user = {m["user"]: m for m in detail["members"]}
    assert by_user[bob.user]["delivered_at"] is not None
    assert by_user[carol_id]["delivered_at"] is None

    carol = await server.client(carol_account)
    assert (await next_of(carol, Message)).id == sent.id
    second = await next_of(alice, Receipt)
    assert (second.user, second.kind, second.all_seq) == (carol_id, "delivered", 1)

    await bob.read(chat["id"], 1)
    assert (await next_of(alice, Receipt)).all_seq == 0  # carol has not read it
    await carol.read(chat["id"], 1)
    last = await next_of(alice, Receipt)
    assert (last.kind, last.all_seq) == ("read", 1)

    with pytest.raises(ClientError) as err:
        await bob.receipts(chat["id"], sent.id)
    assert err.value.code == "forbidden"  # only the sender sees per-member detail


async def test_read_state_syncs_to_own_devices(server: Server) -> None:
    name, _ = await server.user("multi")
    phone = await server.client(await server.device(name, "phone"))
    laptop = await server.client(await server.device(name, "laptop"))
    friend = await server.new_client("friend")
    assert phone.user
    chat = await friend.create_chat([phone.user])
    sent = await friend.send(chat["id"], "hi")
    await next_of(phone, Message)
    await phone.read(chat["id"], sent.seq)
    state = await next_of(laptop, ReadState)
    assert (state.chat, state.seq) == (chat["id"], sent.seq)


async def test_an_ack_riding_on_a_send_counts_as_an_ack(server: Server) -> None:
    alice = await server.new_client("alice")
    bob_name, bob_id = await server.user("bob")
    bob_account = await server.device(bob_name)
    # The ack timer never fires: only the ack riding on bob's reply can deliver alice's receipt.
    bob = await server.client(bob_account, ack_interval=3600)
    chat = await alice.create_chat([bob_id])
    sent = await alice.send(chat["id"], "ping")
    assert (await next_of(bob, Message)).id == sent.id

    await bob.send(chat["id"], "pong")
    delivered = await next_of(alice, Receipt)
    assert (delivered.kind, delivered.user, delivered.seq) == ("delivered", bob_id, 1)
    await bob.close()
    again = await server.client(bob_account)
    later = await alice.send(chat["id"], "after the reconnect")
    # Events come in inbox order: had "ping" not been acked, it would come back first.
    assert (await next_of(again, Message)).id == later.id


async def test_a_bad_riding_ack_fails_the_send(server: Server) -> None:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    with pytest.raises(ClientError) as err:
        await alice.request("send", chat=chat["id"], cmid="c1", body="x", ack=-1)
    assert err.value.code == "bad_request"


async def _acked(server: Server, client: PigeonClient) -> int:
    assert client.device is not None
    return await server.app[STORE].messages.acked_iseq(client.device)


async def test_a_receipt_alone_is_acked_lazily(server: Server) -> None:
    """Taking only a receipt does not ack within the 5 ms window (no command for it): the ack
    waits `lazy_ack_interval` for a send to carry it, then goes on its own."""
    alice_name, alice_id = await server.user("alice")
    alice = await server.client(await server.device(alice_name), lazy_ack_interval=0.3)
    acks: asyncio.Queue[float] = asyncio.Queue()
    ack = alice.ack

    async def ack_seen(upto: int) -> None:  # the SDK's own acks, observed
        await ack(upto)
        acks.put_nowait(time.monotonic())

    alice.ack = ack_seen  # type: ignore[method-assign]
    bob = await server.new_client("bob")
    chat = await bob.create_chat([alice_id])
    await bob.send(chat["id"], "hi")
    await next_of(alice, Message)  # urgent: acked at once, with what came before it
    await asyncio.wait_for(acks.get(), 10)
    await alice.send(chat["id"], "hi back")  # nothing left to carry
    await next_of(bob, Message)  # bob takes it: acked, his receipt goes to alice
    await next_of(alice, Receipt)  # bob's delivered receipt: the only event pending
    taken = time.monotonic()
    acked = await asyncio.wait_for(acks.get(), 10)
    assert acked - taken >= 0.3
    assert await _acked(server, alice) > 0


async def test_a_receipt_ack_rides_on_the_next_send(server: Server) -> None:
    alice_name, _ = await server.user("alice")
    # The lazy timer never fires: only the next send can ack the receipt.
    alice = await server.client(await server.device(alice_name), lazy_ack_interval=3600)
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    await alice.send(chat["id"], "one")
    await next_of(bob, Message)
    await next_of(alice, Receipt)
    assert await _acked(server, alice) == 0
    await alice.send(chat["id"], "two")
    assert await _acked(server, alice) > 0  # up to the receipt (after her chat's creation)


async def test_a_message_after_a_receipt_is_acked_at_once(server: Server) -> None:
    """A message taken while a lazy ack waits ends the wait: its sender's receipt is not
    held back by the receipts before it."""
    alice_name, _ = await server.user("alice")
    alice = await server.client(await server.device(alice_name), lazy_ack_interval=3600)
    bob = await server.new_client("bob")
    assert bob.user and alice.user
    chat = await alice.create_chat([bob.user])
    await alice.send(chat["id"], "hi")
    await next_of(bob, Message)
    await next_of(alice, Receipt)
    reply = await bob.send(chat["id"], "hi back")
    assert (await next_of(alice, Message)).id == reply.id
    delivered = await next_of(bob, Receipt)
    assert (delivered.user, delivered.seq) == (alice.user, reply.seq)
