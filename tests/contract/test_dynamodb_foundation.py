"""The DynamoDB store's foundation (`adapters/store/dynamodb/db.py`, `codec.py`, `tables.py`)
against a real DynamoDB endpoint (moto, server mode) and, for the failures moto never makes,
through `FaultProxy`: tables, counters, conditions, transactions, retries, sizes, capacity."""

from __future__ import annotations

import asyncio

import pytest

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.dynamodb.codec import (
    EXPIRES,
    MAX_ITEM_BYTES,
    Expr,
    decode,
    encode,
    expires_at,
    int_of,
    is_live,
    item_size,
    key,
    key_num,
    live_filter,
    num_key,
)
from pigeon.adapters.store.dynamodb.db import (
    ConditionFailed,
    DynamoDb,
    RequestRefused,
    TransactionCancelled,
)
from pigeon.adapters.store.dynamodb.tables import CHATS, INBOX, MESSAGES, TABLES, shard
from pigeon.domain.errors import TooLarge, Unavailable
from tests.support import dynamodb as support
from tests.support.dynamodb import FaultProxy, MotoDynamo, fresh_prefix, make_db

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
fault_proxy = support.fault_proxy


def _item(pk: str, sk: str = "#", **values: object) -> dict[str, dict[str, object]]:
    return key(pk, sk) | encode(values)  # type: ignore[arg-type]


# -- tables ---------------------------------------------------------------------------------------


async def test_open_creates_every_table_once(moto_dynamodb: MotoDynamo) -> None:
    prefix = fresh_prefix()
    first = make_db(moto_dynamodb.endpoint, prefix)
    await first.open()
    try:
        names: list[str] = []
        page: dict[str, str] = {}
        while True:  # pages of 100: the session's moto holds every test's tables
            listed = await first.call("list_tables", idempotent=True, **page)
            names += listed["TableNames"]
            if "LastEvaluatedTableName" not in listed:
                break
            page = {"ExclusiveStartTableName": listed["LastEvaluatedTableName"]}
        assert {first.name(t) for t in TABLES} <= set(names)
        for table in TABLES:
            described = (
                await first.call("describe_table", idempotent=True, TableName=first.name(table))
            )["Table"]
            assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
            indexes = {ix["IndexName"] for ix in described.get("GlobalSecondaryIndexes", [])}
            assert indexes == {ix.name for ix in table.indexes}
            ttl = await first.call(
                "describe_time_to_live", idempotent=True, TableName=first.name(table)
            )
            assert ttl["TimeToLiveDescription"]["AttributeName"] == EXPIRES
        await first.put(MESSAGES, _item("kept"))
    finally:
        await first.aclose()
    # Opening again (another node, or a restart) creates nothing and keeps the data; so does a
    # node that may not create tables.
    for create in (True, False):
        again = make_db(moto_dynamodb.endpoint, prefix, create_tables=create)
        await again.open()
        assert await again.get(MESSAGES, key("kept")) is not None
        await again.aclose()


async def test_missing_tables_are_an_error_when_not_allowed_to_create(
    moto_dynamodb: MotoDynamo,
) -> None:
    db = make_db(moto_dynamodb.endpoint, fresh_prefix(), create_tables=False)
    with pytest.raises(Unavailable, match="does not exist"):
        await db.open()


async def test_the_store_opens_pings_and_closes(moto_dynamodb: MotoDynamo) -> None:
    store = DynamoStore(make_db(moto_dynamodb.endpoint, fresh_prefix()))
    await store.open()
    await store.ping()
    await store.aclose()
    with pytest.raises(Unavailable):
        await store.ping()


# -- counters, conditions, transactions -----------------------------------------------------------


async def test_a_counter_taken_by_50_tasks_at_once_gives_50_consecutive_numbers(
    dynamo: DynamoDb,
) -> None:
    head = key("D#device")
    await dynamo.put_new(INBOX, _item("D#device", next_iseq=0))
    taken = await asyncio.gather(
        *(dynamo.add(INBOX, head, "next_iseq", must_exist=True) for _ in range(50))
    )
    assert sorted(taken) == list(range(1, 51))
    stored = await dynamo.get(INBOX, head)
    assert stored is not None and int_of(stored, "next_iseq") == 50


