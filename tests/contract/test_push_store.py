"""Contract of `PushStore` and `PushQueue` (see their docstrings in pigeon.ports), against every
store adapter (`ADAPTERS`, tests/contract/conftest.py) and the queue over its outbox table
(`SqlitePushQueue`, `PgPushQueue`).

A job is a pending flag per (device, chat): whether its push is due is read by `context` when
it is sent: a message of others `waiting` in the device's inbox, unacked, up to the job's
`last_iseq` (the device's newest inbox entry when it was claimed). What the push says (`count`)
is the user's unread messages in the chat, whatever the device has acked.
Every queue call gets its `now` explicitly: times are ms, `visibility`/`window`/`grace` seconds.
The queue's grace and window are its `configure`d policy (the `queue` fixture: no grace, a window
of `WINDOW`); they are applied when a job becomes pending, so a job's `due_at` is when it may be
claimed.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any, NamedTuple, cast

import msgspec
import pytest

from pigeon.adapters.store.postgres import PostgresStore
from pigeon.adapters.store.postgres.push import PgPushQueue
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.adapters.store.sqlite.push import SqlitePushQueue
from pigeon.domain.events import Delivery
from pigeon.domain.ids import new_id
from pigeon.domain.models import ChatInfo, Device, Member, User
from pigeon.domain.push import MAX_COUNT, PushTarget
from pigeon.ports import DeadLetter, PushContext, PushJob, PushQueue, SendResult, Store
from tests.contract.test_store import T0, chat, device, send_req, user

T1 = T0 + 1_000_000  # when the tests' pushes happen (messages are sent at T1 + x)
FAR = T1 + 10**9  # a `now` after every lease, grace and window of these tests
VIS = 60.0
WINDOW = 30.0
FCM = PushTarget(kind="fcm", token="token-1")
FCM2 = PushTarget(kind="fcm", token="token-2")

#: A `push_jobs` row: device_id, chat_id, pending, last_iseq, invite_iseq, due_at, attempts,
#: leased_until, pushed_at.
Row = tuple[str, str, int, int, int, int, int, int, int]


def queue_of(store: Store) -> PushQueue:
    """The queue over the store's outbox table (as `pigeon.app.build_push_queue` builds it)."""
    if isinstance(store, SqliteStore):
        return SqlitePushQueue(store.db)
    if isinstance(store, PostgresStore):
        return PgPushQueue(store.db)
    raise AssertionError(f"no push queue for {type(store).__name__}")


@pytest.fixture
async def queue(store: Store) -> PushQueue:
    q = queue_of(store)
    await q.configure(0.0, WINDOW)
    return q


