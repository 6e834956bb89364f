"""Push on PostgreSQL beyond the shared contract (tests/contract/test_push_store.py): the queue
claimed by several nodes at once, the outbox against answers and sends running concurrently,
push previews erased on every path that releases a body, and the send batch of the previous
version during a rolling upgrade."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

import asyncpg
import msgspec
import pytest

from pigeon.adapters.store.postgres import PostgresStore, messages, schema
from pigeon.adapters.store.postgres.push import PgPushQueue
from pigeon.domain.events import Message
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Device, Member
from pigeon.domain.push import PushTarget
from pigeon.ports import PushJob, SendRequest
from tests.contract.test_push_store import FAR, T1, VIS, iseq_of, job_rows, pair, select, send
from tests.contract.test_store import T0, chat, device, send_req, user
from tests.support.postgres import fresh_database

TARGET = PushTarget(kind="fcm", token="token-1")


def batch_args(req: SendRequest, *, push_previews: bool = True) -> list[list[object]]:
    """The arguments of one send to `pigeon_send_batch`, as arrays of one (the 9 of the previous
    version without `push_previews`)."""
    draft = Message(
        id=req.message_id,
        chat=req.chat,
        seq=0,
        sender=req.sender,
        sender_device=req.sender_device,
        cmid=req.cmid,
        at=req.at,
        body=req.body,
    )
    head, tail = messages.split_at_seq(draft)
    args: list[object] = [req.message_id, req.chat, req.sender, req.sender_device, req.cmid,
                          req.at, head, tail, req.preview]  # fmt: skip
    if push_previews:
        args.append(req.push_preview)
    return [[a] for a in args]


async def test_two_nodes_claiming_at_once_never_get_the_same_job(pg_dsn: str) -> None:
    nodes = [PostgresStore(pg_dsn, min_connections=4, max_connections=4) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        b = await user(nodes[0], "bob")
        db = await device(nodes[0], b)
        n = 600
        await nodes[0].db.execute(
            "INSERT INTO push_jobs (device_id, chat_id, pending, due_at)"
            " SELECT $1, 'chat-' || lpad(g::text, 4, '0'), true, $2::bigint + g"
            " FROM generate_series(1, $3) AS g",
            db.id,
            T1,
            n,
        )
        queues = [PgPushQueue(node.db) for node in nodes]
        claimed: list[list[PushJob]] = [[], []]

        async def worker(k: int) -> None:
            while jobs := await queues[k].claim(FAR, 7, VIS):
                claimed[k] += jobs

        await asyncio.gather(*(worker(k) for k in (0, 1, 0, 1, 0, 1, 0, 1)))
        keys = [(j.device, j.chat) for j in claimed[0] + claimed[1]]
        assert len(keys) == len(set(keys)) == n  # every job leased, each by one worker
        assert all(j.attempts == 1 and j.lease == FAR + int(VIS * 1000) for j in claimed[0])
        rows = await job_rows(nodes[0])
        assert {(r[2], r[6], r[7]) for r in rows} == {(1, 1, FAR + int(VIS * 1000))}
        assert await queues[1].claim(FAR, 7, VIS) == []
        assert [node.db.retries for node in nodes] == [0, 0]  # SKIP LOCKED: nobody waited
    finally:
        for node in nodes:
            await node.aclose()


async def test_an_answer_waits_for_a_send_holding_the_job_and_sees_its_entry(
    pg_store: PostgresStore, pg_dsn: str
) -> None:
    """A send marks an already pending job by locking it; a worker answering the job at that
    moment waits for the send's commit and then sees its entry: the job stays pending."""
    queue = PgPushQueue(pg_store.db)
    await queue.configure(0.0, 30.0)
    _, _, da, db, c = await pair(pg_store)
    first = await send(pg_store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    assert job.last_iseq == iseq_of(first, db)
    conn = await asyncpg.connect(pg_dsn)
    try:
        sending = conn.transaction()
        await sending.start()
        req = msgspec.structs.replace(send_req(c, da, "meanwhile"), at=T1 + 1)
        (row,) = await conn.fetch(messages._SEND, *batch_args(req))
        assert row["o_status"] == 0  # not committed: it holds the job's row lock
        answer = asyncio.create_task(queue.done(job, T1 + 5, pushed=True))
        async with asyncio.timeout(10):  # until the answer waits for that lock
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'SELECT pigeon_push_answer%'"
            ):
                assert not answer.done()
        await sending.commit()
        await answer
    finally:
        await conn.close()
    (r,) = await job_rows(pg_store)
    assert r[2:] == (1, job.last_iseq, 0, T1 + 5 + 30_000, 0, 0, T1 + 5)  # pending, windowed
    (again,) = await queue.claim(T1 + 5 + 30_000, 10, VIS)
    assert again.last_iseq == row["o_iseqs"][0]