async def test_a_counter_that_must_exist_creates_nothing(dynamo: DynamoDb) -> None:
    with pytest.raises(ConditionFailed):
        await dynamo.add(INBOX, key("D#revoked"), "next_iseq", must_exist=True)
    assert await dynamo.get(INBOX, key("D#revoked")) is None
    assert await dynamo.add(INBOX, key("D#new"), "n", 5, must_exist=False) == 5


async def test_a_conditional_put_refuses_a_duplicate_and_shows_the_original(
    dynamo: DynamoDb,
) -> None:
    claim = _item("K#device#cmid-1", message="m1")
    await dynamo.put_new(MESSAGES, claim)
    with pytest.raises(ConditionFailed) as caught:
        await dynamo.put_new(MESSAGES, _item("K#device#cmid-1", message="m2"))
    assert caught.value.item == claim and not caught.value.retried
    stored = await dynamo.get(MESSAGES, key("K#device#cmid-1"))
    assert stored is not None and decode(stored)["message"] == "m1"


async def test_a_cancelled_transaction_says_which_condition_failed(dynamo: DynamoDb) -> None:
    await dynamo.put(CHATS, _item("C#chat", last_seq=7))
    expr = Expr()
    take_seq = dynamo.tx_update(
        CHATS,
        key("C#chat"),
        f"SET {expr.name('last_seq')} = {expr.value(8)}",
        expr,
        condition=f"{expr.name('last_seq')} = {expr.value(6)}",  # stale: it is 7
    )
    items = [
        dynamo.tx_put(MESSAGES, _item("C#chat", num_key(8), body="hi")),
        take_seq,
        dynamo.tx_put(MESSAGES, _item("K#d#c"), condition="attribute_not_exists(pk)"),
    ]
    with pytest.raises(TransactionCancelled) as caught:
        await dynamo.transact_write(items)
    assert caught.value.failed == [1]
    assert caught.value.reasons[1].item == _item("C#chat", last_seq=7)
    assert await dynamo.get(MESSAGES, key("C#chat", num_key(8))) is None  # all or nothing
    assert await dynamo.get(MESSAGES, key("K#d#c")) is None


async def test_a_transaction_of_more_than_100_items_is_refused_before_sending(
    dynamo: DynamoDb,
) -> None:
    items = [dynamo.tx_put(INBOX, _item("D#x", num_key(i))) for i in range(101)]
    with pytest.raises(ValueError):
        await dynamo.transact_write(items)


# -- throttling and failures (injected at the HTTP level) -----------------------------------------


async def _through(proxy: FaultProxy, **options: object) -> DynamoDb:
    db = make_db(proxy.url, fresh_prefix(), **options)
    await db.open()
    return db


async def test_throttling_is_retried_until_it_passes(fault_proxy: FaultProxy) -> None:
    db = await _through(fault_proxy, max_attempts=5)
    try:
        fault_proxy.fail("PutItem", "ProvisionedThroughputExceededException", times=2)
        fault_proxy.fail("PutItem", "ThrottlingException", times=1)
        fault_proxy.seen.clear()
        await db.put(INBOX, _item("D#a"))
        assert fault_proxy.seen["PutItem"] == 4
        assert db.capacity.throttled == 3 and db.capacity.retries == 3
        assert await db.get(INBOX, key("D#a")) is not None
    finally:
        await db.aclose()


async def test_persistent_throttling_surfaces_unavailable(fault_proxy: FaultProxy) -> None:
    db = await _through(fault_proxy, max_attempts=4)
    try:
        fault_proxy.fail("UpdateItem", "RequestLimitExceeded", times=None)
        fault_proxy.seen.clear()
        with pytest.raises(Unavailable, match="RequestLimitExceeded") as caught:
            await db.add(INBOX, key("D#a"), "n", must_exist=False)
        assert caught.value.temporary
        assert fault_proxy.seen["UpdateItem"] == 4
    finally:
        await db.aclose()


