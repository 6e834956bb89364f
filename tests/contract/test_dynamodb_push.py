"""`PushStore` and the push queue over its outbox (`DynamoPush`, `DynamoPushQueue`) on moto.

The contract tests of tests/contract/test_push_store.py run on the whole `DynamoStore` through
the contract suite's `store` fixture (tests/contract/conftest.py); these tests make jobs with
`mark_pending`, the outbox write the message path calls, and inbox entries as the append
protocol writes them, and check what the contract's SQL views cannot: idle jobs' TTL.
"""

from __future__ import annotations

import pytest

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.dynamodb.codec import encode, expires_at, int_of, key, num_key
from pigeon.adapters.store.dynamodb.db import DynamoDb
from pigeon.adapters.store.dynamodb.inbox import entry_key
from pigeon.adapters.store.dynamodb.push import DynamoPushQueue, mark_pending
from pigeon.adapters.store.dynamodb.tables import INBOX, MESSAGES, PUSH
from pigeon.domain.push import PushTarget
from pigeon.ports import PushQueueDepth
from tests.contract.test_push_store import VIS, iseq_of, pair, send
from tests.contract.test_store import T0, device, user
from tests.support import dynamodb as support

moto_dynamodb = support.moto_dynamodb
dynamo = support.dynamo
store = support.store

T1 = T0 + 1_000_000
FAR = T1 + 10**9
FCM = PushTarget(kind="fcm", token="token-1")
FCM2 = PushTarget(kind="fcm", token="token-2")


@pytest.fixture
async def queue(dynamo: DynamoDb) -> DynamoPushQueue:
    q = DynamoPushQueue(dynamo)
    await q.configure(0.0, 30.0)
    return q


async def entry(store: DynamoStore, device_id: str, iseq: int, chat: str, at: int) -> None:
    """A message entry in the device's inbox (and its head moved past it), as appended."""
    values = {"rec": f"C#{chat}/{iseq}", "chat": chat, "seq": iseq, "at": at}
    await store.db.put(INBOX, entry_key(device_id, iseq) | encode(values))
    await store.db.put(
        MESSAGES, key(f"C#{chat}", num_key(iseq)) | encode({"sender": "someone", "at": at})
    )
    head = await store.db.get(INBOX, key(f"D#{device_id}"))
    assert head is not None
    head["next_iseq"] = {"N": str(iseq + 1)}
    await store.db.put(INBOX, head)


async def test_targets_are_set_replaced_and_removed_when_gone(store: DynamoStore) -> None:
    b = await user(store, "bob")  # type: ignore[arg-type]
    db = await device(store, b)  # type: ignore[arg-type]
    assert await store.push.target_status(db.id) == (None, None)
    await store.push.set_target(db.id, FCM, T1)
    assert await store.push.target_status(db.id) == (FCM, None)
    head = await store.db.get(INBOX, key(f"D#{db.id}"))
    assert head is not None and head["push"] == {"BOOL": True}
    assert not await store.push.remove_gone(db.id, FCM2, "UNREGISTERED", T1)  # not that one
    assert await store.push.remove_gone(db.id, FCM, "UNREGISTERED", T1 + 1)
    assert await store.push.target_status(db.id) == (None, "UNREGISTERED")
    assert not await store.push.remove_gone(db.id, FCM, "again", T1 + 2)
    await store.push.set_target(db.id, FCM2, T1 + 3)
    assert await store.push.target_status(db.id) == (FCM2, None)
    await store.push.set_target("no-such-device", FCM, T1)  # nothing to attach it to
    assert await store.push.target_status("no-such-device") == (None, None)
    ctx = await store.push.context(db.id, "chat", 10)
    assert ctx is not None and (ctx.target, ctx.user_id, ctx.waiting) == (FCM2, b.id, False)
    assert await store.push.context("no-such-device", "chat", 10) is None


async def test_a_job_is_leased_answered_and_coalesces_a_burst(
    store: DynamoStore, queue: DynamoPushQueue
) -> None:
    b = await user(store, "bob")  # type: ignore[arg-type]
    db = await device(store, b)  # type: ignore[arg-type]
    await store.push.set_target(db.id, FCM, T1)
    await entry(store, db.id, 1, "c1", T1)
    await mark_pending(store.db, db.id, "c1", T1)
    await mark_pending(store.db, db.id, "c1", T1 + 1)  # a burst: the same job
    assert await queue.next_due() == T1
    assert await queue.depth(T1) == PushQueueDepth(pending=1, due=1, oldest_due_at=T1)
    (job,) = await queue.claim(T1 + 5, 10, 60.0)
    assert (job.device, job.chat, job.last_iseq, job.attempts) == (db.id, "c1", 1, 1)
    assert await queue.claim(T1 + 6, 10, 60.0) == []  # leased
    ctx = await store.push.context(db.id, "c1", job.last_iseq)
    assert ctx is not None and ctx.waiting
    # an entry arriving during the lease keeps the job pending after it
    await entry(store, db.id, 2, "c1", T1 + 7)
    await mark_pending(store.db, db.id, "c1", T1 + 7)
    await queue.done(job, T1 + 8, pushed=True)
    assert await queue.next_due() == T1 + 8 + 30_000  # after the window
    (again,) = await queue.claim(FAR, 10, 60.0)
    assert again.last_iseq == 2
    await queue.done(again, FAR, pushed=False)
    assert await queue.next_due() is None  # idle


