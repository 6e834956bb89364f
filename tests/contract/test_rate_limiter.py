"""The RateLimiter port on every backing: in-process, one Redis, a Redis Cluster. Two limiters
on one Redis stand for two nodes of a cluster: they share every counter."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from pigeon.adapters.ratelimit.windows import WindowRateLimiter
from pigeon.domain.limits import Rate, RateRules
from pigeon.domain.models import Device
from pigeon.services.throttle import Throttle
from tests.support.redis import RedisServer

Factory = Callable[[], WindowRateLimiter]


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def limiters(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Makes limiters on one backing (in-process ones share nothing, so one per test)."""
    made: list[WindowRateLimiter] = []
    if request.param == "memory":
        shared = WindowRateLimiter()
        await shared.open()
        made.append(shared)

        def factory() -> WindowRateLimiter:
            return shared

    else:
        cluster = request.param == "redis-cluster"
        url = (
            request.getfixturevalue("redis_cluster").url
            if cluster
            else request.getfixturevalue("redis_url")
        )
        prefix = f"t{uuid.uuid4().hex[:8]}"

        def factory() -> WindowRateLimiter:
            # A generous timeout: these tests check the counting, not the fail-open path (tested
            # below), and a busy CI machine can take over 250 ms for a cluster's first call.
            limiter = WindowRateLimiter(url, cluster=cluster, prefix=prefix, timeout=10.0)
            made.append(limiter)
            return limiter

    yield factory
    for limiter in made:
        await limiter.aclose()


async def test_a_rate_lets_its_amount_through_then_says_how_long_to_wait(
    limiters: Factory,
) -> None:
    limiter = limiters()
    await limiter.open()
    rate = Rate(5, 60)
    assert [await limiter.hit(rate, "k1") for _ in range(5)] == [None] * 5
    wait = await limiter.hit(rate, "k1")
    assert wait is not None and 0 < wait <= 120  # sliding window: at most two periods
    assert await limiter.hit(rate, "k2") is None  # keys are counted apart
    assert await limiter.hit(Rate(6, 60), "k1") is None  # and so are rules


async def test_costs_count_in_units(limiters: Factory) -> None:
    limiter = limiters()
    await limiter.open()
    rate = Rate(1000, 60)
    assert await limiter.hit(rate, "bytes", 600) is None
    assert await limiter.hit(rate, "bytes", 600) is not None  # 1200 > 1000: refused, uncounted
    assert await limiter.hit(rate, "bytes", 400) is None


