"""A committed change is pushed even when the command that made it is cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pigeon.adapters.bus.local import LocalBus
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.domain.limits import Limits
from pigeon.services import channels
from pigeon.services.clock import SystemClock
from pigeon.services.fanout import Fanout
from pigeon.services.messaging import MessagingService
from tests.contract.test_store import chat, device, user


async def test_push_survives_the_cancelled_sender(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "f.db", synchronous="NORMAL")
    await store.open()
    bus = LocalBus()
    messaging = MessagingService(store.messages, Fanout(bus), SystemClock(), Limits())
    a, b = await user(store, "a"), await user(store, "b")
    da, db = await device(store, a), await device(store, b)
    c = await chat(store, a, b)
    pushed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    await bus.subscribe(channels.device(db.id), pushed.set_result)

    sending = asyncio.create_task(messaging.send(da, c.id, "cmid-1", "hello", None))
    await asyncio.sleep(0)  # let it hand the send to the writer thread, then drop the caller
    sending.cancel()
    frame = await asyncio.wait_for(pushed, 5)
    assert b'"body":"hello"' in frame
    assert sending.cancelled()
    await store.aclose()
