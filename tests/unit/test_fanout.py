"""A committed change is pushed even when the command that made it is cancelled, and again
when its publish failed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pigeon.adapters.bus.local import LocalBus
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.domain.errors import Unavailable
from pigeon.domain.events import Delivery
from pigeon.domain.limits import Limits
from pigeon.services import channels
from pigeon.services import fanout as fanout_module
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


class _FlakyBus(LocalBus):
    """The in-process bus, whose publishes fail while `down` (a Redis outage as seen by the
    publishing node only: subscribers keep their subscriptions)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.attempts = 0
        self.retried = asyncio.Event()

    async def publish_many(
        self, items: list[tuple[str, bytes]], *, local_first: bool = False
    ) -> None:
        self.attempts += 1
        if self.down:
            if self.attempts >= 3:
                self.retried.set()
            raise Unavailable("bus down")
        await super().publish_many(items)


class _Device:
    """Device D's live frames on the bus, and an event once `expected` of them came."""

    def __init__(self, expected: int) -> None:
        self.got: list[bytes] = []
        self.arrived = asyncio.Event()
        self._expected = expected

    def __call__(self, frame: bytes) -> None:
        self.got.append(frame)
        if len(self.got) == self._expected:
            self.arrived.set()

    def iseqs(self) -> list[bytes]:
        return [f.split(b'"iseq":')[1][:1] for f in self.got]


async def test_frames_whose_publish_failed_are_published_again() -> None:
    bus = _FlakyBus()
    fanout = Fanout(bus, retry_delays=(0.0,) * 20)
    device = _Device(2)
    await bus.subscribe(channels.device("D"), device)
    await fanout.push([Delivery("D", 1, b'{"a":1}'), Delivery("D", 2, b'{"a":2}')])
    assert device.got == [] and bus.attempts == 1
    await asyncio.wait_for(bus.retried.wait(), 5)  # the retrier tried again, and failed
    bus.down = False
    await asyncio.wait_for(device.arrived.wait(), 5)
    assert device.iseqs() == [b"1", b"2"]  # in order, once
    await fanout.aclose()


async def test_a_full_hold_drops_its_oldest_frames_and_an_outage_logs_little(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fanout_module, "MAX_HELD", 3)
    bus = _FlakyBus()
    fanout = Fanout(bus, retry_delays=(0.0,) * 20)
    device = _Device(3)
    await bus.subscribe(channels.device("D"), device)
    await fanout.push([Delivery("D", i, b'{"a":%d}' % i) for i in range(1, 6)])
    await fanout.push([Delivery("D", 6, b'{"a":6}')])  # each failed push used to log its drops
    await asyncio.wait_for(bus.retried.wait(), 5)
    bus.down = False
    await asyncio.wait_for(device.arrived.wait(), 5)
    assert device.iseqs() == [b"4", b"5", b"6"]  # the newest, in order
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [  # not a line per failed push (thousands a second in an outage)
        "push of 5 frames failed (inbox keeps them): bus down",
        "dropped 3 held frames (their inboxes keep them)",
    ]
    await fanout.aclose()
