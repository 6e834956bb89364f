"""`RateLimiter`: sliding-window counters in this process, or in Redis for a cluster.

One facade over the backings (`local.SlidingWindows` on one node; on a cluster
`redis.RedisWindows`, checked in Redis before answering, and `deferred.DeferredWindows`,
decided on the node's view and settled behind it), chosen by whether a Redis URL is given, so
the composition root and the contract suite see one adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

from pigeon.adapters.ratelimit.deferred import DeferredWindows
from pigeon.adapters.ratelimit.local import SlidingWindows
from pigeon.adapters.ratelimit.redis import RedisWindows
from pigeon.domain.limits import Rate, Spend
from pigeon.ports import RateLimiter


class WindowRateLimiter:
    """Sliding-window counters, in this process (`redis_url` None) or in Redis."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        cluster: bool = False,
        prefix: str = "pigeon:rl",
        timeout: float = 0.25,
        sync_interval: float = 0.1,
    ) -> None:
        self._local: SlidingWindows | None = None
        self._redis: RedisWindows | None = None
        self._deferred: DeferredWindows | None = None
        if redis_url is None:
            self._local = SlidingWindows()
        else:
            self._redis = RedisWindows(redis_url, cluster=cluster, prefix=prefix, timeout=timeout)
            self._deferred = DeferredWindows(self._redis, interval=sync_interval)

    async def open(self) -> None:
        if self._redis is not None:
            await self._redis.open()

    async def aclose(self) -> None:
        if self._deferred is not None:
            await self._deferred.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def hit(
        self, rate: Rate, key: str, cost: int = 1, *, deferred: bool = False
    ) -> float | None:
        return await self.hit_all(((rate, key, cost),), deferred=deferred)

    async def hit_all(self, spends: Sequence[Spend], *, deferred: bool = False) -> float | None:
        if self._local is not None:
            return self._local.hit_all(spends)
        if deferred:
            assert self._deferred is not None
            return await self._deferred.hit_all(spends)
        assert self._redis is not None
        return await self._redis.hit(spends)


_check: type[RateLimiter] = WindowRateLimiter
