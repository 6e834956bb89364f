"""`PushQueueStats.depth` (pigeon.ports), the read behind the push queue's gauges, on the
queue over each store's outbox table (`SqlitePushQueue`, `PgPushQueue`): pending jobs, those
due, the oldest due."""

from __future__ import annotations

from typing import cast

import msgspec

from pigeon.domain.push import PushTarget
from pigeon.ports import PushQueueDepth, PushQueueStats, Store
from tests.contract.test_push_store import queue_of
from tests.contract.test_store import T0, chat, device, send_req, user

T1 = T0 + 1_000_000
GRACE_MS = 1_000


async def test_depth_counts_pending_and_due_jobs_and_dates_the_oldest_due(store: Store) -> None:
    queue = queue_of(store)
    stats = cast(PushQueueStats, queue)
    await queue.configure(GRACE_MS / 1000, 30.0)
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    c1, c2 = await chat(store, a, b), await chat(store, a, b)
    await store.push.set_target(db.id, PushTarget(kind="fcm", token="t"), T0)
    none_due = PushQueueDepth(pending=0, due=0, oldest_due_at=None)
    assert await stats.depth(T1) == none_due

    await store.messages.send(msgspec.structs.replace(send_req(c1, da), at=T1))
    await store.messages.send(msgspec.structs.replace(send_req(c2, da), at=T1 + 500))
    assert await stats.depth(T1 + 999) == PushQueueDepth(pending=2, due=0, oldest_due_at=None)
    assert await stats.depth(T1 + 1_200) == PushQueueDepth(
        pending=2, due=1, oldest_due_at=T1 + GRACE_MS
    )
    now = T1 + 5_000
    assert await stats.depth(now) == PushQueueDepth(pending=2, due=2, oldest_due_at=T1 + GRACE_MS)

    (job, _) = await queue.claim(now, 10, 60.0)  # leased: pending, not due
    assert await stats.depth(now) == PushQueueDepth(pending=2, due=0, oldest_due_at=None)
    await queue.done(job, now, pushed=True)
    assert (await stats.depth(now)).pending == 1