async def test_an_unknown_outcome_is_retried_only_when_idempotent(fault_proxy: FaultProxy) -> None:
    db = await _through(fault_proxy)
    try:
        fault_proxy.fail("UpdateItem", "InternalServerError", status=500, times=1)
        fault_proxy.seen.clear()
        with pytest.raises(Unavailable):  # the counter may have moved: never sent twice
            await db.add(INBOX, key("D#a"), "n", must_exist=False)
        assert fault_proxy.seen["UpdateItem"] == 1
        fault_proxy.fail("GetItem", "InternalServerError", status=500, times=1)
        assert await db.get(INBOX, key("D#a")) is None  # a read is simply asked again
        assert fault_proxy.seen["GetItem"] == 2
    finally:
        await db.aclose()


async def test_a_transaction_cancelled_by_a_conflict_is_retried(fault_proxy: FaultProxy) -> None:
    db = await _through(fault_proxy)
    try:
        fault_proxy.fail(
            "TransactWriteItems",
            "TransactionCanceledException",
            CancellationReasons=[{"Code": "None"}, {"Code": "TransactionConflict"}],
        )
        fault_proxy.seen.clear()
        await db.transact_write([db.tx_put(INBOX, _item("D#a")), db.tx_put(INBOX, _item("D#b"))])
        assert fault_proxy.seen["TransactWriteItems"] == 2
        assert len(await db.batch_get(INBOX, [key("D#a"), key("D#b")])) == 2
    finally:
        await db.aclose()


# -- sizes ----------------------------------------------------------------------------------------


def test_item_size_counts_names_and_values_as_dynamodb_does() -> None:
    assert item_size(encode({"ab": "héllo"})) == 2 + 6
    assert item_size(encode({"n": 12345})) == 1 + 4  # 5 digits: 3 bytes + 1
    assert item_size(encode({"b": b"\x00" * 10, "t": True})) == 1 + 10 + 1 + 1
    assert item_size(encode({"l": ["a", 1]})) == 1 + 3 + (1 + 1) + (1 + 2)
    assert item_size(encode({"m": {"k": "v"}})) == 1 + 3 + 1 + 1 + 1


async def test_an_item_over_400_kb_is_refused_before_it_is_sent(dynamo: DynamoDb) -> None:
    base = _item("M#big")
    room = MAX_ITEM_BYTES - item_size(base) - len("body")
    await dynamo.put(MESSAGES, base | encode({"body": b"x" * room}))  # exactly at the limit
    calls = sum(dynamo.capacity.calls.values())
    with pytest.raises(TooLarge):
        await dynamo.put(MESSAGES, base | encode({"body": b"x" * (room + 1)}))
    with pytest.raises(TooLarge):
        dynamo.tx_put(MESSAGES, base | encode({"body": b"x" * (room + 1)}))
    assert sum(dynamo.capacity.calls.values()) == calls


async def test_an_update_that_grows_an_item_too_far_is_too_large(dynamo: DynamoDb) -> None:
    await dynamo.put(MESSAGES, _item("M#grow", a=b"x" * 300_000))
    expr = Expr()
    with pytest.raises(TooLarge):
        await dynamo.update(
            MESSAGES,
            key("M#grow"),
            f"SET {expr.name('b')} = {expr.value(b'y' * 300_000)}",
            expr,
            idempotent=True,
        )


# -- capacity -------------------------------------------------------------------------------------


