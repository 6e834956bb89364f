"""What the PostgreSQL store does beyond the shared contract: events built by the database are
the bytes msgspec would encode, migrations and idempotent writes are race-free, sweeps chunk."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pigeon.adapters.store.postgres import PostgresStore, messages
from pigeon.adapters.store.postgres.schema import MIGRATIONS
from pigeon.domain.errors import Forbidden
from pigeon.domain.events import Message, ReadState, Receipt, decode_event, encode_event
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Member
from tests.contract.test_store import T0, chat, device, events, send_req, user
from tests.support.postgres import fresh_database


async def test_events_built_by_the_database_are_the_canonical_encoding(
    pg_store: PostgresStore,
) -> None:
    a, b, c_ = await user(pg_store, "a"), await user(pg_store, "b"), await user(pg_store, "c")
    da, db = await device(pg_store, a), await device(pg_store, b)
    dc1, dc2 = await device(pg_store, c_), await device(pg_store, c_)
    g = await chat(pg_store, a, b, c_)
    sent = [await pg_store.messages.send(send_req(g, da, f"m{i}")) for i in range(2)]
    out = list(sent[1].deliveries)
    out += await pg_store.messages.ack(db, 3, T0 + 5)  # delivered receipt to a
    out += await pg_store.messages.mark_read(dc1, g.id, 2, T0 + 6)  # read receipt, read state
    reply = await pg_store.messages.send(send_req(g, db, "reply"))  # quick reply: read receipt
    out += reply.deliveries
    kinds = {type(decode_event(d.raw)) for d in out}
    assert kinds == {Message, Receipt, ReadState}
    for d in out:
        assert encode_event(decode_event(d.raw)) == d.raw
    stored = [
        e.raw
        for dev in (da, db, dc1, dc2)
        for e in (await pg_store.messages.read_inbox(dev.id, 0, 100)).entries
    ]
    assert {d.raw for d in out} <= set(stored)
    assert all(encode_event(decode_event(raw)) == raw for raw in stored)


async def test_nodes_starting_together_migrate_once() -> None:
    async with fresh_database() as dsn:
        stores = [PostgresStore(dsn, min_connections=1, max_connections=2) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            conn = await asyncpg.connect(dsn)
            try:
                versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version")]
            finally:
                await conn.close()
            assert sorted(versions) == [v for v, _ in MIGRATIONS]  # each applied once
            for i, s in enumerate(stores):  # each node works
                await user(s, f"node{i}")
        finally:
            await asyncio.gather(*(s.aclose() for s in stores))


async def test_concurrent_resends_of_a_cmid_commit_once(pg_store: PostgresStore) -> None:
    a, b = await user(pg_store, "a"), await user(pg_store, "b")
    da, db = await device(pg_store, a), await device(pg_store, b)
    c = await chat(pg_store, a, b)
    results = await asyncio.gather(
        *(pg_store.messages.send(send_req(c, da, cmid="same")) for _ in range(10))
    )
    assert sum(not r.duplicate for r in results) == 1
    assert {(r.message.id, r.message.seq) for r in results} == {(results[0].message.id, 1)}
    assert len([e for _, e in await events(pg_store, db) if isinstance(e, Message)]) == 1


async def test_concurrent_creation_of_a_direct_chat_yields_one(pg_store: PostgresStore) -> None:
    a, b = await user(pg_store, "a"), await user(pg_store, "b")
    await device(pg_store, a)
    await device(pg_store, b)

    def direct(first: str, second: str) -> ChatInfo:
        return ChatInfo(
            id=new_id(),
            kind="direct",
            name=None,
            created_by=first,
            created_at=T0,
            members=[Member(user=first), Member(user=second)],
        )

    results = await asyncio.gather(
        *(pg_store.chats.create_chat(direct(*((a.id, b.id) if i % 2 else (b.id, a.id))))
        for i in range(8))
    )  # fmt: skip
    assert len({info.id for info, _ in results}) == 1
    assert sum(bool(deliveries) for _, deliveries in results) == 1


async def test_sweep_deletes_in_chunks_until_empty(
    pg_store: PostgresStore, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(messages, "SWEEP_CHUNK", 2)
    a, b = await user(pg_store, "a"), await user(pg_store, "b")
    da, db = await device(pg_store, a), await device(pg_store, b)
    c = await chat(pg_store, a, b)
    for i in range(5):
        await pg_store.messages.send(send_req(c, da, f"m{i}"))
        await pg_store.messages.mark_read(db, c.id, i + 1, T0 + 1)
    stats = await pg_store.messages.sweep(T0 + 10)
    assert stats.messages == 5 and stats.inbox_entries >= 5
    conn = await asyncpg.connect(pg_dsn)
    try:
        for table in ("messages", "inbox", "receipt_log"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    finally:
        await conn.close()


async def test_previews_keep_nul_characters_out_of_text(pg_store: PostgresStore) -> None:
    a, b = await user(pg_store, "a"), await user(pg_store, "b")
    da, db = await device(pg_store, a), await device(pg_store, b)
    c = await chat(pg_store, a, b)
    sent = await pg_store.messages.send(send_req(c, da, "nul\x00inside"))
    (summary,) = await pg_store.chats.list_chats(b.id)
    assert summary.last_preview == "nul\ufffdinside"
    (_, _), (_, message) = await events(pg_store, db)
    assert isinstance(message, Message) and message.body == "nul\x00inside"
    # once every device acked it, body and preview are gone
    await pg_store.messages.ack(db, 2, T0 + 2)
    (summary,) = await pg_store.chats.list_chats(b.id)
    assert summary.last_preview is None
    stored, _ = await pg_store.messages.receipts(a.id, c.id, sent.message.id)
    assert stored.body is None and stored.seq == 1


async def test_sends_of_one_device_commit_in_call_order(pg_store: PostgresStore) -> None:
    a, b = await user(pg_store, "a"), await user(pg_store, "b")
    da = await device(pg_store, a)
    await device(pg_store, b)
    c = await chat(pg_store, a, b)
    results = await asyncio.gather(
        *(pg_store.messages.send(send_req(c, da, str(i))) for i in range(40))
    )
    assert [r.message.seq for r in results] == list(range(1, 41))


async def test_concurrent_sends_and_acks_share_batches(pg_store: PostgresStore) -> None:
    """Sends into many chats at once commit in a few batches, each with its own answer (gap-free
    seqs, a refusal for a non-member); acks of one message's recipients in one batch release its
    body once and send each sender its receipts."""
    store = pg_store.messages
    assert isinstance(store, messages.PgMessages)
    owner = await user(pg_store, "owner")
    owner_devices = [await device(pg_store, owner) for _ in range(2)]
    readers = [await user(pg_store, f"r{i}") for i in range(12)]
    reader_devices = [await device(pg_store, r) for r in readers]
    groups = [await chat(pg_store, owner, *readers[4 * i : 4 * i + 4]) for i in range(3)]
    outsider = await device(pg_store, await user(pg_store, "outsider"))
    before = store.sends.batches
    # one send per device (a device's sends run one after another): 12 readers, 4 per group
    sends = [store.send(send_req(groups[i // 4], d, str(i))) for i, d in enumerate(reader_devices)]
    results = await asyncio.gather(
        *sends, store.send(send_req(groups[0], outsider)), return_exceptions=True
    )
    assert isinstance(results[-1], Forbidden)
    sent = [r for r in results[:-1] if not isinstance(r, BaseException)]
    assert len(sent) == 12
    assert store.sends.batches - before < 13  # 13 calls, fewer commits
    for g in groups:
        seqs = sorted(r.message.seq for r in sent if r.message.chat == g.id)
        assert seqs == [1, 2, 3, 4]
    # every reader acks everything at once: a message's three readers share batches
    heads = [(await store.read_inbox(d.id, 0, 100)).head for d in reader_devices]
    before = store.acks.batches
    acked = await asyncio.gather(
        *(store.ack(d, h, T0 + 9) for d, h in zip(reader_devices, heads, strict=True))
    )
    assert store.acks.batches - before < len(reader_devices)
    receipts = [decode_event(x.raw) for out in acked for x in out]
    assert all(isinstance(r, Receipt) for r in receipts)
    # a reader's own send moved its marks to its seq, so it owes delivered receipts to the
    # senders of the later ones: 3 + 2 + 1 + 0 per group
    assert len(receipts) == 18
    rows = await pg_store.db.fetch("SELECT pending, raw IS NULL AS gone FROM messages")
    assert {(r["pending"], r["gone"]) for r in rows} == {(2, False)}  # the owner's devices
    heads = [(await store.read_inbox(d.id, 0, 100)).head for d in owner_devices]
    await asyncio.gather(
        *(store.ack(d, h, T0 + 9) for d, h in zip(owner_devices, heads, strict=True))
    )
    rows = await pg_store.db.fetch("SELECT pending, raw IS NULL AS gone FROM messages")
    assert {(r["pending"], r["gone"]) for r in rows} == {(0, True)}  # each released once


async def test_the_single_call_functions_of_the_previous_version_still_work(
    pg_store: PostgresStore,
) -> None:
    """Nodes of the previous version call pigeon_send and pigeon_ack during a rolling upgrade:
    they are batches of one now."""
    a, b = await user(pg_store, "a"), await user(pg_store, "b")
    da, db = await device(pg_store, a), await device(pg_store, b)
    c = await chat(pg_store, a, b)
    req = send_req(c, da, "old node")
    draft = Message(id=req.message_id, chat=c.id, seq=0, sender=a.id, sender_device=da.id,
                    cmid=req.cmid, at=req.at, body="old node")  # fmt: skip
    head, tail = messages.split_at_seq(draft)
    row = await pg_store.db.fetchrow(
        "SELECT * FROM pigeon_send($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        req.message_id, c.id, a.id, da.id, req.cmid, req.at, head, tail, "old node",
    )  # fmt: skip
    assert (row["o_status"], row["o_seq"], row["o_devices"]) == (0, 1, [db.id])
    iseq = row["o_iseqs"][0]
    acked = await pg_store.db.fetch("SELECT * FROM pigeon_ack($1, $2, $3)", db.id, iseq, T0)
    assert [r["o_device"] for r in acked] == [da.id]  # the delivered receipt
    assert isinstance(decode_event(acked[0]["o_payload"]), Receipt)


async def test_each_migration_is_logged_once_as_it_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="pigeon.adapters.store.postgres.schema")
    async with fresh_database() as dsn:
        for _ in range(2):  # the second node finds the schema up to date: nothing to log
            store = PostgresStore(dsn, min_connections=1, max_connections=1)
            await store.open()
            await store.aclose()
    logged = [r.getMessage() for r in caplog.records if "schema migration" in r.getMessage()]
    assert logged == [f"store schema migration {v} applied" for v, _ in MIGRATIONS]
