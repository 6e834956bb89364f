"""The set-based batch functions of migration 9 against the loops they replace: a batch must
answer and store what migration 8's functions, which ran its elements one at a time in order,
answer and store. Each scenario runs three times on the same data (same ids, same times): as a
batch on a database at migration 9, as a batch on one at migration 8, and call by call on
migration 9; the answers and every table the message path writes are compared. The cases are
those a set-based statement could get wrong: duplicates of one cmid inside a batch, chats mixed
with failing elements, two devices of one user in a batch, quick replies, acks of several
devices reaching the same message, an ack reaching two chats, a device acked twice in a batch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import pytest

from pigeon.adapters.store.postgres import PostgresStore, messages, schema
from pigeon.domain.events import Message, Receipt, decode_event
from pigeon.domain.models import ChatInfo, Device, Member, User
from tests.contract.test_store import T0, send_req
from tests.support.postgres import empty_database, fresh_database

_SEND = "SELECT * FROM pigeon_send_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ORDER BY o_k"
_ACK = "SELECT * FROM pigeon_ack_batch($1, $2, $3)"
#: What the message path writes, in a stable order.
_TABLES = {
    "messages": "SELECT * FROM messages ORDER BY id",
    "inbox": "SELECT * FROM inbox ORDER BY device_id, iseq",
    "members": "SELECT * FROM members ORDER BY chat_id, user_id",
    "receipt_log": "SELECT * FROM receipt_log ORDER BY chat_id, user_id, kind, seq",
    "devices": "SELECT id, next_iseq, acked_iseq FROM devices ORDER BY id",
    "chats": "SELECT id, last_seq, last_activity_at, last_sender FROM chats ORDER BY id",
}


class World:
    """Users A (two devices), B (two devices), C and D (one each), a group of A, B and C, a group
    of A, B, C and D, a direct chat of A and B: fixed ids, so that the same world can be built
    again."""

    def __init__(self) -> None:
        self.users = {n: User(id=f"u{n}", username=n, created_at=T0) for n in "ABCD"}
        self.devices = {
            f"{n}{i}": Device(id=f"d{n}{i}", user_id=f"u{n}", name="d", created_at=T0 + i)
            for n, count in (("A", 2), ("B", 2), ("C", 1), ("D", 1))
            for i in range(1, count + 1)
        }
        self.group = self._chat("cG", "group", "ABC")
        self.larger = self._chat("cH", "group", "ABCD")
        self.direct = self._chat("cAB", "direct", "AB")

    def _chat(self, chat_id: str, kind: str, members: str) -> ChatInfo:
        return ChatInfo(
            id=chat_id,
            kind=kind,  # type: ignore[arg-type]
            name=None if kind == "direct" else "g",
            created_by=f"u{members[0]}",
            created_at=T0,
            members=[Member(user=f"u{m}") for m in members],
        )

    async def build(self, conn: asyncpg.Connection) -> None:
        """In SQL, not through the store: the same rows on a database at an older migration,
        whatever the store's code expects of the current one."""
        await conn.executemany(
            "INSERT INTO users (id, username, username_key, password_hash, created_at)"
            " VALUES ($1, $2, lower($2), 'hash', $3)",
            [(u.id, u.username, u.created_at) for u in self.users.values()],
        )
        await conn.executemany(
            "INSERT INTO devices (id, user_id, name, token_hash, created_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(d.id, d.user_id, d.name, d.id.encode(), d.created_at) for d in self.devices.values()],
        )
        chats = (self.group, self.larger, self.direct)
        await conn.executemany(
            "INSERT INTO chats (id, kind, name, created_by, created_at, direct_key, next_pos,"
            " last_activity_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $5)",
            [(c.id, c.kind, c.name, c.created_by, c.created_at,
              ":".join(sorted(m.user for m in c.members)) if c.kind == "direct" else None,
              len(c.members)) for c in chats],
        )  # fmt: skip
        await conn.executemany(
            "INSERT INTO members (chat_id, user_id, role, pos) VALUES ($1, $2, $3, $4)",
            [(c.id, m.user, "admin" if i == 0 else "member", i)
             for c in chats for i, m in enumerate(c.members)],
        )  # fmt: skip