async def test_no_push_is_lost_while_sends_and_workers_race(pg_dsn: str) -> None:
    """Sends on one node, a worker answering as fast as it can on another: once both are done
    and the queue drained, the last push of every chat covered its newest message."""
    nodes = [PostgresStore(pg_dsn, min_connections=2, max_connections=8) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        sender_node, worker_node = nodes
        queue = PgPushQueue(worker_node.db)
        await queue.configure(0.0, 0.0)
        b = await user(sender_node, "bob")
        db = await device(sender_node, b)
        await sender_node.push.set_target(db.id, TARGET, T0)
        chats: list[tuple[Device, ChatInfo]] = []
        for i in range(4):
            s = await user(sender_node, f"s{i}")
            ds = await device(sender_node, s)
            chats += [(ds, await chat(sender_node, s, b)) for _ in range(2)]
        newest: dict[str, int] = {}
        covered: dict[str, int] = defaultdict(int)
        sending = True

        async def sender(ds: Device, c: ChatInfo) -> None:
            for i in range(25):
                sent = await send(sender_node, c, ds, T1 + i)
                newest[c.id] = iseq_of(sent, db)

        async def worker() -> None:
            while sending or await queue.next_due() is not None:
                for job in await queue.claim(FAR, 5, VIS):
                    covered[job.chat] = max(covered[job.chat], job.last_iseq)
                    await queue.done(job, FAR, pushed=True)

        workers = [asyncio.create_task(worker()) for _ in range(2)]
        await asyncio.gather(*(sender(ds, c) for ds, c in chats))
        sending = False
        await asyncio.gather(*workers)
        assert len(newest) == len(chats)
        assert {cid: covered[cid] >= iseq for cid, iseq in newest.items()} == dict.fromkeys(
            newest, True
        )
        assert await select(sender_node, "SELECT count(*) FROM push_jobs WHERE pending") == [(0,)]
    finally:
        for node in nodes:
            await node.aclose()


async def test_the_send_batch_of_the_previous_version_still_feeds_the_outbox(
    pg_store: PostgresStore,
) -> None:
    queue = PgPushQueue(pg_store.db)
    await queue.configure(0.0, 30.0)
    _, _, da, db, c = await pair(pg_store)
    req = msgspec.structs.replace(send_req(c, da, "old node"), at=T1)
    (row,) = await pg_store.db.fetch(
        "SELECT * FROM pigeon_send_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        *batch_args(req, push_previews=False),
    )
    assert (row["o_status"], row["o_devices"]) == (0, [db.id])
    (job,) = await queue.claim(T1, 10, VIS)
    assert (job.device, job.chat, job.last_iseq) == (db.id, c.id, row["o_iseqs"][0])
    ctx = await pg_store.push.context(db.id, c.id, job.last_iseq)
    assert ctx is not None and (ctx.waiting, ctx.count, ctx.preview) == (True, 1, None)


async def test_a_node_of_the_previous_version_keeps_sending_across_the_migration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its statements were prepared against migration 6's send batch, which migration 7 drops:
    they find the 9-argument overload, and feed the outbox."""
    async with fresh_database() as dsn:
        with monkeypatch.context() as m:
            m.setattr(schema, "MIGRATIONS", [x for x in schema.MIGRATIONS if x[0] <= 6])
            old = PostgresStore(dsn, min_connections=1, max_connections=1)
            await old.open()
        conn = await asyncpg.connect(dsn)
        new = PostgresStore(dsn, min_connections=1, max_connections=2)
        try:
            a, b = await user(old, "alice"), await user(old, "bob")
            da, db = await device(old, a), await device(old, b)
            # The chat as migration 6 holds it (today's create_chat writes later columns).
            c = ChatInfo(
                id=new_id(),
                kind="direct",
                name=None,
                created_by=a.id,
                created_at=T0,
                members=[Member(user=a.id, role="member"), Member(user=b.id, role="member")],
            )
            await conn.execute(
                "INSERT INTO chats (id, kind, created_by, created_at, direct_key, next_pos,"
                " last_activity_at) VALUES ($1, 'direct', $2, $3, $4, 2, $3)",
                c.id,
                a.id,
                T0,
                ":".join(sorted((a.id, b.id))),
            )
            await conn.executemany(
                "INSERT INTO members (chat_id, user_id, role, pos) VALUES ($1, $2, 'member', $3)",
                [(c.id, a.id, 0), (c.id, b.id, 1)],
            )
            statement = await conn.prepare(
                "SELECT * FROM pigeon_send_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            )
            req = msgspec.structs.replace(send_req(c, da, "before"), at=T1)
            (row,) = await statement.fetch(*batch_args(req, push_previews=False))
            assert (row["o_status"], row["o_seq"]) == (0, 1)

            await new.open()  # a node of the new version starts: migration 7
            await new.push.set_target(db.id, TARGET, T0)
            queue = PgPushQueue(new.db)
            await queue.configure(0.0, 30.0)
            req = msgspec.structs.replace(send_req(c, da, "after"), at=T1 + 1)
            (row,) = await statement.fetch(*batch_args(req, push_previews=False))
            assert (row["o_status"], row["o_seq"]) == (0, 2)
            (job,) = await queue.claim(T1 + 1, 10, VIS)
            assert (job.device, job.chat, job.last_iseq) == (db.id, c.id, row["o_iseqs"][0])
        finally:
            await conn.close()
            await old.aclose()
            await new.aclose()


async def test_push_previews_go_with_their_bodies_beyond_acks(pg_store: PostgresStore) -> None:
    a, b = await user(pg_store, "alice"), await user(pg_store, "bob")
    da, db = await device(pg_store, a), await device(pg_store, b)
    direct, alone = await chat(pg_store, a, b), await chat(pg_store, a)
    preview = itertools.count()

    async def send_previewed(c: ChatInfo) -> str:
        req = send_req(c, da, "secret")
        req = msgspec.structs.replace(req, push_preview=f"p{next(preview)}")
        return (await pg_store.messages.send(req)).message.id

    async def stored(message_id: str) -> tuple[object, ...]:
        (row,) = await select(
            pg_store, "SELECT raw IS NULL, push_preview FROM messages WHERE id = ?", message_id
        )
        return row

    nobody = await send_previewed(alone)  # no recipient: neither body nor preview is kept
    assert await stored(nobody) == (1, None)
    kept = await send_previewed(direct)
    assert await stored(kept) == (0, "p1")
    assert await pg_store.accounts.revoke_device(b.id, db.id)  # pigeon_revoke releases it
    assert await stored(kept) == (1, None)
