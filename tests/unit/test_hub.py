"""The hub under bus latency: device replacement never leaves two live connections of a device
on one node, and a late control frame of an older connection never closes a newer one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from pigeon.config import GatewaySettings
from pigeon.domain.models import Device
from pigeon.gateway.connection import Connection
from pigeon.gateway.hub import Hub
from pigeon.services import channels


class _Sub:
    def __init__(self, bus: SlowBus, channel: str, handler: Callable[[bytes], None]) -> None:
        self.bus, self.channel, self.handler = bus, channel, handler

    def cancel(self) -> None:
        self.bus.subs.get(self.channel, set()).discard(self)


class SlowBus:
    """Many subscribers per channel (several nodes on Redis); every call takes a round trip,
    publishes to a channel in `slow` take longer (a hiccup)."""

    def __init__(self) -> None:
        self.subs: dict[str, set[_Sub]] = {}
        self.slow: dict[str, float] = {}

    async def publish(self, channel: str, frame: bytes) -> None:
        await asyncio.sleep(self.slow.pop(channel, 0.005))  # the simulated round trip
        for sub in list(self.subs.get(channel, ())):
            sub.handler(frame)

    async def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> _Sub:
        await asyncio.sleep(0.005)  # the simulated round trip
        sub = _Sub(self, channel, handler)
        self.subs.setdefault(channel, set()).add(sub)
        return sub

    def on_recovered(self, callback: Callable[[Collection[str]], None]) -> None:
        return None


class _Transport:
    closed: int | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed = code

    async def ping(self) -> None:
        return None

    def ping_now(self) -> bool:
        return True

    async def send_texts(self, frames: list[bytes]) -> None:
        return None

    def write_now(self, frames: list[bytes]) -> bool:
        return True


DEVICE = Device(id="01J0000000000000000000000D", user_id="U", name="d", created_at=0)


async def _nothing() -> None:
    return None


def _conn() -> Connection:
    return Connection(_Transport(), DEVICE, 64)  # type: ignore[arg-type]


async def test_concurrent_attaches_of_one_device_leave_one_connection() -> None:
    bus = SlowBus()
    hub = Hub(bus, GatewaySettings())  # type: ignore[arg-type]
    first, second = _conn(), _conn()
    await asyncio.gather(hub.attach(first, _nothing), hub.attach(second, _nothing))
    assert (first.closing, second.closing) == (True, False)
    assert hub.get(DEVICE.id) is second
    assert len(bus.subs[channels.device(DEVICE.id)]) == 1
    second.close(1000, "bye")
    assert not bus.subs[channels.device(DEVICE.id)]


async def test_a_late_announcement_of_an_older_connection_closes_nothing() -> None:
    bus = SlowBus()
    node_a, node_b = Hub(bus, GatewaySettings()), Hub(bus, GatewaySettings())  # type: ignore[arg-type]
    old, new = _conn(), _conn()
    bus.slow[channels.device(DEVICE.id)] = 0.1  # node A's announcement is slow
    slow_attach = asyncio.create_task(node_a.attach(old, _nothing))
    await asyncio.sleep(0)  # one loop turn: A starts its attach (and takes its stamp) first
    await node_b.attach(new, _nothing)
    await slow_attach
    assert not new.closing  # A's late frame carries an older stamp

    newest = _conn()
    await node_a.attach(newest, _nothing)  # a newer connection on A closes the one on B
    assert new.closing and not newest.closing


async def test_a_device_that_moves_node_is_resynced_on_the_new_one() -> None:
    """Node A handed its deliveries to the old connection only (`local_first`) until it left:
    the connection on node B catches up from the inbox once A says so."""
    bus = SlowBus()
    node_a, node_b = Hub(bus, GatewaySettings()), Hub(bus, GatewaySettings())  # type: ignore[arg-type]
    resynced = asyncio.Event()

    async def resync() -> None:
        resynced.set()

    old, new = _conn(), _conn()
    await node_a.attach(old, _nothing)
    await node_b.attach(new, resync)  # its announcement closes the old connection on A
    assert old.closing
    await asyncio.wait_for(resynced.wait(), 5)
    assert not new.closing


async def test_a_device_replaced_on_its_node_is_not_resynced() -> None:
    bus = SlowBus()
    hub = Hub(bus, GatewaySettings())  # type: ignore[arg-type]
    published: list[bytes] = []
    announced = asyncio.Event()
    sent = bus.publish

    async def spy(channel: str, frame: bytes) -> None:
        published.append(frame)
        if b"_resync" in frame:
            announced.set()
        await sent(channel, frame)

    bus.publish = spy  # type: ignore[method-assign]
    resyncs = 0

    async def resync() -> None:
        nonlocal resyncs
        resyncs += 1

    first, second = _conn(), _conn()
    await hub.attach(first, _nothing)
    await hub.attach(second, resync)
    assert first.closing
    second.close(1000, "bye")  # leaves the node: now it is announced
    await asyncio.wait_for(announced.wait(), 5)
    assert resyncs == 0
    assert sum(b"_resync" in f for f in published) == 1