def send_row(w: World, k: int, device: str, chat: str, cmid: str) -> list[object]:
    """The arguments of one send (message id and time fixed by k)."""
    d = w.devices[device]
    draft = Message(id=f"m{k:03d}", chat=chat, seq=0, sender=d.user_id, sender_device=d.id,
                    cmid=cmid, at=T0 + 100 + k, body=f"body {k}")  # fmt: skip
    head, tail = messages.split_at_seq(draft)
    return [draft.id, chat, d.user_id, d.id, cmid, draft.at, head, tail, f"body {k}", None]


def columns(rows: Sequence[Sequence[object]]) -> list[list[object]]:
    return [list(c) for c in zip(*rows, strict=True)]


def send_answer(row: asyncpg.Record) -> tuple[object, ...]:
    """One element's answer, its entries in device order."""
    entries = sorted(zip(row["o_devices"] or [], row["o_iseqs"] or [], strict=True))
    extras = sorted(
        zip(
            row["o_extra_devices"] or [],
            row["o_extra_iseqs"] or [],
            row["o_extra_payloads"] or [],
            strict=True,
        )
    )
    return (row["o_status"], row["o_seq"], entries, extras, row["o_dup_id"],
            row["o_dup_chat"], row["o_dup_at"], row["o_dup_raw"])  # fmt: skip


