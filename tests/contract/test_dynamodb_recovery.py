"""The DynamoDB store's recovery worker (adapters/store/dynamodb/recovery.py) and what the
contract's SQL-only checks leave untested on this store.

Recovery finishes a send whose writer crashed after its first step when nobody else does (no
retry of the sender, no later message in the chat): only once the record's lease has passed,
exactly once, and with every recipient then seeing the message at its iseq; one node's worker
at a time does it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.dynamodb.db import DynamoDb
from pigeon.adapters.store.dynamodb.keyspace import message_key
from pigeon.adapters.store.dynamodb.recovery import RecoveryWorker
from pigeon.adapters.store.dynamodb.tables import MESSAGES
from pigeon.domain.events import Message
from tests.contract.test_dynamodb_messages import Crash, ManualClock, crash_at
from tests.contract.test_store import chat, device, events, send_req, user
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
__all__ = ["crash_at"]

DAY_MS = 86_400_000


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def store(dynamo: DynamoDb, clock: ManualClock) -> AsyncIterator[DynamoStore]:
    """The store as the app builds it: its clock, a retention (attachments get a TTL)."""
    yield DynamoStore(dynamo, clock=clock, retention_ms=30 * DAY_MS)


async def test_recovery_finishes_a_crashed_send_after_its_lease_exactly_once(
    store: DynamoStore, clock: ManualClock, crash_at: list[str]
) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db1, db2 = await device(store, a), await device(store, b), await device(store, b)
    c = await chat(store, a, b)
    req = msgspec.structs.replace(send_req(c, da, "lost?"), at=clock.now_ms())
    crash_at.append("reserved")  # seq taken, iseqs reserved, then the writer died
    with pytest.raises(Crash):
        await store.messages.send(req)
    worker = RecoveryWorker(store, clock, interval=0.05)
    assert await worker.recover_once() == 0  # within its lease: its writer may be alive
    for d in (db1, db2):
        assert [e for _, e in await events(store, d) if isinstance(e, Message)] == []

    clock.now += 6_000  # past the 5 s lease
    worker.start()  # its loop's first pass reads from the cursor the pass above left
    try:
        assert await worker.next_pass() == 1
    finally:
        await worker.aclose()
    for d in (db1, db2):
        got = [(i, e.id, e.seq) for i, e in await events(store, d) if isinstance(e, Message)]
        assert got == [(2, req.message_id, 1)]  # after the chat's chat_update, iseq 1
    assert await worker.recover_once() == 0  # finished: nothing twice


async def test_one_node_at_a_time_has_the_turn_until_it_lapses(
    store: DynamoStore, clock: ManualClock
) -> None:
    first = RecoveryWorker(store, clock, interval=60)
    other = RecoveryWorker(store, clock, interval=60)
    assert await first.recover_once() == 0
    assert await other.recover_once() is None  # the first holds it for two intervals
    assert await first.recover_once() == 0  # and renews it
    clock.now += 119_000
    assert await other.recover_once() is None
    clock.now += 2_000  # the first's last pass was 121 s ago: its turn lapsed
    assert await other.recover_once() == 0
    assert await first.recover_once() is None


async def test_a_delivered_message_keeps_neither_its_body_nor_its_push_preview(
    store: DynamoStore,
) -> None:
    """test_push_store.py's `test_a_push_preview_goes_with_the_body` reads SQL columns."""
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    req = msgspec.structs.replace(send_req(c, da, "secret plan"), push_preview="secret plan")
    sent = await store.messages.send(req)
    item = await store.db.get(MESSAGES, message_key(c.id, sent.message.seq))
    assert item is not None and {"raw", "push_preview"} <= item.keys()
    (iseq,) = [d.iseq for d in sent.deliveries if d.device == db.id]
    await store.messages.ack(db, iseq, req.at + 1)
    item = await store.db.get(MESSAGES, message_key(c.id, sent.message.seq))
    assert item is not None and not {"raw", "push_preview"} & item.keys()