async def test_leases_run_out_retry_and_extend(store: DynamoStore, queue: DynamoPushQueue) -> None:
    b = await user(store, "bob")  # type: ignore[arg-type]
    db = await device(store, b)  # type: ignore[arg-type]
    await mark_pending(store.db, db.id, "c1", T1)
    (job,) = await queue.claim(T1, 10, 1.0)
    (again,) = await queue.claim(T1 + 1000, 10, 1.0)  # claimable exactly at the lease's end
    assert again.attempts == 2
    assert await queue.extend(job, T1 + 5000) is None  # not its lease any more
    longer = await queue.extend(again, T1 + 5000)
    assert longer is not None and longer.lease == T1 + 5000
    await queue.retry(again, T1 + 9000, "boom")  # stale lease: ignored
    assert await queue.claim(T1 + 4999, 10, 1.0) == []
    await queue.retry(longer, T1 + 9000, "boom")
    assert await queue.claim(T1 + 8999, 10, 1.0) == []
    assert len(await queue.claim(T1 + 9000, 10, 1.0)) == 1


async def test_dead_letters_are_kept_retried_and_dropped(
    store: DynamoStore, queue: DynamoPushQueue
) -> None:
    b = await user(store, "bob")  # type: ignore[arg-type]
    db = await device(store, b)  # type: ignore[arg-type]
    for chat in ("c1", "c2", "c3"):
        await mark_pending(store.db, db.id, chat, T1)
    for job in await queue.claim(T1, 10, 60.0):
        await queue.dead(job, "gone", T1 + 1)
    letters = await queue.dead_letters(10)
    assert sorted(d.chat for d in letters) == ["c1", "c2", "c3"]
    assert {(d.error, d.attempts, d.device) for d in letters} == {("gone", 1, db.id)}
    assert [d.id for d in letters] == sorted(d.id for d in letters)  # oldest first
    assert len(await queue.dead_letters(2)) == 2
    assert await queue.next_due() is None
    assert await queue.retry_dead([letters[0].id], T1 + 2) == 1
    assert [j.chat for j in await queue.claim(T1 + 2, 10, 60.0)] == [letters[0].chat]
    assert await queue.drop_dead(None) == 2
    assert await queue.dead_letters(10) == []
    # a revoked device loses its target and its jobs
    await store.push.set_target(db.id, FCM, T1)
    await mark_pending(store.db, db.id, "c9", T1)
    assert await store.accounts.revoke_device(b.id, db.id)
    assert await store.push.target_status(db.id) == (None, None)
    assert await queue.claim(FAR, 10, 60.0) == []


async def test_before_configure_no_grace_no_window_and_an_idle_job_expires_at_once(
    store: DynamoStore,
) -> None:
    """test_push_store.py's `test_before_configure_there_is_no_grace_and_no_window`, whose
    last step (the idle job gone at the next claim) is TTL's business here."""
    queue = DynamoPushQueue(store.db)  # never configured
    _, _, da, db, c = await pair(store)
    await send(store, c, da, T1)
    (job,) = await queue.claim(T1, 10, VIS)
    await queue.done(job, T1 + 10, pushed=True)
    later = await send(store, c, da, T1 + 20)
    rows = await support.job_rows(store)
    assert [(r[2], r[5]) for r in rows] == [(1, T1 + 20)]  # no window holds it
    (job,) = await queue.claim(T1 + 20, 10, VIS)
    assert job.last_iseq == iseq_of(later, db)  # no grace: an entry of now is covered
    await queue.done(job, T1 + 30, pushed=True)
    assert await queue.claim(T1 + 31, 10, VIS) == []
    item = await store.db.get(PUSH, key(f"P#{db.id}", f"J#{c.id}"))
    assert item is not None and int_of(item, "pending") == 0
    assert int_of(item, "expires") == expires_at(T1 + 30, 0) + 1  # TTL: its window is over
