"""Contract of `PushStore` and `PushQueue` (see their docstrings in pigeon.ports), against the
SQLite store and its embedded queue (`SqlitePushQueue` over the same database).

Every queue call gets its `now` explicitly: times are ms, `visibility`/`window`/`grace` seconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest

from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.adapters.store.sqlite.push import SqlitePushQueue
from pigeon.domain.models import ChatInfo, Device, User
from pigeon.domain.push import PushTarget
from pigeon.ports import DeadLetter, PushJob, SendResult
from tests.contract.test_store import T0, chat, device, send_req, user

T1 = T0 + 1_000_000  # when the tests' pushes happen (messages are sent at T1 + x)
FAR = T1 + 10**9  # a `now` after every lease, grace and window of these tests
VIS = 60.0
WINDOW = 30.0
FCM = PushTarget(kind="fcm", token="token-1")
FCM2 = PushTarget(kind="fcm", token="token-2")

Row = tuple[str, str, int, int, int, int, int, int]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "push.db", synchronous="NORMAL")
    await s.open()
    yield s
    await s.aclose()


@pytest.fixture
def queue(store: SqliteStore) -> SqlitePushQueue:
    return SqlitePushQueue(store.db)


async def send(store: SqliteStore, c: ChatInfo, sender: Device, at: int = T1) -> SendResult:
    return await store.messages.send(msgspec.structs.replace(send_req(c, sender), at=at))


def iseq_of(result: SendResult, d: Device) -> int:
    (iseq,) = [x.iseq for x in result.deliveries if x.device == d.id]
    return iseq


async def claim_all(
    queue: SqlitePushQueue, now: int = FAR, window: float = WINDOW, grace: float = 0.0
) -> list[PushJob]:
    return await queue.claim(now, 100, VIS, window, grace)


async def job_rows(store: SqliteStore) -> list[Row]:
    def q(conn: sqlite3.Connection) -> list[Row]:
        return conn.execute(
            "SELECT device_id, chat_id, count, last_iseq, due_at, attempts, leased_until,"
            " pushed_at FROM push_jobs ORDER BY device_id, chat_id"
        ).fetchall()

    return await store.db.read(q)


class Pair(NamedTuple):
    """Alice (the sender) and Bob, whose device has a target, with a chat of theirs."""

    a: User
    b: User
    da: Device
    db: Device
    c: ChatInfo


async def pair(store: SqliteStore) -> Pair:
    return (await pair_and_chats(store))[0]


async def pair_and_chats(store: SqliteStore, extra: int = 0) -> tuple[Pair, list[ChatInfo]]:
    """The pair, and `extra` more chats of theirs. Chats are created before the target is set,
    so that only what the tests send is queued (whatever creating a chat may queue)."""
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    others = [await chat(store, a, b) for _ in range(extra)]
    await store.push.set_target(db.id, FCM, T0)
    return Pair(a, b, da, db, c), others


# --- the outbox -----------------------------------------------------------------------------


async def test_a_message_to_a_device_with_a_target_queues_a_job(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    sent = await send(store, c, da)
    (job,) = await claim_all(queue)
    assert (job.device, job.chat, job.count, job.last_iseq) == (db.id, c.id, 1, iseq_of(sent, db))
    assert job.attempts == 1 and job.lease == FAR + int(VIS * 1000)


async def test_devices_without_a_target_and_the_sending_device_get_no_job(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db, db_bare = await device(store, a), await device(store, b), await device(store, b)
    c = await chat(store, a, b)
    await store.push.set_target(da.id, FCM, T0)
    await store.push.set_target(db.id, FCM2, T0)
    sent = await send(store, c, da)
    assert {x.device for x in sent.deliveries} == {db.id, db_bare.id}  # db_bare has an entry
    assert [j.device for j in await claim_all(queue)] == [db.id]


async def test_the_senders_other_devices_get_no_job(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    a, b = await user(store, "alice"), await user(store, "bob")
    da, da_other, db = await device(store, a), await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    await store.push.set_target(da_other.id, FCM, T0)
    await store.push.set_target(db.id, FCM2, T0)
    await send(store, c, da)
    # Alice wrote it herself: her tablet must not say "New message" (its badge is 0, too).
    assert [j.device for j in await claim_all(queue)] == [db.id]


async def test_a_burst_to_one_chat_is_one_job_and_two_chats_are_two(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    (_, _, da, db, c), (other,) = await pair_and_chats(store, extra=1)
    sent = [await send(store, c, da, T1 + i) for i in range(5)]
    other_sent = await send(store, other, da, T1 + 9)
    jobs = {j.chat: j for j in await claim_all(queue)}
    assert set(jobs) == {c.id, other.id}
    assert (jobs[c.id].count, jobs[c.id].last_iseq) == (5, iseq_of(sent[-1], db))
    assert (jobs[other.id].count, jobs[other.id].last_iseq) == (1, iseq_of(other_sent, db))
    assert {j.device for j in jobs.values()} == {db.id}


async def test_receipts_and_read_states_queue_no_job(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
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


async def test_removing_the_target_drops_queued_jobs_and_stops_new_ones(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    assert await store.push.target_status(db.id) == (FCM, None)
    await send(store, c, da)
    await store.push.set_target(db.id, None, T1 + 1)
    assert await store.push.target_status(db.id) == (None, None)
    assert await job_rows(store) == []
    await send(store, c, da, T1 + 2)
    assert await claim_all(queue) == []


async def test_a_gone_target_is_removed_with_its_reason(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
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
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await store.push.set_target(db.id, FCM2, T1)  # the device registered a newer token
    await send(store, c, da)
    assert not await store.push.remove_gone(db.id, FCM, "UNREGISTERED", T1 + 1)
    assert await store.push.target_status(db.id) == (FCM2, None)
    assert [j.device for j in await claim_all(queue)] == [db.id]


async def test_a_revoked_device_loses_its_target_jobs_and_dead_letters(
    store: SqliteStore, queue: SqlitePushQueue
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
    assert await store.push.context(db.id, c.id) is None


# --- context ----------------------------------------------------------------------------------


async def test_context_of_a_push(store: SqliteStore) -> None:
    a, b, x = await user(store, "alice"), await user(store, "bob"), await user(store, "xavier")
    da, db, dx = await device(store, a), await device(store, b), await device(store, x)
    c1, c2 = await chat(store, a, b, x), await chat(store, a, b)
    await store.push.set_target(db.id, FCM, T0)
    await send(store, c1, da, T1)
    await send(store, c1, da, T1 + 1)
    last = await send(store, c2, da, T1 + 2)
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None
    assert (ctx.target, ctx.user_id, ctx.acked_iseq) == (FCM, b.id, 0)
    assert (ctx.unread, ctx.sender_name) == (3, None)

    await store.messages.ack(db, iseq_of(last, db), T1 + 3)
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None and ctx.acked_iseq == iseq_of(last, db)
    assert ctx.unread == 3  # delivered is not read

    await store.messages.mark_read(db, c1.id, 2, T1 + 4)
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None and ctx.unread == 1
    await send(store, c2, db, T1 + 5)  # bob answers: he has read c2, his own message is no news
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None and ctx.unread == 0

    await send(store, c1, dx, T1 + 6)
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None and (ctx.unread, ctx.sender_name) == (1, None)
    await store.push.set_show_names(b.id, True)
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None and ctx.sender_name == "xavier"
    ctx = await store.push.context(db.id, c2.id)
    assert ctx is not None and ctx.sender_name == "bob"  # the latest sender of that chat
    await store.push.set_show_names(b.id, False)
    ctx = await store.push.context(db.id, c1.id)
    assert ctx is not None and ctx.sender_name is None


async def test_context_without_a_target_or_device(store: SqliteStore) -> None:
    b = await user(store, "bob")
    db = await device(store, b)
    c = await chat(store, b)
    ctx = await store.push.context(db.id, c.id)
    assert ctx is not None and (ctx.target, ctx.user_id, ctx.unread) == (None, b.id, 0)
    assert await store.push.context("no-such-device", c.id) is None


# --- leases -----------------------------------------------------------------------------------


async def test_a_lease_hides_the_job_until_it_runs_out(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (first,) = await queue.claim(T1, 10, VIS, WINDOW)
    assert (first.attempts, first.lease) == (1, T1 + 60_000)
    assert await queue.claim(T1 + 59_999, 10, VIS, WINDOW) == []
    assert await queue.next_due(WINDOW) == T1 + 60_000
    (second,) = await queue.claim(T1 + 60_000, 10, VIS, WINDOW)
    assert (second.device, second.chat, second.count) == (db.id, c.id, 1)
    assert (second.attempts, second.lease) == (2, T1 + 120_000)

    # the first worker's answers come too late: the second one holds the job now
    await queue.done(first, T1 + 60_001, pushed=True)
    await queue.retry(first, T1 + 60_002, "late")
    await queue.dead(first, "late", T1 + 60_003)
    assert await queue.dead_letters(10) == []
    (row,) = await job_rows(store)
    assert row[2:] == (1, second.last_iseq, T1, 2, T1 + 120_000, 0)

    await queue.done(second, T1 + 60_010, pushed=True)
    (row,) = await job_rows(store)
    assert row[2] == 0 and row[7] == T1 + 60_010
    assert await queue.next_due(WINDOW) is None


async def test_grace_delays_a_new_job(store: SqliteStore, queue: SqlitePushQueue) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    await send(store, c, da, T1 + 300)  # a later entry does not postpone the job
    assert await queue.next_due(WINDOW, grace=0.5) == T1 + 500
    assert await queue.claim(T1 + 499, 10, VIS, WINDOW, grace=0.5) == []
    (job,) = await queue.claim(T1 + 500, 10, VIS, WINDOW, grace=0.5)
    assert job.count == 2


async def test_a_push_opens_a_window_that_coalesces_what_follows(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS, WINDOW)
    await queue.done(job, T1 + 10, pushed=True)
    assert await queue.next_due(WINDOW) is None
    later = [await send(store, c, da, T1 + 20 + i) for i in range(3)]
    opens = T1 + 10 + 30_000
    assert await queue.next_due(WINDOW) == opens
    assert await queue.claim(opens - 1, 10, VIS, WINDOW) == []
    (job,) = await queue.claim(opens, 10, VIS, WINDOW)
    assert (job.count, job.last_iseq, job.attempts) == (3, iseq_of(later[-1], db), 1)


async def test_a_job_done_without_a_push_opens_no_window(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS, WINDOW)
    await queue.done(job, T1 + 1, pushed=False)  # e.g. the device had acked meanwhile
    assert await queue.claim(T1 + 2, 10, VIS, WINDOW) == []  # nothing left
    await send(store, c, da, T1 + 3)
    (job,) = await queue.claim(T1 + 3, 10, VIS, WINDOW)
    assert (job.count, job.attempts) == (1, 1)


async def test_entries_arriving_during_a_lease_stay_queued(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    await send(store, c, da, T1 + 1)
    (job,) = await queue.claim(T1 + 1, 10, VIS, WINDOW)
    assert job.count == 2
    meanwhile = [await send(store, c, da, T1 + 2 + i) for i in range(3)]
    await queue.done(job, T1 + 10, pushed=False)
    (job,) = await queue.claim(T1 + 11, 10, VIS, WINDOW)
    assert (job.count, job.last_iseq, job.attempts) == (3, iseq_of(meanwhile[-1], db), 1)
    await queue.done(job, T1 + 12, pushed=True)
    assert await queue.claim(FAR, 10, VIS, WINDOW) == []


async def test_entries_arriving_during_a_lease_get_their_grace(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1 + 500, 10, VIS, WINDOW, grace=0.5)
    await send(store, c, da, T1 + 600)  # the device is online: it will ack within the grace
    await queue.done(job, T1 + 650, pushed=False)  # it had acked the first one
    assert await queue.claim(T1 + 700, 10, VIS, WINDOW, grace=0.5) == []
    # what is left gets its grace again from when the job was answered (never less than its own)
    assert await queue.next_due(WINDOW, grace=0.5) == T1 + 1150


async def test_retry_hands_the_job_back_for_later(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS, WINDOW)
    await queue.retry(job, T1 + 5_000, "503")
    assert await queue.next_due(WINDOW) == T1 + 5_000
    assert await queue.claim(T1 + 4_999, 10, VIS, WINDOW) == []
    (again,) = await queue.claim(T1 + 5_000, 10, VIS, WINDOW)
    assert (again.count, again.attempts) == (1, 2)


async def test_retry_is_due_at_its_time_whatever_the_grace(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1 + 500, 10, VIS, WINDOW, grace=0.5)
    await queue.retry(job, T1 + 5_000, "503")
    assert await queue.next_due(WINDOW, grace=0.5) == T1 + 5_000
    assert len(await queue.claim(T1 + 5_000, 10, VIS, WINDOW, grace=0.5)) == 1


async def test_next_due_is_the_earliest_claimable_time(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    assert await queue.next_due(WINDOW) is None
    a, _, da, _, c = await pair(store)
    x = await user(store, "xavier")
    dx = await device(store, x)
    with_x = await chat(store, a, x)
    await store.push.set_target(dx.id, FCM2, T0)
    await send(store, with_x, da, T1 + 700)
    await send(store, c, da, T1 + 300)
    assert await queue.next_due(WINDOW) == T1 + 300
    assert await queue.next_due(WINDOW, grace=1.0) == T1 + 1_300


async def test_claim_honours_the_limit_earliest_due_first(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
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
    first = await queue.claim(FAR, 2, VIS, WINDOW)
    assert {j.device for j in first} == {by_due[T1 + 10].id, by_due[T1 + 20].id}
    rest = await queue.claim(FAR, 2, VIS, WINDOW)
    assert [j.device for j in rest] == [by_due[T1 + 30].id]
    assert await queue.claim(FAR, 2, VIS, WINDOW) == []


# --- dead letters -------------------------------------------------------------------------------


async def test_dead_moves_the_jobs_entries_to_the_dead_letters(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    await send(store, c, da, T1 + 1)
    (job,) = await queue.claim(T1 + 1, 10, VIS, WINDOW)
    meanwhile = await send(store, c, da, T1 + 2)
    await queue.dead(job, "gateway says 500", T1 + 3)
    (letter,) = await queue.dead_letters(10)
    assert letter == DeadLetter(
        id=letter.id,
        device=db.id,
        chat=c.id,
        count=2,
        attempts=1,
        error="gateway says 500",
        failed_at=T1 + 3,
    )
    (live,) = await queue.claim(FAR, 10, VIS, WINDOW)  # only what came meanwhile
    assert (live.count, live.last_iseq, live.attempts) == (1, iseq_of(meanwhile, db), 1)
    await queue.done(live, FAR, pushed=True)

    assert await queue.retry_dead([letter.id], FAR + 5) == 1
    assert await queue.dead_letters(10) == []
    (back,) = await queue.claim(FAR + 5, 10, VIS, WINDOW)  # despite the window of the push
    assert (back.device, back.chat, back.count, back.attempts) == (db.id, c.id, 2, 1)


async def test_a_retried_dead_letter_joins_the_live_job(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS, WINDOW)
    await queue.dead(job, "boom", T1 + 1)
    await send(store, c, da, T1 + 2)
    await send(store, c, da, T1 + 3)
    last = await send(store, c, da, T1 + 4)
    (letter,) = await queue.dead_letters(10)
    assert await queue.retry_dead([letter.id], T1 + 5) == 1
    (merged,) = await queue.claim(T1 + 5, 10, VIS, WINDOW)  # one job: the letter and the rest
    assert (merged.count, merged.last_iseq) == (4, iseq_of(last, db))
    assert len(await job_rows(store)) == 1


async def dead_letters_of(store: SqliteStore, queue: SqlitePushQueue, n: int) -> list[DeadLetter]:
    """`n` dead letters, one per chat of Alice (sender) and Bob (with a target)."""
    (_, _, da, _, c), others = await pair_and_chats(store, extra=n - 1)
    for i, each in enumerate([c, *others]):
        await send(store, each, da, T1 + i)
    for job in await claim_all(queue, T1 + n):
        await queue.dead(job, "boom", T1 + n)
    letters = await queue.dead_letters(100)
    assert len(letters) == n
    return letters


async def test_retry_dead_by_id_and_all(store: SqliteStore, queue: SqlitePushQueue) -> None:
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


async def test_drop_dead_by_id_and_all(store: SqliteStore, queue: SqlitePushQueue) -> None:
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
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    letters = await dead_letters_of(store, queue, 3)
    assert [x.id for x in letters] == sorted(x.id for x in letters)
    assert await queue.dead_letters(2) == letters[:2]


# --- housekeeping ---------------------------------------------------------------------------


async def test_finished_jobs_are_forgotten_once_their_window_passed(
    store: SqliteStore, queue: SqlitePushQueue
) -> None:
    _, _, da, _, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS, WINDOW)
    await queue.done(job, T1 + 10, pushed=True)
    assert await queue.claim(T1 + 10 + 30_000, 10, VIS, WINDOW) == []
    assert len(await job_rows(store)) == 1  # kept while it still holds the window
    assert await queue.claim(T1 + 10 + 30_001, 10, VIS, WINDOW) == []
    assert await job_rows(store) == []
