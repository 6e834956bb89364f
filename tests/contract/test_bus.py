"""Contract of the Bus port (pigeon.ports.Bus), for every adapter: in-process, one Redis server,
and a Redis Cluster (sharded pub/sub). Channel names are unique per test: the Redis is shared."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.crc import key_slot

from pigeon.adapters.bus.local import LocalBus
from pigeon.adapters.bus.redis import RedisBus
from pigeon.ports import Bus

BUSES = ["local", "redis", "redis-cluster"]
TIMEOUT = 5.0


@pytest.fixture(params=BUSES)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """An open bus of each adapter."""
    b: Bus
    if request.param == "local":
        b = LocalBus()
    elif request.param == "redis":
        b = RedisBus(request.getfixturevalue("redis_url"), cluster=False)
    else:
        b = RedisBus(request.getfixturevalue("redis_cluster").url, cluster=True)
    await b.open()
    yield b
    await b.aclose()


def channel(kind: str = "t") -> str:
    return f"{kind}:{uuid.uuid4().hex}"


class Inbox:
    """A handler that records frames and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._changed = asyncio.Event()

    def __call__(self, frame: bytes) -> None:
        self.frames.append(frame)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while len(self.frames) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.frames

    async def wait_until(self, frame: bytes, timeout: float = TIMEOUT) -> list[bytes]:
        """Wait until `frame` arrived (frames behind it on the channel have arrived too)."""
        async with asyncio.timeout(timeout):
            while frame not in self.frames:
                self._changed.clear()
                await self._changed.wait()
        return self.frames


async def test_publish_reaches_the_subscriber(bus: Bus) -> None:
    ch, inbox = channel(), Inbox()
    await bus.subscribe(ch, inbox)
    await bus.publish(ch, b"hello")
    assert await inbox.wait_for(1) == [b"hello"]


async def test_frames_of_one_publisher_arrive_in_order(bus: Bus) -> None:
    ch, inbox = channel(), Inbox()
    await bus.subscribe(ch, inbox)
    sequential = [f"s{i}".encode() for i in range(50)]
    for frame in sequential:
        await bus.publish(ch, frame)
    concurrent = [f"c{i}".encode() for i in range(200)]  # issued in this order, not awaited
    await asyncio.gather(*(bus.publish(ch, frame) for frame in concurrent))
    assert await inbox.wait_for(250) == sequential + concurrent


async def test_publish_many_keeps_order_per_channel(bus: Bus) -> None:
    channels = [channel() for _ in range(5)]
    inboxes = [Inbox() for _ in channels]
    for ch, inbox in zip(channels, inboxes, strict=True):
        await bus.subscribe(ch, inbox)
    items = [(channels[i % 5], f"{i}".encode()) for i in range(500)]
    await bus.publish_many(items)
    for k, inbox in enumerate(inboxes):
        assert await inbox.wait_for(100) == [f"{i}".encode() for i in range(k, 500, 5)]


async def test_a_new_subscription_replaces_the_old_handler(bus: Bus) -> None:
    ch, first, second = channel(), Inbox(), Inbox()
    old = await bus.subscribe(ch, first)
    await bus.subscribe(ch, second)
    await bus.publish(ch, b"one")
    assert await second.wait_for(1) == [b"one"]
    old.cancel()  # cancelling the replaced subscription leaves the new one alone
    await bus.publish(ch, b"two")
    assert await second.wait_for(2) == [b"one", b"two"]
    assert first.frames == []


async def test_cancel_stops_delivery(bus: Bus) -> None:
    ch, before, after = channel(), Inbox(), Inbox()
    sub = await bus.subscribe(ch, before)
    await bus.publish(ch, b"kept")
    await before.wait_for(1)
    sub.cancel()
    await bus.publish(ch, b"dropped")
    await bus.subscribe(ch, after)
    await bus.publish(ch, b"marker")
    # "marker" was published after "dropped": once it arrived, "dropped" had its chance.
    assert (await after.wait_until(b"marker"))[-1] == b"marker"
    assert before.frames == [b"kept"]