async def test_capacity_counters_move_with_every_call(dynamo: DynamoDb) -> None:
    before = dynamo.capacity.snapshot()
    await dynamo.put(INBOX, _item("D#c", next_iseq=1))
    await dynamo.get(INBOX, key("D#c"))
    await dynamo.add(INBOX, key("D#c"), "next_iseq", must_exist=True)
    expr = Expr()
    await dynamo.query_items(INBOX, f"{expr.name('pk')} = {expr.value('D#c')}", expr)
    await dynamo.transact_write([dynamo.tx_put(INBOX, _item("D#d"))])
    delta = dynamo.capacity.snapshot() - before
    assert delta.calls == {
        "put_item": 1,
        "get_item": 1,
        "update_item": 1,
        "query": 1,
        "transact_write_items": 1,
    }
    assert delta.write_units >= 1.5 and delta.read_units >= 1.0
    assert delta.units_by_table[dynamo.name(INBOX)] == delta.read_units + delta.write_units
    assert delta.unreported <= 1  # moto reports no capacity for transactions


# -- queries and batches --------------------------------------------------------------------------


async def test_queries_page_through_filters_and_batches_split(dynamo: DynamoDb) -> None:
    entries = [
        _item("D#q", num_key(i), at=i, **{EXPIRES: 10 if i % 3 == 0 else 10**10})
        for i in range(1, 61)
    ]
    await dynamo.batch_write(INBOX, puts=entries)  # 3 calls of 25
    expr = Expr()
    live = await dynamo.query_items(
        INBOX,
        f"{expr.name('pk')} = {expr.value('D#q')}"
        f" AND {expr.name('sk')} > {expr.value(num_key(10))}",
        expr,
        where=live_filter(expr, now_ms=1_000_000),
        page_size=4,  # pages the filter leaves empty are read past
        limit=7,
    )
    assert [key_num(e["sk"]["S"]) for e in live] == [11, 13, 14, 16, 17, 19, 20]
    expr = Expr()
    assert await dynamo.count(INBOX, f"{expr.name('pk')} = {expr.value('D#q')}", expr) == 60
    keys = [key("D#q", num_key(i)) for i in range(1, 151)]  # 2 calls of <= 100; 90 missing
    assert len(await dynamo.batch_get(INBOX, keys + keys[:5])) == 60
    await dynamo.batch_write(INBOX, deletes=keys[:60])
    assert await dynamo.batch_get(INBOX, keys[:60]) == []


def test_codec_round_trips_and_orders() -> None:
    values = {"s": "x", "n": -3, "b": b"\x01", "t": False, "l": [1, "a"], "m": {"k": 2}}
    assert decode(encode(values | {"gone": None})) == values
    assert sorted(num_key(n) for n in (10, 9, 100)) == [num_key(9), num_key(10), num_key(100)]
    assert expires_at(1_000, 30_000) == 31 and expires_at(1_001, 30_000) == 32
    assert is_live(encode({EXPIRES: 31}), 30_999) and not is_live(encode({EXPIRES: 31}), 31_000)
    assert is_live({}, 10**15)
    # Fixed value: a shard must be the same in every process (not a salted `hash`).
    assert shard("device-1", 64) == 57 and 0 <= shard("x", 64) < 64


async def test_a_transaction_that_fails_while_writing_leaves_nothing_written(
    dynamo: DynamoDb,
) -> None:
    """The tests' moto checks a transaction's conditions before writing (tests/support/
    dynamodb.py, `_transact_write_items`); a write that fails only when applied (an item
    grown past the size limit) puts back what the transaction wrote before it."""
    await dynamo.put(MESSAGES, _item("M#grow", a=b"x" * 300_000))
    await dynamo.put(MESSAGES, _item("M#kept", v=1))
    expr = Expr()
    items = [
        dynamo.tx_put(MESSAGES, _item("M#new", v=1)),
        dynamo.tx_put(MESSAGES, _item("M#kept", v=2)),
        dynamo.tx_update(
            MESSAGES, key("M#grow"), f"SET {expr.name('b')} = {expr.value(b'y' * 300_000)}", expr
        ),
    ]
    with pytest.raises((TooLarge, TransactionCancelled, RequestRefused)):
        await dynamo.transact_write(items)
    assert await dynamo.get(MESSAGES, key("M#new")) is None
    assert await dynamo.get(MESSAGES, key("M#kept")) == _item("M#kept", v=1)
