"""Sends of one device commit in the order they were issued, also when a media send must first
check its attachment (an await before the commit), and a cancelled send commits nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from pigeon.adapters.ratelimit.local import SlidingWindows
from pigeon.domain.ids import new_id
from pigeon.domain.limits import Limits, Rate, RateRules, Spend
from pigeon.domain.models import Attachment, Device
from pigeon.services.messaging import MessagingService
from pigeon.services.throttle import Throttle


class _Store:
    """Records the order in which sends reach the store."""

    def __init__(self) -> None:
        self.committed: list[str] = []

    async def send(self, req: Any) -> Any:
        self.committed.append(req.cmid)
        message = SimpleNamespace(id=req.message_id)
        return SimpleNamespace(message=message, duplicate=False, deliveries=[])


class _Fanout:
    def start(self, change: Any, deliveries: Any) -> Any:
        return asyncio.ensure_future(change)


class _Media:
    """An attachment check that takes as long as the test wants."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def for_message(self, device: Device, chat: str, attachment: str) -> Attachment:
        await self.gate.wait()
        return Attachment(id=attachment, content_type="image/png")


class _Clock:
    def now_ms(self) -> int:
        return 0


def _service() -> tuple[MessagingService, _Store, _Media]:
    store, media = _Store(), _Media()
    service = MessagingService(store, _Fanout(), _Clock(), Limits(), media)  # type: ignore[arg-type]
    return service, store, media


DEVICE = Device(id=new_id(), user_id=new_id(), name="d", created_at=0)


async def test_a_text_behind_a_media_send_waits_for_it() -> None:
    service, store, media = _service()
    chat = new_id()
    first = asyncio.create_task(service.send(DEVICE, chat, "media", None, new_id()))
    await asyncio.sleep(0)  # one loop turn: the media send starts its check
    second = asyncio.create_task(service.send(DEVICE, chat, "text", "hi", None))
    await asyncio.sleep(0)
    assert store.committed == []  # the text waits behind the media check
    media.gate.set()
    await asyncio.gather(first, second)
    assert store.committed == ["media", "text"]
    third = await service.send(DEVICE, chat, "later", "hi", None)  # fast path again
    assert third and store.committed[-1] == "later" and not service._handovers


async def test_cancelled_sends_commit_nothing_and_leave_no_chain() -> None:
    service, store, _ = _service()
    chat = new_id()
    first = asyncio.create_task(service.send(DEVICE, chat, "media", None, new_id()))
    await asyncio.sleep(0)
    second = asyncio.create_task(service.send(DEVICE, chat, "text", "hi", None))
    await asyncio.sleep(0)
    first.cancel()
    second.cancel()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert store.committed == [] and not service._handovers


class _SlowFirstLimiter:
    """The real counters (in process), whose first answer takes as long as the test wants (a
    Redis round trip slower than the next ones)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self._called = asyncio.Event()
        self.windows = SlidingWindows()

    async def hit(
        self, rate: Rate, key: str, cost: int = 1, *, deferred: bool = False
    ) -> float | None:
        return await self.hit_all(((rate, key, cost),))

    async def hit_all(self, spends: Sequence[Spend], *, deferred: bool = False) -> float | None:
        self.calls += 1
        self._called.set()
        if self.calls == 1:
            await self.gate.wait()
        return self.windows.hit_all(spends)

    async def until(self, calls: int) -> None:
        """Until `calls` hits were asked for."""
        async with asyncio.timeout(5):
            while self.calls < calls:
                self._called.clear()
                await self._called.wait()


def _throttled(store: _Store) -> tuple[MessagingService, _SlowFirstLimiter]:
    limiter = _SlowFirstLimiter()
    throttle = Throttle(limiter, RateRules())  # type: ignore[arg-type]
    service = MessagingService(store, _Fanout(), _Clock(), Limits(), _Media(), throttle)  # type: ignore[arg-type]
    return service, limiter


async def test_a_slow_rate_limit_answer_does_not_reorder_sends() -> None:
    store = _Store()
    service, limiter = _throttled(store)
    chat = new_id()
    first = asyncio.create_task(service.send(DEVICE, chat, "first", "a", None))
    await limiter.until(1)  # the first waits for its first answer
    second = asyncio.create_task(service.send(DEVICE, chat, "second", "b", None))
    await limiter.until(2)  # the second's checks (device, user, bytes: one call) were answered
    assert store.committed == []  # but it waits for the first
    limiter.gate.set()
    await asyncio.gather(first, second)
    assert store.committed == ["first", "second"] and not service._handovers


async def test_a_send_that_learns_a_chats_fanout_never_waits_for_one_behind_it() -> None:
    """The first answer of the limiter is slow: the second send's checks pass first, but the
    fan-out reservation (which may wait for the send that tells a new chat's fan-out) is made
    in the order the sends reach the store, so neither waits for the other."""
    store = _Store()
    service, limiter = _throttled(store)
    chat = new_id()
    first = asyncio.create_task(service.send(DEVICE, chat, "first", "a", None))
    await limiter.until(1)
    second = asyncio.create_task(service.send(DEVICE, chat, "second", "b", None))
    await limiter.until(2)
    limiter.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1.0)  # the learning wait is 2 s
    assert store.committed == ["first", "second"]
