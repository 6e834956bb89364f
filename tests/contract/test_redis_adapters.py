"""What the Redis adapters promise beyond the port contracts: cheap (batched) subscriptions, and
behaviour under faults: a server restarted, stopped or frozen under a RedisBus or a
RedisPresence, a cluster master restarted or a slot moved under a cluster RedisBus.

Outages must surface as `Unavailable` within the adapter's timeout (never a redis exception,
never a hang); afterwards the bus subscribes every live channel again by itself and then calls
its `on_recovered` callbacks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Collection
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from pigeon.adapters.bus.redis import RedisBus
from pigeon.adapters.presence.redis import RedisPresence
from pigeon.domain.errors import Unavailable
from tests.contract.test_bus import Inbox
from tests.support.redis import RedisCluster, RedisServer, cluster_ok, free_port, poll

TIMEOUT = 0.5  # the adapters' network timeout in these tests
FAST = {"timeout": TIMEOUT, "ping_interval": 0.3, "max_backoff": 0.2}


class FakeNow:
    """A clock that stands still (expiry plays no part here)."""

    def now_ms(self) -> int:
        return 1_000_000


class Recoveries:
    """An `on_recovered` callback a test can wait on, and the channels it was told of."""

    def __init__(self) -> None:
        self.count = 0
        self.lost: set[str] = set()
        self._event = asyncio.Event()

    def __call__(self, lost: Collection[str]) -> None:
        self.count += 1
        self.lost |= set(lost)
        self._event.set()

    async def wait(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._event.wait()
        self._event.clear()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    s = RedisServer(tmp_path / "redis")
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def bus(server: RedisServer) -> AsyncIterator[tuple[RedisBus, Recoveries]]:
    b = RedisBus(server.url, cluster=False, **FAST)
    recoveries = Recoveries()
    b.on_recovered(recoveries)
    await b.open()
    yield b, recoveries
    await b.aclose()


def channel() -> str:
    return f"d:{uuid.uuid4().hex}"


def command_calls(server: RedisServer, command: str) -> int:
    """How many times the server ran `command` (INFO commandstats)."""
    client = redis.Redis(host=server.host, port=server.port)
    try:
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    finally:
        client.close()
    return int(stats.get("calls", 0))


async def test_thousands_of_subscriptions_take_a_few_commands(
    server: RedisServer, bus: tuple[RedisBus, Recoveries]
) -> None:
    b, _ = bus
    channels = [channel() for _ in range(3000)]
    inbox = Inbox()
    subs = await asyncio.gather(*(b.subscribe(ch, inbox) for ch in channels))
    assert command_calls(server, "subscribe") <= 6  # SUBSCRIBE of up to 1000 channels each
    await b.publish_many([(ch, b"x") for ch in channels])
    await inbox.wait_for(len(channels))
    for sub in subs:
        sub.cancel()
    await b.subscribe(channels[0], inbox)  # waits until the UNSUBSCRIBEs before it are applied
    assert command_calls(server, "unsubscribe") <= 6


async def assert_unavailable_quickly(bus: RedisBus, ch: str) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await bus.publish(ch, b"lost")
    assert time.monotonic() - started < 3 * TIMEOUT


async def test_bus_recovers_from_a_server_restart(
    server: RedisServer, bus: tuple[RedisBus, Recoveries]
) -> None:
    b, recoveries = bus
    ch, inbox = channel(), Inbox()
    await b.subscribe(ch, inbox)
    await b.publish(ch, b"before")
    await inbox.wait_for(1)
    await server.stop()
    await assert_unavailable_quickly(b, ch)
    with pytest.raises(Unavailable):
        await b.publish_many([(ch, b"lost 1"), (channel(), b"lost 2")])
    await server.start()
    await recoveries.wait()  # resubscribed by itself, then told the node
    await b.publish(ch, b"after")
    assert await inbox.wait_for(2) == [b"before", b"after"]
    assert recoveries.count == 1 and recoveries.lost == {ch}  # the server's: every channel


async def test_subscribing_during_an_outage_goes_live_on_recovery(
    server: RedisServer, bus: tuple[RedisBus, Recoveries]
) -> None:
    b, recoveries = bus
    await server.stop()
    ch, inbox = channel(), Inbox()
    async with asyncio.timeout(2 * TIMEOUT):
        sub = await b.subscribe(ch, inbox)  # returns at once; live once Redis is back
    gone = await b.subscribe(channel(), inbox)
    gone.cancel()
    await server.start()
    await recoveries.wait()
    await b.publish(ch, b"hello")
    assert await inbox.wait_for(1) == [b"hello"]
    sub.cancel()


async def test_a_frozen_server_never_hangs_the_bus(
    server: RedisServer, bus: tuple[RedisBus, Recoveries]
) -> None:
    b, recoveries = bus
    ch, inbox = channel(), Inbox()
    await b.subscribe(ch, inbox)
    server.pause()  # connections stay open, nothing answers
    try:
        await assert_unavailable_quickly(b, ch)
        async with asyncio.timeout(5):  # the heartbeat notices, publishes then fail at once
            while True:
                with pytest.raises(Unavailable):
                    await b.publish(ch, b"lost")
                if not b._shards[""].listener.up:
                    break
                await asyncio.sleep(0.05)  # polling state we cannot wait on
        await assert_unavailable_quickly(b, ch)
    finally:
        server.resume()
    await recoveries.wait()
    await b.publish(ch, b"back")
    assert (await inbox.wait_until(b"back"))[-1] == b"back"


async def test_closing_during_an_outage_is_prompt(server: RedisServer) -> None:
    b = RedisBus(server.url, cluster=False, **FAST)
    await b.open()
    await b.subscribe(channel(), lambda frame: None)
    await server.stop()
    async with asyncio.timeout(2 * TIMEOUT):
        await b.aclose()
    with pytest.raises(Unavailable):
        await b.publish(channel(), b"closed")


async def test_opening_without_a_server_fails_fast() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for cluster in (False, True):
        b = RedisBus(url, cluster=cluster, **FAST)
        async with asyncio.timeout(6 * TIMEOUT):
            with pytest.raises(Unavailable):
                await b.open()
    p = RedisPresence(url, cluster=False, session_ttl=30, clock=FakeNow(), timeout=TIMEOUT)
    with pytest.raises(Unavailable):
        await p.open()


async def test_presence_fails_with_unavailable_and_recovers(server: RedisServer) -> None:
    p = RedisPresence(server.url, cluster=False, session_ttl=30, clock=FakeNow(), timeout=TIMEOUT)
    await p.open()
    try:
        assert await p.session_up("u", "s1")
        await server.stop()
        started = time.monotonic()
        for call in (
            p.session_up("u", "s2"),
            p.session_down("u", "s1", 5),
            p.confirm_offline("u"),
            p.lookup(["u"]),
            p.refresh([("u", "s1")]),
            p.reap(10**13),
        ):
            with pytest.raises(Unavailable):
                await call
        assert time.monotonic() - started < 6 * TIMEOUT
        await server.start()  # an empty server: its script cache is empty too
        assert await p.session_up("u", "s3")
        assert await p.session_down("u", "s3", 7)
        assert (await p.lookup(["u"]))["u"].last_seen == 7
    finally:
        await p.aclose()


# -- a cluster ---------------------------------------------------------------------------


@pytest.fixture
async def cluster_bus(redis_cluster: RedisCluster) -> AsyncIterator[tuple[RedisBus, Recoveries]]:
    b = RedisBus(redis_cluster.url, cluster=True, **FAST)
    recoveries = Recoveries()
    b.on_recovered(recoveries)
    await b.open()
    yield b, recoveries
    await b.aclose()


def owner_of(cluster: RedisCluster, slot: int) -> RedisServer:
    client = redis.Redis(host=cluster.nodes[0].host, port=cluster.nodes[0].port)
    try:
        for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(n for n in cluster.nodes if n.port == int(master[1]))
    finally:
        client.close()
    raise AssertionError(f"slot {slot} has no owner")


def empty_slot_channel(cluster: RedisCluster) -> str:
    """A channel whose slot holds no key: SETSLOT alone may move only an empty slot, and other
    tests of the session leave keys (presence) in the shared cluster."""
    while True:
        ch = channel()
        slot = key_slot(ch.encode())
        owner = owner_of(cluster, slot)
        client = redis.Redis(host=owner.host, port=owner.port)
        try:
            if client.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0:
                return ch
        finally:
            client.close()


def node_id(node: RedisServer) -> str:
    client = redis.Redis(host=node.host, port=node.port)
    try:
        return str(client.execute_command("CLUSTER MYID").decode())
    finally:
        client.close()


async def test_cluster_bus_recovers_from_a_master_restart(
    redis_cluster: RedisCluster, cluster_bus: tuple[RedisBus, Recoveries]
) -> None:
    b, recoveries = cluster_bus
    channels = [channel() for _ in range(30)]  # on every master
    inbox = Inbox()
    for ch in channels:
        await b.subscribe(ch, inbox)
    victim = owner_of(redis_cluster, key_slot(channels[0].encode()))
    try:
        await victim.restart()  # keeps its nodes.conf: same id, same slots
        await recoveries.wait()
    finally:
        await asyncio.to_thread(
            poll, lambda: all(cluster_ok(n) for n in redis_cluster.nodes), "cluster_state:ok"
        )
    await b.publish_many([(ch, ch.encode()) for ch in channels])
    assert sorted(await inbox.wait_for(len(channels))) == sorted(c.encode() for c in channels)
    # the node is told of the restarted master's channels, not of the others
    assert recoveries.lost == {
        c for c in channels if owner_of(redis_cluster, key_slot(c.encode())) is victim
    }


async def test_cluster_bus_follows_a_slot_to_its_new_master(
    redis_cluster: RedisCluster, cluster_bus: tuple[RedisBus, Recoveries]
) -> None:
    b, recoveries = cluster_bus
    ch, inbox = empty_slot_channel(redis_cluster), Inbox()
    await b.subscribe(ch, inbox)
    slot = key_slot(ch.encode())
    other = next(c for c in iter(channel, "") if key_slot(c.encode()) != slot)
    await b.subscribe(other, Inbox())
    source = owner_of(redis_cluster, slot)
    target = next(n for n in redis_cluster.nodes if n is not source)

    def move(to: RedisServer) -> None:  # an empty slot moves with SETSLOT alone
        for node in [to, *(n for n in redis_cluster.nodes if n is not to)]:
            client = redis.Redis(host=node.host, port=node.port)
            try:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", node_id(to))
            finally:
                client.close()

    move(target)
    stale = RedisBus(redis_cluster.url, cluster=True, **FAST)
    late, late_recoveries = RedisBus(redis_cluster.url, cluster=True, **FAST), Recoveries()
    late.on_recovered(late_recoveries)
    try:
        # The old master dropped the channel (sunsubscribe): the bus re-read the slot map and
        # subscribed on the new master, then told the node.
        await live_on(b, ch, target, recoveries)
        assert recoveries.lost == {ch}  # the moved slot's channels only: those resync
        await b.publish(ch, b"moved")
        assert await inbox.wait_for(1) == [b"moved"]
        await stale.open()  # both know the slot on `target`
        await late.open()
    finally:
        move(source)
    try:
        await live_on(b, ch, source, recoveries)  # `b` follows the slot back
        reads = stale.slot_reads
        # a stale map meets MOVED, re-reads it, retries: publishes in flight share one read
        await asyncio.gather(*(stale.publish(ch, b"back") for _ in range(10)))
        assert await inbox.wait_for(11) == [b"moved", *[b"back"] * 10]
        assert stale.slot_reads == reads + 1
        # a subscribe on a stale map is refused (MOVED): the bus re-reads the map, subscribes
        # where the slot lives, and tells the node of the channel
        late_inbox = Inbox()
        await late.subscribe(ch, late_inbox)
        await live_on(late, ch, source, late_recoveries)
        assert late_recoveries.lost == {ch}
        await b.publish(ch, b"late")
        assert await late_inbox.wait_for(1) == [b"late"]
    finally:
        await stale.aclose()
        await late.aclose()


async def live_on(bus: RedisBus, ch: str, node: RedisServer, recoveries: Recoveries) -> None:
    """Wait until `ch` is subscribed on `node`: each move ends with an `on_recovered` call, so
    check after each (an earlier call may still be pending)."""
    while True:
        await recoveries.wait()
        shard = bus._homes.get(ch)
        if shard is not None and shard is bus._shards.get(node.address):
            barrier = shard.listener.barrier()  # every change so far is applied
            if barrier is not None and await barrier:
                return


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_presence_loads_scripts_a_server_lost(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    nodes: list[RedisServer]
    own: RedisServer | None = None
    if kind == "redis":
        own = RedisServer(tmp_path / "redis")
        await own.start()
        nodes, url = [own], own.url
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        nodes, url = cluster.nodes, cluster.url
    p = RedisPresence(
        url,
        cluster=kind == "redis-cluster",
        session_ttl=30,
        clock=FakeNow(),
        timeout=TIMEOUT,
        retain=60,
        prefix=f"test-{uuid.uuid4().hex}",
    )
    await p.open()
    try:
        for node in nodes:  # a restart or failover empties the script cache
            client = redis.Redis(host=node.host, port=node.port)
            try:
                client.script_flush()
            finally:
                client.close()
        users = [f"u{i}" for i in range(20)]  # on every master
        for user in users:
            assert await p.session_up(user, "s")
        await p.refresh([(user, "s") for user in users])
        assert sorted(await p.reap(10**13)) == sorted(users)
    finally:
        await p.aclose()
        if own is not None:
            await own.close()