async def test_nodes_share_their_counters(
    limiters: Factory, request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["limiters"] == "memory":
        pytest.skip("in-process counters are one node's own")
    a, b = limiters(), limiters()
    await asyncio.gather(a.open(), b.open())
    rate = Rate(10, 60)
    results = await asyncio.gather(*(n.hit(rate, "shared") for n in (a, b) for _ in range(10)))
    assert results.count(None) == 10  # 20 hits from two nodes, 10 allowed in all


async def test_a_request_spends_all_its_counters_or_none(limiters: Factory) -> None:
    limiter = limiters()
    await limiter.open()
    small, big = Rate(2, 60), Rate(100, 60)
    assert await limiter.hit(small, "device") is None
    assert await limiter.hit_all([(big, "user", 1), (small, "device", 1)]) is None
    wait = await limiter.hit_all([(big, "user", 1), (small, "device", 1)])
    assert wait is not None and 0 < wait <= 120  # the device's counter is full
    # the refused request charged the user's counter nothing: 99 more fit, not 98
    assert [await limiter.hit(big, "user") for _ in range(99)] == [None] * 99
    assert await limiter.hit(big, "user") is not None


async def test_concurrent_hits_share_round_trips(redis_url: str) -> None:
    limiter = WindowRateLimiter(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=10.0)
    await limiter.open()
    try:
        rate = Rate(150, 60)
        results = await asyncio.gather(*(limiter.hit(rate, f"k{i % 2}") for i in range(400)))
        assert results.count(None) == 300  # 150 per key, counted exactly
        redis = limiter._redis
        assert redis is not None and redis.requests == 400
        assert redis.batches < 400 / 10  # they left together, not one round trip each
    finally:
        await limiter.aclose()


async def test_a_redis_that_lost_its_scripts_gets_them_again(redis_url: str) -> None:
    limiter = WindowRateLimiter(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=10.0)
    await limiter.open()
    try:
        rate = Rate(1, 60)
        assert await limiter.hit(rate, "s") is None
        admin = Redis.from_url(redis_url)
        await admin.script_flush()
        await admin.aclose()
        assert await limiter.hit(rate, "s") is not None  # counted, not let through
    finally:
        await limiter.aclose()


async def test_an_unreachable_redis_lets_requests_through() -> None:
    limiter = WindowRateLimiter("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens there
    await limiter.open()
    rate = Rate(1, 60)
    assert [await limiter.hit(rate, "x") for _ in range(3)] == [None] * 3
    await limiter.aclose()


async def test_a_hung_redis_does_not_hold_requests(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "hung")
    await server.start()
    limiter = WindowRateLimiter(server.url, timeout=0.2)
    await limiter.open()
    rate = Rate(1, 60)
    assert await limiter.hit(rate, "h") is None
    server.pause()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await limiter.hit(rate, "h") is None  # over its limit, but Redis cannot say
        assert loop.time() - start < 1.0
    finally:
        server.resume()
        await limiter.aclose()
        await server.close()


async def test_a_claims_target_checks_leave_together(redis_url: str) -> None:
    """`Throttle.key_claims` checks one counter per target device: on Redis, a full group's
    claim costs two round trips (the device's and user's counters, then every target's), not
    one per target."""
    limiter = WindowRateLimiter(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=10.0)
    await limiter.open()
    try:
        throttle = Throttle(limiter, RateRules(key_claims_per_target=Rate(1, 3600)))
        claimer = Device(id="d1", user_id="u1", name="phone", created_at=0)
        group = [f"target{i}" for i in range(299)]
        redis = limiter._redis
        assert redis is not None
        before = redis.batches
        assert await throttle.key_claims(claimer, group) == group
        assert redis.batches - before == 2
        # counted on Redis: the same user gets none of them again, another user all of them
        assert await throttle.key_claims(claimer, [*group[:3], "other"]) == ["other"]
        someone = Device(id="d2", user_id="u2", name="phone", created_at=0)
        assert await throttle.key_claims(someone, group[:3]) == group[:3]
    finally:
        await limiter.aclose()


@contextlib.asynccontextmanager
async def two_nodes(redis_url: str) -> AsyncIterator[tuple[WindowRateLimiter, WindowRateLimiter]]:
    """Two nodes' limiters on one Redis, whose deferred counters sync only when told to."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a = WindowRateLimiter(redis_url, prefix=prefix, timeout=10.0, sync_interval=60.0)
    b = WindowRateLimiter(redis_url, prefix=prefix, timeout=10.0, sync_interval=60.0)
    await asyncio.gather(a.open(), b.open())
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def test_deferred_hits_decide_locally_and_share_their_spends(redis_url: str) -> None:
    """The message path's counters: a node decides on its own view without a round trip, and
    its spends reach the other nodes at the next sync, in the same counters exact hits use."""
    async with two_nodes(redis_url) as (a, b):
        rate = Rate(5, 60)
        assert a._redis is not None and a._deferred is not None and b._deferred is not None
        batches = a._redis.batches
        assert [await a.hit(rate, "d", deferred=True) for _ in range(5)] == [None] * 5
        assert await a.hit(rate, "d", deferred=True) is not None  # this node's own count
        # one round trip: the read of the counter new to this node; the spends wait for a sync
        assert a._redis.batches == batches + 1 and a._deferred.syncs == 0
        assert await b.hit(rate, "d") is None  # an exact hit elsewhere does not see them yet
        await a._deferred.settle()
        assert a._deferred.syncs == 1
        assert await b.hit(rate, "d") is not None  # now it does (5 + 1)
        assert await b.hit(rate, "d", deferred=True) is not None  # and so does b's view
        assert await a.hit(Rate(5, 60), "other", deferred=True) is None  # keys apart


async def test_deferred_spends_are_all_or_nothing(redis_url: str) -> None:
    limiter = WindowRateLimiter(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", timeout=10.0)
    await limiter.open()
    try:
        small, big = Rate(1, 60), Rate(3, 60)
        both = [(big, "user", 1), (small, "device", 1)]
        assert await limiter.hit_all(both, deferred=True) is None
        assert await limiter.hit_all(both, deferred=True) is not None  # the device is full
        # the refused request charged the user nothing: two more fit, then no more
        assert await limiter.hit(big, "user", deferred=True) is None
        assert await limiter.hit(big, "user", deferred=True) is None
        assert await limiter.hit(big, "user", deferred=True) is not None
        assert limiter._deferred is not None
        await limiter._deferred.settle()
        assert await limiter.hit(big, "user") is not None  # all three reached Redis
        assert await limiter.hit(Rate(4, 60), "user") is None  # (another rule's counter)
    finally:
        await limiter.aclose()


async def test_deferred_hits_limit_on_the_local_view_while_redis_is_away() -> None:
    limiter = WindowRateLimiter("redis://127.0.0.1:1/0", timeout=0.2, sync_interval=0.01)
    await limiter.open()
    try:
        rate = Rate(2, 60)
        assert await limiter.hit(rate, "x", deferred=True) is None
        assert limiter._deferred is not None
        await limiter._deferred.settle()  # fails (nothing listens): the spend is kept
        assert await limiter.hit(rate, "x", deferred=True) is None
        assert await limiter.hit(rate, "x", deferred=True) is not None  # limited all the same
    finally:
        await limiter.aclose()


async def test_a_counter_new_to_a_node_is_read_first(redis_url: str) -> None:
    """A device that reconnects to another node brings its counts: the node's first deferred
    hit of a counter waits for its counts (hits of one moment share the read)."""
    async with two_nodes(redis_url) as (a, b):
        rate = Rate(4, 60)
        assert [await a.hit(rate, "moved", deferred=True) for _ in range(3)] == [None] * 3
        assert a._deferred is not None and b._redis is not None
        await a._deferred.settle()
        batches = b._redis.batches
        results = await asyncio.gather(*(b.hit(rate, "moved", deferred=True) for _ in range(3)))
        assert results.count(None) == 1  # the fourth, wherever it is sent from
        assert b._redis.batches == batches + 1  # one read for the three