async def select(store: Store, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on either engine, written with `?` parameters. Booleans come back as
    0 and 1, as SQLite stores them."""
    if isinstance(store, SqliteStore):

        def q(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]

        rows = await store.db.read(q)
    elif isinstance(store, PostgresStore):
        numbered = iter(range(1, len(args) + 1))
        pg_sql = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
        rows = [tuple(r) for r in await store.db.fetch(pg_sql, *args)]
    else:
        raise AssertionError(f"cannot query {type(store).__name__}")
    return [tuple(int(v) if isinstance(v, bool) else v for v in r) for r in rows]


async def send(store: Store, c: ChatInfo, sender: Device, at: int = T1) -> SendResult:
    return await store.messages.send(msgspec.structs.replace(send_req(c, sender), at=at))


def iseq_of(result: SendResult | list[Delivery], d: Device) -> int:
    """The iseq of `d`'s entry: the message's (appended before any receipt it causes), or the
    one event of a list of deliveries."""
    deliveries = result.deliveries if isinstance(result, SendResult) else result
    iseqs = [x.iseq for x in deliveries if x.device == d.id]
    assert iseqs, f"no entry for {d.id}"
    return iseqs[0]


async def context(store: Store, d: Device, c: ChatInfo, upto: int) -> PushContext:
    ctx = await store.push.context(d.id, c.id, upto)
    assert ctx is not None
    return ctx


async def says(store: Store, job: PushJob) -> tuple[bool, int]:
    """What the push of `job` says, as the worker reads it: does a message of others wait for
    the device up to the job's `last_iseq` (without one, no "New message"), and the count."""
    ctx = await store.push.context(job.device, job.chat, job.last_iseq)
    assert ctx is not None
    return ctx.waiting, ctx.count


async def claim_all(queue: PushQueue, now: int = FAR) -> list[PushJob]:
    return await queue.claim(now, 100, VIS)


async def job_rows(store: Store) -> list[Row]:
    """The `push_jobs` table, by device and chat."""
    rows = await select(
        store,
        "SELECT device_id, chat_id, pending, last_iseq, invite_iseq, due_at, attempts,"
        " leased_until, pushed_at FROM push_jobs ORDER BY device_id, chat_id",
    )
    return [cast(Row, r) for r in rows]


async def create(
    store: Store, *members: User, kind: str = "group", at: int = T1
) -> tuple[ChatInfo, list[Delivery]]:
    """A chat created by the first member at `at`, and the inbox entries announcing it."""
    info = ChatInfo(
        id=new_id(),
        kind=kind,  # type: ignore[arg-type]
        name=None if kind == "direct" else "g",
        created_by=members[0].id,
        created_at=at,
        members=[
            Member(user=m.id, role="admin" if i == 0 else "member") for i, m in enumerate(members)
        ],
    )
    return await store.chats.create_chat(info)


class Pair(NamedTuple):
    """Alice (the sender) and Bob, whose device has a target, with a chat of theirs."""

    a: User
    b: User
    da: Device
    db: Device
    c: ChatInfo


async def pair(store: Store) -> Pair:
    return (await pair_and_chats(store))[0]


async def pair_and_chats(store: Store, extra: int = 0) -> tuple[Pair, list[ChatInfo]]:
    """The pair, and `extra` more chats of theirs. Chats are created before the target is set,
    so that only what the tests send is queued (not the invitations into them)."""
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    others = [await chat(store, a, b) for _ in range(extra)]
    await store.push.set_target(db.id, FCM, T0)
    return Pair(a, b, da, db, c), others


# --- the outbox -----------------------------------------------------------------------------


async def test_a_message_to_a_device_with_a_target_marks_its_job_pending(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    sent = await send(store, c, da)
    assert await job_rows(store) == [(db.id, c.id, 1, 0, 0, T1, 0, 0, 0)]
    (job,) = await claim_all(queue)
    assert (job.device, job.chat, job.last_iseq, job.invite_iseq) == (
        db.id,
        c.id,
        iseq_of(sent, db),
        0,
    )
    assert job.attempts == 1 and job.lease == FAR + int(VIS * 1000)
    assert await says(store, job) == (True, 1)


async def test_devices_without_a_target_and_the_sending_device_get_no_job(
    store: Store, queue: PushQueue
) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db, db_bare = await device(store, a), await device(store, b), await device(store, b)
    c = await chat(store, a, b)
    await store.push.set_target(da.id, FCM, T0)
    await store.push.set_target(db.id, FCM2, T0)
    sent = await send(store, c, da)
    assert {x.device for x in sent.deliveries} == {db.id, db_bare.id}  # db_bare has an entry
    assert [j.device for j in await claim_all(queue)] == [db.id]


async def test_the_senders_other_devices_get_a_job_with_nothing_waiting(
    store: Store, queue: PushQueue
) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, da_other, db = await device(store, a), await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    await store.push.set_target(da_other.id, FCM, T0)
    await store.push.set_target(db.id, FCM2, T0)
    await send(store, c, da)
    # The trigger does not look at the sender (to stay cheap): Alice's tablet has a job, but
    # nothing of others waits for it, and her own message is no unread one, so the worker
    # skips it (no "New message" for her).
    jobs = {j.device: j for j in await claim_all(queue, T1)}
    assert set(jobs) == {da_other.id, db.id}
    assert await says(store, jobs[da_other.id]) == (False, 0)
    assert await says(store, jobs[db.id]) == (True, 1)
    await queue.done(jobs[da_other.id], T1 + 1, pushed=False)  # what the worker does
    await queue.done(jobs[db.id], T1 + 1, pushed=True)

    await send(store, c, db, T1 + 2)  # Bob answers: that one is news to Alice's tablet
    (job,) = await claim_all(queue, T1 + 2)
    assert job.device == da_other.id
    assert await says(store, job) == (True, 1)  # Bob's message, not her own one before it


async def test_a_burst_to_one_chat_is_one_job_and_two_chats_are_two(
    store: Store, queue: PushQueue
) -> None:
    (_, _, da, db, c), (other,) = await pair_and_chats(store, extra=1)
    sent = [await send(store, c, da, T1 + i) for i in range(5)]
    other_sent = await send(store, other, da, T1 + 9)
    # a flag each: the burst marked its job pending once (its due time is the first message's)
    assert [(r[1], r[2], r[5]) for r in await job_rows(store)] == sorted(
        [(c.id, 1, T1), (other.id, 1, T1 + 9)]
    )
    jobs = {j.chat: j for j in await claim_all(queue)}
    assert set(jobs) == {c.id, other.id}
    assert {j.device for j in jobs.values()} == {db.id}
    # both cover up to the device's newest entry, whichever chat it is of
    assert {j.last_iseq for j in jobs.values()} == {iseq_of(other_sent, db)}
    assert iseq_of(sent[-1], db) < iseq_of(other_sent, db)
    assert await says(store, jobs[c.id]) == (True, 5)
    assert await says(store, jobs[other.id]) == (True, 1)


async def test_receipts_and_read_states_queue_no_job(store: Store, queue: PushQueue) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, da2, db = await device(store, a), await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    sent = await send(store, c, db)
    for d in (da, da2):
        await store.push.set_target(d.id, FCM, T0)
    await store.push.set_target(db.id, FCM2, T0)
    receipts = await store.messages.ack(da, iseq_of(sent, da), T1 + 1)  # delivered -> bob
    assert [x.device for x in receipts] == [db.id]
    read = await store.messages.mark_read(da, c.id, 1, T1 + 2)  # read -> bob, state -> da2
    assert {x.device for x in read} == {db.id, da2.id}
    assert await claim_all(queue) == []
    assert await job_rows(store) == []


# --- targets ----------------------------------------------------------------------------------


async def test_removing_the_target_drops_pending_jobs_and_stops_new_ones(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    assert await store.push.target_status(db.id) == (FCM, None)
    await send(store, c, da)
    await store.push.set_target(db.id, None, T1 + 1)
    assert await store.push.target_status(db.id) == (None, None)
    assert await job_rows(store) == []
    await send(store, c, da, T1 + 2)
    assert await claim_all(queue) == []
    assert await job_rows(store) == []


async def test_a_gone_target_is_removed_with_its_reason(store: Store, queue: PushQueue) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da)
    assert await store.push.remove_gone(db.id, FCM, "UNREGISTERED", T1 + 1)
    assert await store.push.target_status(db.id) == (None, "UNREGISTERED")
    assert await claim_all(queue) == []
    assert not await store.push.remove_gone(db.id, FCM, "again", T1 + 2)  # nothing left
    assert await store.push.target_status(db.id) == (None, "UNREGISTERED")
    await store.push.set_target(db.id, FCM2, T1 + 3)  # the app registers again
    assert await store.push.target_status(db.id) == (FCM2, None)


async def test_a_gone_report_about_a_replaced_target_changes_nothing(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await store.push.set_target(db.id, FCM2, T1)  # the device registered a newer token
    await send(store, c, da)
    assert not await store.push.remove_gone(db.id, FCM, "UNREGISTERED", T1 + 1)
    assert await store.push.target_status(db.id) == (FCM2, None)
    assert [j.device for j in await claim_all(queue)] == [db.id]


async def test_a_revoked_device_loses_its_target_jobs_and_dead_letters(
    store: Store, queue: PushQueue
) -> None:
    (_, b, da, db, c), (other,) = await pair_and_chats(store, extra=1)
    await send(store, c, da)
    await send(store, other, da)
    jobs = await claim_all(queue, FAR)
    await queue.dead(next(j for j in jobs if j.chat == other.id), "boom", FAR)
    assert len(await queue.dead_letters(10)) == 1
    assert await store.accounts.revoke_device(b.id, db.id)
    assert await store.push.target_status(db.id) == (None, None)
    assert await job_rows(store) == []
    assert await claim_all(queue, FAR + 10**8) == []
    assert await queue.dead_letters(10) == []
    assert await store.push.context(db.id, c.id, 10**6) is None


# --- context ----------------------------------------------------------------------------------


async def test_context_waits_for_unacked_messages_of_others_up_to_upto(
    store: Store,
) -> None:
    a, b, x = await user(store, "alice"), await user(store, "bob"), await user(store, "xavier")
    da, db, db2, dx = (
        await device(store, a),
        await device(store, b),
        await device(store, b),
        await device(store, x),
    )
    c1, c2 = await chat(store, a, b, x), await chat(store, a, b)
    await store.push.set_target(db.id, FCM, T0)
    s1 = await send(store, c1, da, T1)
    s2 = await send(store, c2, da, T1 + 1)
    s3 = await send(store, c1, dx, T1 + 2)
    s4 = await send(store, c1, db2, T1 + 3)  # Bob's own, from his other device: no news
    s5 = await send(store, c1, da, T1 + 4)
    upto = [iseq_of(s, db) for s in (s1, s2, s3, s4, s5)]
    assert upto == sorted(upto)
    waits = [(await context(store, db, c1, i)).waiting for i in (0, *upto)]
    assert waits == [False, True, True, True, True, True]
    assert [(await context(store, db, c2, i)).waiting for i in upto[:2]] == [False, True]
    # the count does not depend on `upto`: Bob's reply read s1 and s3, s5 is unread
    assert {(await context(store, db, c1, i)).count for i in (0, *upto)} == {1}
    assert (await context(store, db, c2, 0)).count == 1
    ctx = await context(store, db, c1, upto[-1])
    assert (ctx.target, ctx.user_id, ctx.acked_iseq) == (FCM, b.id, 0)

    await store.messages.ack(db, upto[2], T1 + 5)  # s1 to s3 delivered
    ctx = await context(store, db, c1, upto[-1])
    assert (ctx.acked_iseq, ctx.waiting, ctx.count) == (upto[2], True, 1)  # s5 waits
    assert not (await context(store, db, c1, upto[2])).waiting
    assert not (await context(store, db, c1, upto[3])).waiting  # his own s4 is no news
    ctx = await context(store, db, c2, upto[-1])
    assert (ctx.waiting, ctx.count) == (False, 1)  # delivered, not read


async def test_context_counts_the_users_unread_messages_in_the_chat(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db, db2 = await device(store, a), await device(store, b), await device(store, b)
    c, other = await chat(store, a, b), await chat(store, a, b)
    await store.push.set_target(db.id, FCM, T0)
    sent = [await send(store, c, da, T1 + i) for i in range(4)]
    await send(store, other, da, T1 + 9)
    upto = iseq_of(sent[-1], db)
    ctx = await context(store, db, c, upto)
    assert (ctx.waiting, ctx.count, ctx.unread) == (True, 4, 5)
    await store.messages.ack(db, upto, T1 + 10)  # acks do not change what is unread
    ctx = await context(store, db, c, upto)
    assert (ctx.waiting, ctx.count, ctx.unread) == (False, 4, 5)
    await store.messages.mark_read(db2, c.id, 3, T1 + 11)  # read on Bob's other device
    ctx = await context(store, db, c, upto)
    assert (ctx.count, ctx.unread) == (1, 2)
    last = await send(store, c, da, T1 + 12)
    ctx = await context(store, db, c, iseq_of(last, db))
    assert (ctx.waiting, ctx.count) == (True, 2)
    await send(store, c, db2, T1 + 13)  # Bob answers: he has read all of it, his own is no news
    ctx = await context(store, db, c, 10**6)
    assert (ctx.waiting, ctx.count, ctx.unread) == (True, 0, 1)  # the worker skips it
    assert (await context(store, db, other, 10**6)).count == 1


async def test_context_caps_the_count(store: Store) -> None:
    _, _, da, db, c = await pair(store)
    sent = [await send(store, c, da, T1 + i) for i in range(120)]
    assert MAX_COUNT == 100
    ctx = await context(store, db, c, iseq_of(sent[-1], db))
    assert (ctx.count, ctx.unread) == (MAX_COUNT, 120)  # the badge is not capped
    ctx = await context(store, db, c, iseq_of(sent[49], db))
    assert (ctx.waiting, ctx.count) == (True, MAX_COUNT)  # whatever `upto`
    await store.messages.mark_read(db, c.id, 50, T1 + 200)
    ctx = await context(store, db, c, iseq_of(sent[-1], db))
    assert (ctx.count, ctx.unread) == (70, 70)


async def test_context_unread_and_sender_name(store: Store) -> None:
    a, b, x = await user(store, "alice"), await user(store, "bob"), await user(store, "xavier")
    da, db, dx = await device(store, a), await device(store, b), await device(store, x)
    c1, c2 = await chat(store, a, b, x), await chat(store, a, b)
    await store.push.set_target(db.id, FCM, T0)
    await send(store, c1, da, T1)
    await send(store, c1, da, T1 + 1)
    last = await send(store, c2, da, T1 + 2)
    upto = iseq_of(last, db)
    ctx = await context(store, db, c1, upto)
    assert (ctx.waiting, ctx.count, ctx.unread, ctx.sender_name) == (True, 2, 3, None)

    await store.messages.ack(db, upto, T1 + 3)
    ctx = await context(store, db, c1, upto)
    assert (ctx.acked_iseq, ctx.waiting) == (upto, False)
    assert (ctx.count, ctx.unread) == (2, 3)  # delivered is not read

    await store.messages.mark_read(db, c1.id, 2, T1 + 4)
    ctx = await context(store, db, c1, upto)
    assert (ctx.count, ctx.unread) == (0, 1)
    await send(store, c2, db, T1 + 5)  # bob answers: he has read c2, his own message is no news
    assert (await context(store, db, c1, upto)).unread == 0

    last = await send(store, c1, dx, T1 + 6)
    upto = iseq_of(last, db)
    ctx = await context(store, db, c1, upto)
    assert (ctx.waiting, ctx.count, ctx.unread, ctx.sender_name) == (True, 1, 1, None)
    await store.push.set_show_names(b.id, True)
    assert (await context(store, db, c1, upto)).sender_name == "xavier"
    # the sender of the newest waiting message, never the device's own user (bob's reply is
    # the latest in c2, and there is nothing of others left unacked there)
    ctx = await context(store, db, c2, upto)
    assert (ctx.waiting, ctx.sender_name, ctx.preview) == (False, None, None)
    await store.push.set_show_names(b.id, False)
    assert (await context(store, db, c1, upto)).sender_name is None


async def test_name_and_preview_come_from_the_same_newest_message(store: Store) -> None:
    a, b, x = await user(store, "alice"), await user(store, "bob"), await user(store, "xavier")
    da, db, dx = await device(store, a), await device(store, b), await device(store, x)
    c = await chat(store, a, b, x)
    await store.push.set_target(db.id, FCM, T0)
    await store.push.set_show_names(b.id, True)
    req = send_req(c, dx, body="meet at 5")
    req = msgspec.structs.replace(req, at=T1, push_preview="xavier says: meet at 5")
    first = await store.messages.send(req)
    await send(store, c, da, T1 + 10)  # alice writes after it, with no preview
    ctx = await context(store, db, c, iseq_of(first, db))
    assert (ctx.sender_name, ctx.preview) == ("xavier", "xavier says: meet at 5")
    newest = await context(store, db, c, 10**6)
    assert (newest.sender_name, newest.preview) == ("alice", None)


async def test_a_push_preview_goes_with_the_body(store: Store) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    req = send_req(c, da, body="secret plan")
    sent = await store.messages.send(msgspec.structs.replace(req, push_preview="secret plan"))
    await store.messages.ack(db, iseq_of(sent, db), T1 + 1)
    (row,) = await select(
        store, "SELECT raw, push_preview FROM messages WHERE id = ?", sent.message.id
    )
    assert row == (None, None)  # delivered everywhere: neither the body nor its preview stays


async def test_context_without_a_target_or_device(store: Store) -> None:
    b = await user(store, "bob")
    db = await device(store, b)
    c = await chat(store, b)
    ctx = await context(store, db, c, 10**6)
    assert (ctx.target, ctx.user_id, ctx.waiting, ctx.count, ctx.unread) == (
        None,
        b.id,
        False,
        0,
        0,
    )
    assert await store.push.context("no-such-device", c.id, 10**6) is None


async def test_context_says_whether_the_user_is_disabled(store: Store) -> None:
    """The worker pushes nothing to a disabled user (`PushWorker`): the store says who is.
    Disabling changes nothing else: the job is queued and the message waits, as before."""
    _, b, da, db, c = await pair(store)
    sent = await send(store, c, da, T1)
    upto = iseq_of(sent, db)
    assert not (await context(store, db, c, upto)).disabled
    assert await store.accounts.set_disabled(b.id, T1 + 1)
    ctx = await context(store, db, c, upto)
    assert (ctx.disabled, ctx.target, ctx.waiting, ctx.count) == (True, FCM, True, 1)
    assert not (await context(store, da, c, 10**6)).disabled  # only that user's devices
    assert await store.accounts.set_disabled(b.id, None)
    assert not (await context(store, db, c, upto)).disabled


# --- leases -----------------------------------------------------------------------------------


async def test_a_lease_hides_the_job_until_it_runs_out(store: Store, queue: PushQueue) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (first,) = await queue.claim(T1, 10, VIS)
    assert (first.attempts, first.lease) == (1, T1 + 60_000)
    assert await queue.claim(T1 + 59_999, 10, VIS) == []
    assert await queue.next_due() == T1 + 60_000
    (second,) = await queue.claim(T1 + 60_000, 10, VIS)
    assert (second.device, second.chat, second.last_iseq) == (db.id, c.id, first.last_iseq)
    assert (second.attempts, second.lease) == (2, T1 + 120_000)

    # the first worker's answers come too late: the second one holds the job now
    await queue.done(first, T1 + 60_001, pushed=True)
    await queue.retry(first, T1 + 60_002, "late")
    await queue.dead(first, "late", T1 + 60_003)
    assert await queue.dead_letters(10) == []
    (row,) = await job_rows(store)
    assert row[2:] == (1, second.last_iseq, 0, T1 + 120_000, 2, T1 + 120_000, 0)  # due: its lease

    await queue.done(second, T1 + 60_010, pushed=True)
    (row,) = await job_rows(store)  # idle (were it pending, it would be due after the window)
    assert row[2:] == (0, second.last_iseq, 0, T1 + 90_010, 0, 0, T1 + 60_010)
    assert await queue.next_due() is None


async def test_a_lease_that_runs_out_is_claimable_again_exactly_at_its_end(
    store: Store, queue: PushQueue
) -> None:
    await queue.configure(0.5, WINDOW)  # neither is added to a lease
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (first,) = await queue.claim(T1 + 500, 10, 2.5)
    assert first.lease == T1 + 3_000
    during = await send(store, c, da, T1 + 1_000)  # pending already: the job is not moved
    (row,) = await job_rows(store)
    assert (row[2], row[5], row[7]) == (1, T1 + 3_000, T1 + 3_000)
    assert await queue.next_due() == T1 + 3_000
    assert await queue.claim(T1 + 2_999, 10, VIS) == []  # the first worker died meanwhile
    (second,) = await queue.claim(T1 + 3_000, 10, VIS)
    assert (second.device, second.chat, second.attempts) == (db.id, c.id, 2)
    assert second.lease == T1 + 63_000
    assert second.last_iseq == iseq_of(during, db)  # it had its grace by then
    assert await says(store, second) == (True, 2)
    await queue.done(first, T1 + 3_001, pushed=True)  # too late: not its lease any more
    (row,) = await job_rows(store)
    assert row[2:] == (1, second.last_iseq, 0, T1 + 63_000, 2, T1 + 63_000, 0)
    assert await queue.next_due() == T1 + 63_000


async def test_grace_delays_a_new_job(store: Store, queue: PushQueue) -> None:
    await queue.configure(0.5, WINDOW)
    _, _, da, db, c = await pair(store)
    first = await send(store, c, da, T1)
    await send(store, c, da, T1 + 300)  # a later entry does not postpone the job
    assert [r[5] for r in await job_rows(store)] == [T1 + 500]  # due: its first entry's grace
    assert await queue.next_due() == T1 + 500
    assert await queue.claim(T1 + 499, 10, VIS) == []
    (job,) = await queue.claim(T1 + 500, 10, VIS)
    assert job.last_iseq == iseq_of(first, db)  # the second has not had its grace: a connected
    await store.messages.ack(db, job.last_iseq, T1 + 500)  # device could still ack it, as this
    assert await says(store, job) == (False, 2)  # one did the first: nothing waits up to it
    await queue.done(job, T1 + 500, pushed=False)
    assert await queue.claim(T1 + 999, 10, VIS) == []
    (again,) = await queue.claim(T1 + 1000, 10, VIS)
    assert await says(store, again) == (True, 2)  # the second waits; both are unread


async def test_a_push_opens_a_window_that_coalesces_what_follows(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    first = await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.done(job, T1 + 10, pushed=True)
    assert await queue.next_due() is None
    await store.messages.ack(db, iseq_of(first, db), T1 + 15)  # the device got the push
    later = [await send(store, c, da, T1 + 20 + i) for i in range(3)]
    (row,) = await job_rows(store)
    opens = T1 + 10 + 30_000
    assert row[2:6] == (1, job.last_iseq, 0, opens)  # pending again, due when the window ends
    assert await queue.next_due() == opens
    assert await queue.claim(opens - 1, 10, VIS) == []
    (job,) = await queue.claim(opens, 10, VIS)
    assert (job.last_iseq, job.attempts) == (iseq_of(later[-1], db), 1)
    assert await says(store, job) == (True, 4)  # the first was delivered, not read


async def test_a_job_done_without_a_push_opens_no_window(store: Store, queue: PushQueue) -> None:
    _, _, da, db, c = await pair(store)
    first = await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await store.messages.ack(db, iseq_of(first, db), T1)  # the device was online
    assert await says(store, job) == (False, 1)  # nothing waits: no push (though it is unread)
    await queue.done(job, T1 + 1, pushed=False)  # so the worker pushed nothing
    (row,) = await job_rows(store)
    assert (row[2], row[8]) == (0, 0)  # idle, never pushed
    assert await queue.claim(T1 + 2, 10, VIS) == []  # nothing left
    await send(store, c, da, T1 + 3)
    (job,) = await queue.claim(T1 + 3, 10, VIS)
    assert job.attempts == 1
    assert await says(store, job) == (True, 2)


async def test_entries_arriving_during_a_lease_stay_pending(store: Store, queue: PushQueue) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    second = await send(store, c, da, T1 + 1)
    (job,) = await queue.claim(T1 + 1, 10, VIS)
    assert await says(store, job) == (True, 2)
    meanwhile = [await send(store, c, da, T1 + 2 + i) for i in range(3)]
    await store.messages.ack(db, iseq_of(second, db), T1 + 5)  # the two it covered arrived
    assert await says(store, job) == (False, 5)  # nothing waits up to what it covered
    await queue.done(job, T1 + 10, pushed=False)
    (row,) = await job_rows(store)
    assert row[2:] == (1, job.last_iseq, 0, T1 + 10, 0, 0, 0)  # pending, due from its answer
    (job,) = await queue.claim(T1 + 10, 10, VIS)
    assert (job.last_iseq, job.attempts) == (iseq_of(meanwhile[-1], db), 1)
    assert await says(store, job) == (True, 5)  # delivered is not read
    await queue.done(job, T1 + 12, pushed=True)
    assert await queue.claim(FAR, 10, VIS) == []


async def test_only_message_entries_of_its_chat_keep_a_job_pending(
    store: Store, queue: PushQueue
) -> None:
    (a, _, da, db, c), (other,) = await pair_and_chats(store, extra=1)
    x = await user(store, "xavier")
    sent = await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await send(store, other, da, T1 + 1)  # another chat: a job of its own
    _, update = await store.chats.change_members(  # an event in Bob's inbox, not a message
        c.id, c.version, [Member(user=x.id)], [], [], a.id, T1 + 2
    )
    assert iseq_of(update, db) > job.last_iseq == iseq_of(sent, db)
    await queue.done(job, T1 + 10, pushed=True)
    rows = {r[1]: r for r in await job_rows(store)}
    assert rows[c.id][2] == 0 and rows[other.id][2] == 1


async def test_entries_arriving_during_a_lease_get_their_grace(
    store: Store, queue: PushQueue
) -> None:
    await queue.configure(0.5, WINDOW)
    _, _, da, db, c = await pair(store)
    first = await send(store, c, da, T1)
    (job,) = await queue.claim(T1 + 500, 10, VIS)
    await send(store, c, da, T1 + 600)  # the device is online: it will ack within the grace
    await store.messages.ack(db, iseq_of(first, db), T1 + 610)
    await queue.done(job, T1 + 650, pushed=False)  # it had acked the first one
    assert await queue.claim(T1 + 700, 10, VIS) == []
    # what is left gets its grace again from when the job was answered (never less than its own)
    assert await queue.next_due() == T1 + 1150
    assert len(await queue.claim(T1 + 1150, 10, VIS)) == 1


async def test_retry_hands_the_job_back_for_later(store: Store, queue: PushQueue) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.retry(job, T1 + 5_000, "503")
    assert await queue.next_due() == T1 + 5_000
    assert await queue.claim(T1 + 4_999, 10, VIS) == []
    (again,) = await queue.claim(T1 + 5_000, 10, VIS)
    assert (again.last_iseq, again.attempts) == (job.last_iseq, 2)
    assert await says(store, again) == (True, 1)


async def test_extend_keeps_the_job_leased_and_records_its_attempts(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    nxt = msgspec.structs.replace(job, attempts=2)  # what a RabbitMQ retry publishes
    extended = await queue.extend(nxt, T1 + 500_000)
    assert extended == msgspec.structs.replace(nxt, lease=T1 + 500_000)
    (row,) = await job_rows(store)
    assert row[2:] == (1, job.last_iseq, 0, T1 + 500_000, 2, T1 + 500_000, 0)
    assert await queue.next_due() == T1 + 500_000
    assert await queue.claim(T1 + 499_999, 10, VIS) == []
    # the old lease is no longer the job's: extending or answering with it changes nothing
    assert await queue.extend(job, T1 + 900_000) is None
    await queue.done(job, T1 + 1, pushed=True)
    assert (await job_rows(store))[0] == row
    assert await queue.extend(extended, extended.lease) == extended  # still its own: a check
    await queue.done(extended, T1 + 2, pushed=True)
    (row,) = await job_rows(store)
    assert (row[0], row[2], row[6], row[7]) == (db.id, 0, 0, 0)
    assert await queue.extend(extended, T1 + 900_000) is None  # answered: not leased


async def test_a_job_whose_extended_lease_ran_out_is_claimed_again(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    extended = await queue.extend(msgspec.structs.replace(job, attempts=2), T1 + 5_000)
    assert extended is not None
    (again,) = await queue.claim(T1 + 5_000, 10, VIS)  # lost elsewhere: the outbox hands it out
    assert (again.last_iseq, again.attempts, again.lease) == (job.last_iseq, 3, T1 + 65_000)
    assert await queue.extend(extended, T1 + 900_000) is None


async def test_retry_is_due_at_its_time_whatever_the_grace(store: Store, queue: PushQueue) -> None:
    await queue.configure(0.5, WINDOW)
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    assert await queue.claim(T1 + 499, 10, VIS) == []
    (job,) = await queue.claim(T1 + 500, 10, VIS)
    await queue.retry(job, T1 + 5_000, "503")
    assert await queue.next_due() == T1 + 5_000
    assert await queue.claim(T1 + 4_999, 10, VIS) == []
    assert len(await queue.claim(T1 + 5_000, 10, VIS)) == 1


async def test_next_due_is_the_earliest_claimable_time(store: Store, queue: PushQueue) -> None:
    assert await queue.next_due() is None
    a, _, da, _, c = await pair(store)
    x = await user(store, "xavier")
    dx = await device(store, x)
    with_x = await chat(store, a, x)
    await store.push.set_target(dx.id, FCM2, T0)
    await send(store, with_x, da, T1 + 700)
    await send(store, c, da, T1 + 300)
    assert await queue.next_due() == T1 + 300
    for job in await claim_all(queue, T1 + 700):
        await queue.done(job, T1 + 800, pushed=False)  # idle again, no window
    assert await queue.next_due() is None

    await queue.configure(1.0, WINDOW)  # with a grace, the same is due a second later
    await send(store, with_x, da, T1 + 2_700)
    await send(store, c, da, T1 + 2_300)
    assert await queue.next_due() == T1 + 3_300
    assert await queue.claim(T1 + 3_299, 10, VIS) == []
    assert len(await queue.claim(T1 + 3_300, 10, VIS)) == 1
    assert await queue.next_due() == T1 + 3_700


async def test_claim_honours_the_limit_earliest_due_first(store: Store, queue: PushQueue) -> None:
    a = await user(store, "alice")
    da = await device(store, a)
    dues = [T1 + 30, T1 + 10, T1 + 20]
    by_due: dict[int, Device] = {}
    for i, due in enumerate(dues):
        u = await user(store, f"u{i}")
        d = await device(store, u)
        c = await chat(store, a, u)
        await store.push.set_target(d.id, FCM, T0)
        await send(store, c, da, due)
        by_due[due] = d
    first = await queue.claim(FAR, 2, VIS)
    assert {j.device for j in first} == {by_due[T1 + 10].id, by_due[T1 + 20].id}
    rest = await queue.claim(FAR, 2, VIS)
    assert [j.device for j in rest] == [by_due[T1 + 30].id]
    assert await queue.claim(FAR, 2, VIS) == []


async def test_a_claim_passes_over_jobs_held_by_a_window_or_a_retry(
    store: Store, queue: PushQueue
) -> None:
    (_, _, da, _, c), others = await pair_and_chats(store, extra=8)
    windowed, retried = others[:4], others[4:]
    for each in others:  # held jobs: their first entries are older than the due one's
        await send(store, each, da, T1)
    jobs = {j.chat: j for j in await claim_all(queue, T1)}
    assert len(jobs) == len(others)
    for each in windowed:  # pushed: what comes next waits for the window
        await queue.done(jobs[each.id], T1 + 10, pushed=True)
        await send(store, each, da, T1 + 20)
    retry_at = {each.id: T1 + 40_000 + i for i, each in enumerate(retried)}
    for each in retried:
        await queue.retry(jobs[each.id], retry_at[each.id], "503")
    await send(store, c, da, T1 + 100)  # the one job due
    held = [r for r in await job_rows(store) if r[1] != c.id]
    assert sorted(r[5] for r in held) == [T1 + 30_010] * 4 + sorted(retry_at.values())
    assert await queue.next_due() == T1 + 100

    (job,) = await queue.claim(T1 + 1_000, 1, VIS)
    assert job.chat == c.id
    assert await queue.claim(T1 + 1_000, 100, VIS) == []
    assert [r for r in await job_rows(store) if r[1] != c.id] == held  # untouched
    assert await queue.next_due() == T1 + 30_010  # the held ones' times
    assert await queue.claim(T1 + 30_009, 100, VIS) == []
    assert {j.chat for j in await queue.claim(T1 + 30_010, 100, VIS)} == {x.id for x in windowed}
    for each in retried:
        assert await queue.next_due() == retry_at[each.id]
        assert await queue.claim(retry_at[each.id] - 1, 100, VIS) == []
        (job,) = await queue.claim(retry_at[each.id], 100, VIS)
        assert (job.chat, job.attempts) == (each.id, 2)


# --- dead letters -------------------------------------------------------------------------------


async def test_dead_records_a_letter_and_keeps_newer_entries_pending(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    await send(store, c, da, T1 + 1)
    (job,) = await queue.claim(T1 + 1, 10, VIS)
    meanwhile = await send(store, c, da, T1 + 2)
    await queue.dead(job, "gateway says 500", T1 + 3)
    (letter,) = await queue.dead_letters(10)
    assert letter == DeadLetter(
        id=letter.id,
        device=db.id,
        chat=c.id,
        attempts=1,
        error="gateway says 500",
        failed_at=T1 + 3,
    )
    (row,) = await job_rows(store)
    assert row[2:] == (1, job.last_iseq, 0, T1 + 3, 0, 0, 0)  # as after `done`
    (live,) = await queue.claim(FAR, 10, VIS)
    assert (live.last_iseq, live.attempts) == (iseq_of(meanwhile, db), 1)
    assert await says(store, live) == (True, 3)  # the device has acked none of them
    await queue.done(live, FAR, pushed=True)

    assert await queue.retry_dead([letter.id], FAR + 5) == 1
    assert await queue.dead_letters(10) == []
    (row,) = await job_rows(store)
    assert (row[2], row[5], row[8]) == (1, FAR + 5, 0)  # pending, due now, no window
    (back,) = await queue.claim(FAR + 5, 10, VIS)  # despite the window of the push
    assert (back.device, back.chat, back.attempts) == (db.id, c.id, 1)
    assert await says(store, back) == (True, 3)


async def test_dead_with_nothing_newer_leaves_the_job_idle(store: Store, queue: PushQueue) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.dead(job, "boom", T1 + 1)
    assert len(await queue.dead_letters(10)) == 1
    (row,) = await job_rows(store)
    assert (row[2], row[6], row[7], row[8]) == (0, 0, 0, 0)
    assert await queue.next_due() is None
    assert await queue.claim(FAR, 10, VIS) == []


async def test_a_retried_dead_letter_joins_the_live_job(store: Store, queue: PushQueue) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.dead(job, "boom", T1 + 1)
    await send(store, c, da, T1 + 2)
    await send(store, c, da, T1 + 3)
    last = await send(store, c, da, T1 + 4)
    (letter,) = await queue.dead_letters(10)
    assert await queue.retry_dead([letter.id], T1 + 5) == 1
    assert len(await job_rows(store)) == 1
    (merged,) = await queue.claim(T1 + 5, 10, VIS)  # one job: the letter and the rest
    assert merged.last_iseq == iseq_of(last, db)
    assert await says(store, merged) == (True, 4)


async def test_retry_dead_leaves_a_leased_job_to_its_worker(store: Store, queue: PushQueue) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await send(store, c, da, T1 + 1)
    await queue.dead(job, "boom", T1 + 2)  # a letter; the newer entry keeps the job pending
    assert [j.chat for j in await queue.claim(T1 + 2, 10, VIS)] == [c.id]  # a worker holds it
    (letter,) = await queue.dead_letters(10)
    assert await queue.retry_dead([letter.id], T1 + 3) == 1
    assert await queue.claim(T1 + 3, 10, VIS) == []  # a job goes to one worker at a time


async def test_letters_of_one_job_retried_together_are_one_job(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    for at in (T1, T1 + 10):
        last = await send(store, c, da, at)
        (job,) = await queue.claim(at, 10, VIS)
        await queue.dead(job, "boom", at + 1)
    assert len(await queue.dead_letters(10)) == 2
    assert await queue.retry_dead(None, T1 + 50) == 2
    assert [(r[1], r[2], r[5]) for r in await job_rows(store)] == [(c.id, 1, T1 + 50)]
    (back,) = await queue.claim(T1 + 50, 10, VIS)
    assert back.last_iseq == iseq_of(last, db)
    assert await says(store, back) == (True, 2)


async def dead_letters_of(store: Store, queue: PushQueue, n: int) -> list[DeadLetter]:
    """`n` dead letters, one per chat of Alice (sender) and Bob (with a target)."""
    (_, _, da, _, c), others = await pair_and_chats(store, extra=n - 1)
    for i, each in enumerate([c, *others]):
        await send(store, each, da, T1 + i)
    for job in await claim_all(queue, T1 + n):
        await queue.dead(job, "boom", T1 + n)
    letters = await queue.dead_letters(100)
    assert len(letters) == n
    return letters


async def test_retry_dead_by_id_and_all(store: Store, queue: PushQueue) -> None:
    letters = await dead_letters_of(store, queue, 4)
    assert await queue.retry_dead([], FAR) == 0
    assert await queue.retry_dead([10**6], FAR) == 0
    assert await queue.retry_dead([letters[0].id, letters[2].id], FAR) == 2
    assert [x.id for x in await queue.dead_letters(100)] == [letters[1].id, letters[3].id]
    assert {j.chat for j in await claim_all(queue, FAR)} == {letters[0].chat, letters[2].chat}
    assert await queue.retry_dead(None, FAR + 1) == 2
    assert await queue.dead_letters(100) == []
    assert {j.chat for j in await claim_all(queue, FAR + 1)} == {
        letters[1].chat,
        letters[3].chat,
    }
    assert await queue.retry_dead(None, FAR + 2) == 0


async def test_drop_dead_by_id_and_all(store: Store, queue: PushQueue) -> None:
    letters = await dead_letters_of(store, queue, 3)
    assert await queue.drop_dead([]) == 0
    assert await queue.drop_dead([10**6]) == 0
    assert await queue.drop_dead([letters[1].id]) == 1
    assert [x.id for x in await queue.dead_letters(100)] == [letters[0].id, letters[2].id]
    assert await queue.drop_dead(None) == 2
    assert await queue.dead_letters(100) == []
    assert await queue.drop_dead(None) == 0
    assert await claim_all(queue, FAR) == []  # dropped, not queued


async def test_dead_letters_come_oldest_first_up_to_the_limit(
    store: Store, queue: PushQueue
) -> None:
    letters = await dead_letters_of(store, queue, 3)
    assert [x.id for x in letters] == sorted(x.id for x in letters)
    assert await queue.dead_letters(2) == letters[:2]


# --- invitations ------------------------------------------------------------------------------


async def test_creating_a_group_marks_the_invited_devices_pending(
    store: Store, queue: PushQueue
) -> None:
    a, b, x = await user(store, "alice"), await user(store, "bob"), await user(store, "xavier")
    da, da2 = await device(store, a), await device(store, a)
    db, db_bare, dx = await device(store, b), await device(store, b), await device(store, x)
    for d in (da, da2, db, dx):
        await store.push.set_target(d.id, FCM, T0)
    g, out = await create(store, a, b, x, at=T1)
    assert {d.device for d in out} == {da.id, da2.id, db.id, db_bare.id, dx.id}
    # the creator's devices are not invited; a device without a target has no job
    assert await job_rows(store) == sorted(
        [
            (db.id, g.id, 1, 0, iseq_of(out, db), T1, 0, 0, 0),
            (dx.id, g.id, 1, 0, iseq_of(out, dx), T1, 0, 0, 0),
        ]
    )
    jobs = {j.device: j for j in await claim_all(queue, T1)}
    assert set(jobs) == {db.id, dx.id}
    job = jobs[db.id]
    assert (job.chat, job.invite_iseq, job.last_iseq) == (g.id, iseq_of(out, db), iseq_of(out, db))
    ctx = await context(store, db, g, job.last_iseq)
    assert (ctx.waiting, ctx.count) == (False, 0)
    assert job.invite_iseq > ctx.acked_iseq  # "New chat"
    for each in jobs.values():
        await queue.done(each, T1 + 1, pushed=True)
    assert [(r[2], r[4]) for r in await job_rows(store)] == [(0, 0), (0, 0)]  # idle, covered


async def test_creating_a_direct_chat_marks_nothing(store: Store, queue: PushQueue) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    for d in (da, db):
        await store.push.set_target(d.id, FCM, T0)
    _, out = await create(store, a, b, kind="direct")
    assert {d.device for d in out} == {da.id, db.id}
    assert await job_rows(store) == []
    assert await claim_all(queue) == []


async def test_adding_members_marks_the_invited_devices_pending(
    store: Store, queue: PushQueue
) -> None:
    (a, _, _, db, c) = await pair(store)
    x, y = await user(store, "xavier"), await user(store, "yvonne")
    dx, dy = await device(store, x), await device(store, y)
    await store.push.set_target(dx.id, FCM2, T0)
    await store.push.set_target(dy.id, FCM2, T0)  # not added
    _, out = await store.chats.change_members(
        c.id, c.version, [Member(user=x.id)], [], [], a.id, T1
    )
    assert db.id in {d.device for d in out}  # Bob hears of it, but it is no invitation
    assert await job_rows(store) == [(dx.id, c.id, 1, 0, iseq_of(out, dx), T1, 0, 0, 0)]
    (job,) = await claim_all(queue, T1)
    assert (job.device, job.chat, job.invite_iseq) == (dx.id, c.id, iseq_of(out, dx))


async def test_an_invitation_during_a_lease_stays_pending(store: Store, queue: PushQueue) -> None:
    (a, b, da, db, c) = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    # Bob is removed and added again while his push is in flight
    c, _ = await store.chats.change_members(c.id, c.version, [], [b.id], [], a.id, T1 + 1)
    c, out = await store.chats.change_members(
        c.id, c.version, [Member(user=b.id)], [], [], a.id, T1 + 2
    )
    invite = iseq_of(out, db)
    assert invite > job.last_iseq and job.invite_iseq == 0
    (row,) = await job_rows(store)
    assert (row[2], row[4], row[5]) == (1, invite, job.lease)  # pending: due still its lease
    await queue.done(job, T1 + 10, pushed=True)
    (row,) = await job_rows(store)
    assert (row[2], row[4], row[5]) == (1, invite, T1 + 10 + 30_000)  # after the window
    assert await queue.claim(T1 + 10 + 29_999, 10, VIS) == []
    (again,) = await queue.claim(T1 + 10 + 30_000, 10, VIS)
    assert (again.invite_iseq, again.last_iseq) == (invite, invite)


async def test_a_retried_dead_invitation_is_an_invitation_again(
    store: Store, queue: PushQueue
) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    db = await device(store, b)
    await store.push.set_target(db.id, FCM, T0)
    g, out = await create(store, a, b, at=T1)
    (job,) = await claim_all(queue, T1)
    await queue.dead(job, "boom", T1 + 1)
    assert [r[4] for r in await job_rows(store)] == [0]
    (letter,) = await queue.dead_letters(10)
    assert await queue.retry_dead([letter.id], T1 + 2) == 1
    (back,) = await claim_all(queue, T1 + 2)
    assert (back.device, back.chat, back.invite_iseq) == (db.id, g.id, iseq_of(out, db))


async def test_invitations_get_the_grace_and_the_window(store: Store, queue: PushQueue) -> None:
    await queue.configure(0.5, WINDOW)
    (a, b, da, db, c) = await pair(store)
    x = await user(store, "xavier")
    dx = await device(store, x)
    await store.push.set_target(dx.id, FCM2, T0)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1 + 500, 10, VIS)
    await queue.done(job, T1 + 500, pushed=True)  # Bob was pushed: his job is idle
    c, _ = await store.chats.change_members(c.id, c.version, [], [b.id], [], a.id, T1 + 600)
    c, out = await store.chats.change_members(
        c.id, c.version, [Member(user=b.id), Member(user=x.id)], [], [], a.id, T1 + 700
    )
    rows = {r[0]: (r[2], r[4], r[5]) for r in await job_rows(store)}
    assert rows == {
        db.id: (1, iseq_of(out, db), T1 + 500 + 30_000),  # after the window of his push
        dx.id: (1, iseq_of(out, dx), T1 + 700 + 500),  # new: after its grace
    }
    assert await queue.claim(T1 + 1_199, 10, VIS) == []
    (new,) = await queue.claim(T1 + 1_200, 10, VIS)
    assert (new.device, new.invite_iseq, new.last_iseq) == (
        dx.id,
        iseq_of(out, dx),
        new.invite_iseq,
    )
    assert await queue.next_due() == T1 + 30_500
    (again,) = await queue.claim(T1 + 30_500, 10, VIS)
    assert (again.device, again.invite_iseq) == (db.id, iseq_of(out, db))


# --- policy -----------------------------------------------------------------------------------


async def test_before_configure_there_is_no_grace_and_no_window(store: Store) -> None:
    queue = queue_of(store)  # not the fixture's: never configured
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.done(job, T1 + 10, pushed=True)
    later = await send(store, c, da, T1 + 20)
    (row,) = await job_rows(store)
    assert (row[2], row[5]) == (1, T1 + 20)  # no window holds it
    (job,) = await queue.claim(T1 + 20, 10, VIS)
    assert job.last_iseq == iseq_of(later, db)  # no grace: an entry of now is covered
    await queue.done(job, T1 + 30, pushed=True)
    assert await queue.claim(T1 + 30, 10, VIS) == []
    assert len(await job_rows(store)) == 1
    assert await queue.claim(T1 + 31, 10, VIS) == []
    assert await job_rows(store) == []  # forgotten as soon as its push is past


async def test_configure_applies_to_jobs_that_become_pending_afterwards(
    store: Store, queue: PushQueue
) -> None:
    (_, _, da, db, c), (pushed, fresh) = await pair_and_chats(store, extra=2)
    await send(store, pushed, da, T1)
    (job,) = await claim_all(queue, T1)
    await queue.done(job, T1, pushed=True)  # idle, pushed at T1
    await send(store, c, da, T1 + 1)  # pending before the change: no grace
    await queue.configure(2.0, 60.0)
    rows = {r[1]: (r[2], r[5]) for r in await job_rows(store)}
    assert rows == {c.id: (1, T1 + 1), pushed.id: (0, T1 + 30_000)}  # as they were
    await send(store, c, da, T1 + 2)  # pending already: still due at T1 + 1
    covered = await send(store, pushed, da, T1 + 3)  # pending again: the new window
    await send(store, fresh, da, T1 + 4)  # a new job: the new grace
    rows = {r[1]: (r[2], r[5]) for r in await job_rows(store)}
    assert rows == {c.id: (1, T1 + 1), pushed.id: (1, T1 + 60_000), fresh.id: (1, T1 + 2_004)}
    assert await queue.next_due() == T1 + 1

    (job,) = await queue.claim(T1 + 2_003, 10, VIS)
    assert job.chat == c.id
    assert job.last_iseq == iseq_of(covered, db)  # the claim covers what had the new grace
    assert await says(store, job) == (True, 2)
    (new,) = await queue.claim(T1 + 2_004, 10, VIS)
    assert new.chat == fresh.id
    await send(store, fresh, da, T1 + 2_500)
    await queue.done(new, T1 + 3_000, pushed=True)  # pending, after the new window
    assert {r[1]: (r[2], r[5]) for r in await job_rows(store)}[fresh.id] == (1, T1 + 63_000)
    assert await queue.next_due() == T1 + 60_000
    assert await queue.claim(T1 + 59_999, 10, VIS) == []
    (again,) = await queue.claim(T1 + 60_000, 10, VIS)
    assert again.chat == pushed.id


# --- housekeeping ---------------------------------------------------------------------------


async def test_idle_jobs_are_forgotten_once_their_window_passed(
    store: Store, queue: PushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.done(job, T1 + 10, pushed=True)
    assert await queue.claim(T1 + 10 + 30_000, 10, VIS) == []
    assert len(await job_rows(store)) == 1  # kept while it still holds the window
    assert await queue.claim(T1 + 10 + 30_001, 10, VIS) == []
    assert await job_rows(store) == []