async def test_cancel_is_idempotent(bus: Bus) -> None:
    ch, inbox = channel(), Inbox()
    sub = await bus.subscribe(ch, inbox)
    sub.cancel()
    sub.cancel()
    again = await bus.subscribe(ch, inbox)
    sub.cancel()  # the old subscription's cancel must not end the new one
    await bus.publish(ch, b"still here")
    assert await inbox.wait_for(1) == [b"still here"]
    again.cancel()
    again.cancel()


async def test_local_first_frames_go_to_this_node_only(
    bus: Bus, request: pytest.FixtureRequest
) -> None:
    """A device's deliveries: its connection here gets them at once, and no other node (a
    node still subscribed from an older connection) does; channels not subscribed here are
    published as usual."""
    here, there, elsewhere = Inbox(), Inbox(), Inbox()
    mine, theirs = channel("d"), channel("d")
    if request.node.callspec.params["bus"] == "local":
        other: Bus = bus  # one process, one node
    else:
        other = RedisBus(
            request.getfixturevalue("redis_url")
            if request.node.callspec.params["bus"] == "redis"
            else request.getfixturevalue("redis_cluster").url,
            cluster=request.node.callspec.params["bus"] == "redis-cluster",
        )
        await other.open()
    try:
        await bus.subscribe(mine, here)
        if other is not bus:
            await other.subscribe(mine, elsewhere)
        await other.subscribe(theirs, there)
        await bus.publish_many([(mine, b"1"), (theirs, b"2"), (mine, b"3")], local_first=True)
        assert here.frames == [b"1", b"3"]  # handed over before the call returned
        await there.wait_for(1)
        assert there.frames == [b"2"]
        await bus.publish(theirs, b"end")  # after the frames above, on the same path
        await there.wait_until(b"end")
        assert elsewhere.frames == []
    finally:
        if other is not bus:
            await other.aclose()


async def test_frames_to_nobody_are_dropped(bus: Bus) -> None:
    ch, inbox = channel(), Inbox()
    await bus.publish(ch, b"into the void")  # no error
    await bus.publish_many([(ch, b"void 2"), (channel(), b"void 3")])
    await bus.subscribe(ch, inbox)
    await bus.publish(ch, b"heard")
    assert await inbox.wait_for(1) == [b"heard"]


async def test_frames_are_bytes_exactly(bus: Bus) -> None:
    ch, inbox = channel(), Inbox()
    await bus.subscribe(ch, inbox)
    frames = [
        bytes(range(256)),
        b"",
        b"\r\n*3\r\n$7\r\nmessage\r\n",
        "héllo ✓".encode(),
        b"x" * 1_000_000,
    ]
    await bus.publish_many([(ch, f) for f in frames])
    got = await inbox.wait_for(len(frames))
    assert got == frames
    assert all(type(f) is bytes for f in got)


async def test_a_broken_handler_does_not_stop_delivery(bus: Bus) -> None:
    bad, good, inbox = channel(), channel(), Inbox()

    def explode(frame: bytes) -> None:
        raise RuntimeError("handler bug")

    await bus.subscribe(bad, explode)
    await bus.subscribe(good, inbox)
    await bus.publish(bad, b"boom")
    await bus.publish(good, b"fine")
    assert await inbox.wait_for(1) == [b"fine"]


async def test_many_channels_across_every_shard(bus: Bus) -> None:
    channels = [channel("d") for _ in range(3000)]
    slots = {key_slot(c.encode()) for c in channels}
    # A 3-master cluster splits the slots in thirds: these channels hit every master.
    assert min(slots) < 5461 and max(slots) > 10922 and any(5461 <= s <= 10922 for s in slots)
    inbox = Inbox()
    subs = await asyncio.gather(*(bus.subscribe(c, inbox) for c in channels))
    await bus.publish_many([(c, c.encode()) for c in channels])
    assert sorted(await inbox.wait_for(len(channels))) == sorted(c.encode() for c in channels)
    for sub in subs[::2]:
        sub.cancel()
    await bus.publish_many([(c, b"again") for c in channels])
    assert (await inbox.wait_for(len(channels) + 1500))[len(channels) :] == [b"again"] * 1500