async def state(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {t: [tuple(r) for r in await conn.fetch(q)] for t, q in _TABLES.items()}


Scenario = Callable[[asyncpg.Connection, bool], Awaitable[list[Any]]]


async def run_three_ways(
    dsn: str, w: World, scenario: Scenario
) -> tuple[list[Any], dict[str, Any], list[tuple[list[Any], dict[str, Any]]]]:
    """Run `scenario` (given a connection and whether to batch) on a fresh copy of the world:
    batched on the current schema (the answers and final state returned first), then batched on
    migration 8 and call by call on the current schema (returned as the references)."""
    out = []
    for batched, old in ((True, False), (True, True), (False, False)):
        async with contextlib.AsyncExitStack() as stack:
            db = await stack.enter_async_context(fresh_database()) if old else dsn
            if not old:
                await empty_database(db)
            with pytest.MonkeyPatch.context() as m:
                if old:
                    m.setattr(schema, "MIGRATIONS", [x for x in schema.MIGRATIONS if x[0] <= 8])
                store = PostgresStore(db, min_connections=1, max_connections=2)
                await store.open()
            stack.push_async_callback(store.aclose)
            conn = await asyncpg.connect(db)
            stack.push_async_callback(conn.close)
            versions = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
            assert (max(versions) == 8) if old else (9 in versions)
            await w.build(conn)
            answers = await scenario(conn, batched)
            out.append((answers, await state(conn)))
    (answers, stored), *references = out
    return answers, stored, references


async def run_sends(conn: asyncpg.Connection, rows: list[list[object]], batched: bool) -> list[Any]:
    if batched:
        return [send_answer(r) for r in await conn.fetch(_SEND, *columns(rows))]
    return [send_answer(r) for row in rows for r in await conn.fetch(_SEND, *columns([row]))]


async def run_acks(
    conn: asyncpg.Connection, acks: list[tuple[str, int]], at: int, batched: bool
) -> list[Any]:
    """Each ack's deliveries, in the order returned."""
    calls = [acks] if batched else [[a] for a in acks]
    answers: list[list[tuple[object, ...]]] = [[] for _ in acks]
    base = 0
    for call in calls:
        devices = [d for d, _ in call]
        rows = await conn.fetch(_ACK, devices, [u for _, u in call], [at] * len(call))
        for r in rows:
            answers[base + r["o_k"] - 1].append((r["o_device"], r["o_iseq"], r["o_payload"]))
        base += len(call)
    return answers


async def test_a_send_batch_answers_and_stores_what_its_sends_one_by_one_would(
    pg_dsn: str,
) -> None:
    w = World()

    async def scenario(conn: asyncpg.Connection, batched: bool) -> list[Any]:
        # before the batch: B writes into the group (A has not read it: A's sends are quick
        # replies), A sent "s" (resent in the batch: a stored duplicate)
        before = [send_row(w, 1, "B1", "cG", "b-first"), send_row(w, 2, "A1", "cAB", "s")]
        await run_sends(conn, before, batched=False)
        rows = [
            send_row(w, 10, "A1", "cG", "x"),  # quick reply: read receipt to B's devices
            send_row(w, 11, "B1", "cG", "y"),
            send_row(w, 12, "A2", "cG", "z"),  # A's other device: quick again (passes y)
            send_row(w, 13, "D1", "cG", "w"),  # not a participant
            send_row(w, 14, "A1", "cG", "x"),  # duplicate of element 1, in this batch
            send_row(w, 15, "C1", "no-such-chat", "v"),  # no such chat
            send_row(w, 16, "A1", "cAB", "q"),  # another chat, same device
            send_row(w, 17, "D1", "cG", "w"),  # not a participant, again
            send_row(w, 18, "B2", "cAB", "r"),  # B's other device
            send_row(w, 19, "A1", "cAB", "s"),  # duplicate of a stored message
            send_row(w, 20, "C1", "cAB", "t"),  # not a participant of the direct chat...
            send_row(w, 21, "C1", "cG", "t"),  # ...so this one, same cmid, is sent
            send_row(w, 22, "C1", "cG", "t"),  # and this one is its duplicate
            send_row(w, 23, "B1", "cG", "u"),  # B's second send: passes A1's and A2's
        ]
        return await run_sends(conn, rows, batched)

    batch, stored, references = await run_three_ways(pg_dsn, w, scenario)
    assert [a[0] for a in batch] == [0, 0, 0, 3, 1, 2, 0, 3, 0, 1, 3, 0, 1, 0]
    assert batch[4][1] == batch[0][1] and batch[4][4] == "m010"  # the batch's original
    assert batch[9][4] == "m002" and batch[12][4] == "m021"
    assert batch[0][3] and batch[2][3] and batch[13][3]  # quick replies wrote read receipts
    for answers, reference in references:
        assert batch == answers
        assert stored == reference


async def test_an_ack_batch_answers_and_stores_what_its_acks_one_by_one_would(
    pg_dsn: str,
) -> None:
    w = World()

    async def scenario(conn: asyncpg.Connection, batched: bool) -> list[Any]:
        rows = [
            send_row(w, 1, "A1", "cG", "1"),
            send_row(w, 2, "A1", "cG", "2"),
            send_row(w, 3, "C1", "cG", "3"),
            send_row(w, 4, "A2", "cAB", "4"),
            send_row(w, 5, "A1", "cAB", "5"),
        ]
        await run_sends(conn, rows, batched=False)
        heads = {r["id"]: r["next_iseq"] - 1 for r in await conn.fetch("SELECT * FROM devices")}
        acks = [
            ("dB2", heads["dB2"]),  # B's second device: both chats (receipts to A's devices
            #                          for each, by chat) and A1's and C's messages
            ("dC1", heads["dC1"]),  # C: A's messages (receipts to both A devices)
            ("dB1", heads["dB1"] - 1),  # B's first device: the same messages, no receipt
            ("dB1", heads["dB1"]),  # B1 again: the rest
            ("dB1", 1),  # and an ack behind its head: nothing
            ("dA1", heads["dA1"]),  # A acks while receipts are written to it
            ("dD1", 5),  # nothing to ack
            ("no-such-device", 9),
        ]
        answers = await run_acks(conn, acks, T0 + 500, batched)
        # then everyone acks everything, receipts included: bodies go once
        heads = {r["id"]: r["next_iseq"] - 1 for r in await conn.fetch("SELECT * FROM devices")}
        answers += await run_acks(conn, sorted(heads.items()), T0 + 600, batched)
        return answers

    batch, stored, references = await run_three_ways(pg_dsn, w, scenario)
    receipts = [decode_event(p) for answer in batch for _, _, p in answer]
    assert receipts and all(isinstance(r, Receipt) for r in receipts)
    first = [decode_event(p) for _, _, p in batch[0]]  # B2's: per chat, to each writer's devices
    assert sorted((r.chat, r.seq) for r in first if isinstance(r, Receipt)) == [
        ("cAB", 2), ("cAB", 2), ("cG", 3), ("cG", 3), ("cG", 3)]  # fmt: skip
    for answers, reference in references:
        assert batch == answers
        assert stored == reference
    assert all(r[2] is None for r in stored["inbox"])  # left: receipts of the last acks
    assert all(m[7] is None for m in stored["messages"])  # every body released


async def test_a_receipts_all_seq_is_the_lowest_mark_of_the_others_as_of_its_ack(
    pg_dsn: str,
) -> None:
    """all_seq leaves out the receipt's writer, however low its mark, and counts the acker's
    (now the seq it acked) and the others' as of that ack."""
    w = World()

    async def scenario(conn: asyncpg.Connection, batched: bool) -> list[Any]:
        rows = [send_row(w, 1, "A1", "cH", "1"), send_row(w, 2, "C1", "cH", "2"),
                send_row(w, 3, "D1", "cH", "3")]  # fmt: skip
        await run_sends(conn, rows, batched=False)
        heads = {r["id"]: r["next_iseq"] - 1 for r in await conn.fetch("SELECT * FROM devices")}
        # (D's own send moved its mark already: no receipt from D)
        acks = [("dB1", heads["dB1"]), ("dB2", heads["dB2"]), ("dD1", heads["dD1"])]
        return await run_acks(conn, acks, T0 + 50, batched)

    batch, stored, references = await run_three_ways(pg_dsn, w, scenario)
    # after B's ack: A 1, C 2, B 3, D 3; to A (the writer of seq 1): the lowest of B, C and D
    got = sorted((d, r.seq, r.all_seq) for d, _, p in batch[0]
                 for r in [decode_event(p)] if isinstance(r, Receipt))  # fmt: skip
    assert got == [("dA1", 3, 2), ("dA2", 3, 2), ("dC1", 3, 1), ("dD1", 3, 1)]
    assert batch[1:] == [[], []]
    for answers, reference in references:
        assert batch == answers
        assert stored == reference


async def test_a_mark_moved_without_a_receipt_still_counts_in_later_receipts(pg_dsn: str) -> None:
    """An ack whose messages' sender has left the chat owes no receipt, but moves its user's
    mark, which a later ack of the batch reports in all_seq."""
    w = World()

    async def scenario(conn: asyncpg.Connection, batched: bool) -> list[Any]:
        await run_sends(conn, [send_row(w, 1, "C1", "cH", "1")], batched=False)
        # C leaves (what change_members does to the rows that matter here)
        await conn.execute("DELETE FROM members WHERE chat_id = 'cH' AND user_id = 'uC'")
        await run_sends(conn, [send_row(w, 2, "A1", "cH", "2")], batched=False)
        of_c = "SELECT iseq FROM inbox WHERE device_id = 'dB1' AND message_id = 'm001'"
        head_d = "SELECT next_iseq - 1 FROM devices WHERE id = 'dD1'"
        acks = [("dB1", await conn.fetchval(of_c)), ("dD1", await conn.fetchval(head_d))]
        return await run_acks(conn, acks, T0 + 50, batched)

    batch, stored, references = await run_three_ways(pg_dsn, w, scenario)
    assert batch[0] == []  # B's mark moves to 1; C, the writer, has left: no receipt
    got = sorted((d, r.user, r.seq, r.all_seq) for d, _, p in batch[1]
                 for r in [decode_event(p)] if isinstance(r, Receipt))  # fmt: skip
    assert got == [("dA1", "uD", 2, 1), ("dA2", "uD", 2, 1)]  # B's mark, as B's ack left it
    for answers, reference in references:
        assert batch == answers
        assert stored == reference


async def test_an_ack_past_its_head_leaves_a_receipt_its_batch_appended(
    pg_store: PostgresStore, pg_dsn: str
) -> None:
    """The one place a batch differs from its acks run in order (module docstring of
    set_functions.py): an ack covers the entries its device had before the batch, so a receipt
    an earlier ack of the batch wrote to that device stays for the next ack, as if this ack had
    come first. The device's ack stops at its head as it was, and nothing is lost."""
    w = World()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await w.build(conn)
        await run_sends(conn, [send_row(w, 1, "D1", "cH", "1")], batched=False)
        before = await conn.fetchval("SELECT next_iseq - 1 FROM devices WHERE id = 'dD1'")
        head_b = await conn.fetchval("SELECT next_iseq - 1 FROM devices WHERE id = 'dB1'")
        answers = await run_acks(conn, [("dB1", head_b), ("dD1", 99)], T0 + 5, True)
        (receipt,) = [x for x in answers[0] if x[0] == "dD1"]
        assert receipt[1] == before + 1  # written to D by B's ack, in the same batch
        page = await pg_store.messages.read_inbox("dD1", 0, 100)
        assert (page.acked, [e.iseq for e in page.entries]) == (before, [before + 1])
    finally:
        await conn.close()


async def test_acks_of_several_devices_in_one_batch_release_a_message_once(
    pg_store: PostgresStore,
) -> None:
    """Through the adapter: a message's recipients (two of them devices of one user) ack it
    at once; the user's delivered mark moves once (one receipt per sender device), and its
    body is released once."""
    store = pg_store.messages
    assert isinstance(store, messages.PgMessages)
    w = World()
    await pg_store.db.run(w.build)
    sent = await store.send(send_req(w.group, w.devices["A1"], "hi"))
    iseqs = {x.device: x.iseq for x in sent.deliveries}
    got = await asyncio.gather(
        *(store.ack(w.devices[d], iseqs[w.devices[d].id], T0 + 1) for d in ("B1", "B2", "C1", "A2"))
    )
    receipts = [decode_event(x.raw) for out in got for x in out]
    assert all(isinstance(r, Receipt) for r in receipts)
    by_user = sorted((r.user, x.device) for out in got for x in out
                     for r in [decode_event(x.raw)] if isinstance(r, Receipt))  # fmt: skip
    # each of B and C tells each of A's devices once (A2 is A's: no receipt from A)
    assert by_user == sorted((u, d) for u in ("uB", "uC") for d in ("dA1", "dA2"))
    rows = await pg_store.db.fetch("SELECT pending, raw IS NULL AS gone FROM messages")
    assert [(r["pending"], r["gone"]) for r in rows] == [(0, True)]


async def test_two_devices_of_one_user_sending_at_once_keep_the_orders(
    pg_store: PostgresStore,
) -> None:
    """Through the adapter: both devices of A and both of B send into the group and the direct
    chat at once, many times; seqs are gap-free per chat, every device's inbox gap-free, and
    within one chat in seq order."""
    store = pg_store.messages
    w = World()
    await pg_store.db.run(w.build)
    senders = [w.devices[d] for d in ("A1", "A2", "B1", "B2", "C1")]

    async def burst(d: Device, i: int) -> list[Any]:
        chats = [w.group] + ([w.direct] if d.user_id in ("uA", "uB") else [])
        return [await store.send(send_req(c, d, f"{d.id}.{i}.{c.id}")) for c in chats]

    results = [r for rs in await asyncio.gather(
        *(burst(d, i) for i in range(6) for d in senders)) for r in rs]  # fmt: skip
    for c in (w.group, w.direct):
        seqs = sorted(r.message.seq for r in results if r.message.chat == c.id)
        assert seqs == list(range(1, len(seqs) + 1))
    for d in w.devices.values():
        page = await store.read_inbox(d.id, 0, 10_000)
        iseqs = [e.iseq for e in page.entries]  # after what the setup acked: one run
        assert iseqs == list(range(page.acked + 1, page.acked + 1 + len(iseqs)))
        assert page.head == page.acked + len(iseqs)
        last: dict[str, int] = {}
        for e in page.entries:
            event = decode_event(e.raw)
            if isinstance(event, Message):
                assert event.seq > last.get(event.chat, 0)
                last[event.chat] = event.seq
    assert pg_store.db.retries == 0


async def test_a_node_of_the_previous_version_keeps_working_across_migration_9(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Migration 9 replaces the batch functions' bodies, not their signatures: statements a node
    of migration 8 prepared keep working, and answer as before."""
    async with fresh_database() as dsn:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", [x for x in schema.MIGRATIONS if x[0] <= 8])
            old = PostgresStore(dsn, min_connections=1, max_connections=1)
            await old.open()
        conn = await asyncpg.connect(dsn)
        new = PostgresStore(dsn, min_connections=1, max_connections=2)
        try:
            w = World()
            await w.build(conn)
            send = await conn.prepare(_SEND)
            ack = await conn.prepare(_ACK)
            (row,) = await send.fetch(*columns([send_row(w, 1, "A1", "cAB", "before")]))
            assert (row["o_status"], row["o_seq"], row["o_iseqs"]) == (0, 1, [1, 1, 1])
            await new.open()  # a node of the new version starts: migration 9 (and later)
            (row,) = await send.fetch(*columns([send_row(w, 2, "A1", "cAB", "after")]))
            assert (row["o_status"], row["o_seq"], row["o_iseqs"]) == (0, 2, [2, 2, 2])
            receipts = await ack.fetch(["dB1"], [2], [T0 + 5])
            assert sorted(r["o_device"] for r in receipts) == ["dA1", "dA2"]
            assert all(isinstance(decode_event(r["o_payload"]), Receipt) for r in receipts)
        finally:
            await conn.close()
            await old.aclose()
            await new.aclose()
