"""`PushQueueStats.depth` (pigeon.ports), the read behind the push queue's gauges, on the
embedded queue (the only one that offers it yet): pending jobs, those due, the oldest due."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.adapters.store.sqlite.push import SqlitePushQueue
from pigeon.domain.push import PushTarget
from pigeon.ports import PushQueueDepth
from tests.contract.test_store import T0, chat, device, send_req, user

T1 = T0 + 1_000_000
GRACE_MS = 1_000


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "pigeon.db")
    await s.open()
    yield s
    await s.aclose()


async def test_depth_counts_pending_and_due_jobs_and_dates_the_oldest_due(
    store: SqliteStore,
) -> None:
    queue = SqlitePushQueue(store.db)
    await queue.configure(GRACE_MS / 1000, 30.0)
    a, b = await user(store, "alice"), await user(store, "bob")
    da, db = await device(store, a), await device(store, b)
    c1, c2 = await chat(store, a, b), await chat(store, a, b)
    await store.push.set_target(db.id, PushTarget(kind="fcm", token="t"), T0)
    none_due = PushQueueDepth(pending=0, due=0, oldest_due_at=None)
    assert await queue.depth(T1) == none_due

    await store.messages.send(msgspec.structs.replace(send_req(c1, da), at=T1))
    await store.messages.send(msgspec.structs.replace(send_req(c2, da), at=T1 + 500))
    assert await queue.depth(T1 + 999) == PushQueueDepth(pending=2, due=0, oldest_due_at=None)
    assert await queue.depth(T1 + 1_200) == PushQueueDepth(
        pending=2, due=1, oldest_due_at=T1 + GRACE_MS
    )
    now = T1 + 5_000
    assert await queue.depth(now) == PushQueueDepth(pending=2, due=2, oldest_due_at=T1 + GRACE_MS)

    (job, _) = await queue.claim(now, 10, 60.0)  # leased: pending, not due
    assert await queue.depth(now) == PushQueueDepth(pending=2, due=0, oldest_due_at=None)
    await queue.done(job, now, pushed=True)
    assert (await queue.depth(now)).pending == 1
