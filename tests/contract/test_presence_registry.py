"""Contract of the Presence port (pigeon.ports.Presence), for every registry adapter: in-process,
one Redis server and a Redis Cluster. Each test's Redis registries use their own key prefix
(the Redis is shared), and a clock the test moves by hand."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from pigeon.adapters.presence.local import LocalPresence
from pigeon.adapters.presence.redis import RedisPresence
from pigeon.domain.models import PresenceRecord
from pigeon.ports import Presence

REGISTRIES = ["local", "redis", "redis-cluster"]
SHARED = ["redis", "redis-cluster"]  # registries with expiring sessions
TTL = 30.0  # seconds
TTL_MS = int(TTL * 1000)


class FakeClock:
    """Milliseconds that move only when the test says so."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def now_ms(self) -> int:
        return self.now


Factory = Callable[[], Presence]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def _registries(
    kind: str, request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[Factory]:
    """Registries of one kind sharing one state (several "nodes"); all closed at the end."""
    prefix = f"test-{uuid.uuid4().hex}"
    made: list[Presence] = []
    url = ""
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    elif kind == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url
    shared = LocalPresence()

    def make() -> Presence:
        r: Presence
        if kind == "local":
            r = shared  # one process: every "node" is the same registry
        else:
            r = RedisPresence(
                url,
                cluster=kind == "redis-cluster",
                session_ttl=TTL,
                clock=clock,
                retain=600,  # what a test leaves behind on the shared server expires soon
                prefix=prefix,
            )
        made.append(r)
        return r

    yield make
    for r in made:
        await r.aclose()


@pytest.fixture(params=REGISTRIES)
async def make_registry(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Factory]:
    async for factory in _registries(request.param, request, clock):
        yield factory


@pytest.fixture(params=SHARED)
async def make_shared(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Factory]:
    """Registries shared by several nodes, whose sessions expire (Redis)."""
    async for factory in _registries(request.param, request, clock):
        yield factory


@pytest.fixture
async def registry(make_registry: Factory) -> Presence:
    r = make_registry()
    await r.open()
    return r


@pytest.fixture
async def shared(make_shared: Factory) -> Presence:
    r = make_shared()
    await r.open()
    return r


async def test_first_session_announces_and_last_one_leaves(registry: Presence) -> None:
    assert await registry.session_up("u", "s1")
    assert not await registry.session_up("u", "s2")  # already announced online
    assert not await registry.session_down("u", "s1", 10)  # s2 still live
    assert await registry.session_down("u", "s2", 20)
    assert await registry.lookup(["u"]) == {"u": PresenceRecord(online=True, last_seen=20)}
    assert await registry.confirm_offline("u") == PresenceRecord(online=False, last_seen=20)
    assert await registry.confirm_offline("u") is None  # announced once
    assert await registry.lookup(["u", "nobody"]) == {
        "u": PresenceRecord(online=False, last_seen=20)
    }


async def test_reconnect_within_grace_is_not_a_change(registry: Presence) -> None:
    assert await registry.session_up("u", "s1")
    assert await registry.session_down("u", "s1", 5)
    assert not await registry.session_up("u", "s2")  # never announced offline
    assert await registry.confirm_offline("u") is None  # grace timer fires: still online


async def test_unknown_sessions_are_ignored(registry: Presence) -> None:
    assert not await registry.session_down("u", "ghost", 1)
    await registry.session_up("u", "s1")
    assert not await registry.session_down("u", "ghost", 1)
    assert (await registry.lookup(["u"]))["u"].online


async def test_a_new_user_is_unknown_until_a_session(registry: Presence) -> None:
    assert await registry.lookup([]) == {}
    assert await registry.lookup(["new"]) == {}
    assert await registry.confirm_offline("new") is None
    await registry.session_up("new", "s")
    assert await registry.lookup(["new"]) == {"new": PresenceRecord(online=True, last_seen=None)}


async def test_local_registry_has_nothing_to_reap() -> None:
    r = LocalPresence()
    await r.session_up("u", "s")
    await r.refresh([("u", "s")])
    assert await r.reap(10**15) == []
    assert (await r.lookup(["u"]))["u"].online


async def test_a_refreshed_session_stays_an_abandoned_one_is_reaped(
    shared: Presence, clock: FakeClock
) -> None:
    start = clock.now
    await shared.session_up("kept", "k1")
    await shared.session_up("left", "l1")
    await shared.session_up("left", "l2")
    clock.now = start + 10_000
    await shared.refresh([("kept", "k1"), ("left", "l2")])  # l1's node died
    clock.now = start + 20_000
    await shared.refresh([("kept", "k1")])  # and now l2's too
    assert await shared.reap(start + TTL_MS - 1) == []  # nothing expired yet
    assert await shared.reap(start + TTL_MS) == []  # l1 expired, but l2 is still there
    assert await shared.reap(start + 10_000 + TTL_MS) == ["left"]  # l2 expired: user gone
    assert await shared.reap(start + 10_000 + TTL_MS) == []  # reported once
    # Like session_down: still announced online, last seen = l2's last refresh.
    assert await shared.lookup(["left", "kept"]) == {
        "left": PresenceRecord(online=True, last_seen=start + 10_000),
        "kept": PresenceRecord(online=True, last_seen=None),
    }
    assert await shared.confirm_offline("left") == PresenceRecord(
        online=False, last_seen=start + 10_000
    )
    assert not await shared.session_down("left", "l2", start)  # reaped: already gone
    assert await shared.confirm_offline("kept") is None


async def test_refresh_does_not_revive_a_session(shared: Presence, clock: FakeClock) -> None:
    await shared.session_up("u", "s")
    assert await shared.session_down("u", "s", clock.now)
    lost = await shared.refresh([("u", "s"), ("stranger", "x")])
    assert lost == [("u", "s"), ("stranger", "x")]  # reported, not brought back
    assert await shared.lookup(["stranger"]) == {}
    # Nobody confirmed u offline (its node died in the grace period?): a reaper offers it.
    assert await shared.reap(clock.now + 10 * TTL_MS) == ["u"]
    assert await shared.confirm_offline("u") == PresenceRecord(online=False, last_seen=clock.now)


async def test_a_user_whose_confirmation_failed_is_offered_again(
    shared: Presence, clock: FakeClock
) -> None:
    await shared.session_up("u", "s")
    start = clock.now
    assert await shared.reap(start + TTL_MS) == ["u"]  # the caller then fails to confirm
    assert await shared.reap(start + TTL_MS + 1) == []  # not at once
    assert await shared.reap(start + 2 * TTL_MS) == ["u"]  # but a TTL later
    assert await shared.confirm_offline("u") is not None


async def test_a_session_refreshed_while_it_is_reaped_stays(
    shared: Presence, clock: FakeClock
) -> None:
    start = clock.now
    await shared.session_up("u", "s")
    clock.now = start + TTL_MS  # the heartbeat is late, but it comes before the reaper
    await shared.refresh([("u", "s")])
    assert await shared.reap(start + TTL_MS) == []
    assert await shared.reap(start + 2 * TTL_MS - 1) == []
    assert await shared.reap(start + 2 * TTL_MS) == ["u"]


async def test_concurrent_reapers_report_each_user_once(
    make_shared: Factory, clock: FakeClock
) -> None:
    nodes = [make_shared() for _ in range(3)]
    for node in nodes:
        await node.open()
    users = [f"user{i}" for i in range(300)]
    for i, user in enumerate(users):
        await nodes[i % 3].session_up(user, f"{user}-a")
        if i % 2:
            await nodes[(i + 1) % 3].session_up(user, f"{user}-b")
    now = clock.now + TTL_MS
    reaped = await asyncio.gather(*(node.reap(now) for node in nodes))
    everyone = [user for batch in reaped for user in batch]
    assert sorted(everyone) == sorted(users)
    assert await nodes[0].reap(now) == []


async def test_keys_expire_when_the_user_is_gone(
    shared: Presence, request: pytest.FixtureRequest
) -> None:
    registry = shared
    assert isinstance(registry, RedisPresence)
    if "redis-cluster" in request.node.name:
        client = aioredis.RedisCluster.from_url(request.getfixturevalue("redis_cluster").url)
    else:
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    state, sessions = registry._keys("u")
    try:
        await registry.session_up("u", "s")
        ttls = [await client.pttl(key) for key in (state, sessions, registry._index)]
        assert all(0 < ttl <= 600_000 for ttl in ttls)
        await registry.session_down("u", "s", 5)
        # The state (last seen) stays for `retain`; no empty hash is left behind; the index
        # holds only the pending confirmation, and expires too.
        ttls = [await client.pttl(key) for key in (state, sessions, registry._index)]
        assert 0 < ttls[0] <= 600_000 and ttls[1] == -2 and 0 < ttls[2] <= 600_000
        assert await client.zrange(registry._index, 0, -1) == [b"u|"]
    finally:
        await client.aclose()
