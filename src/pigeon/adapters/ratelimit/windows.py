"""`RateLimiter`: sliding-window counters in this process, or in Redis for a cluster.

One facade over the two backings (`local.SlidingWindows` on one node, `redis.RedisWindows`
shared by every node), chosen by whether a Redis URL is given, so the composition root and the
contract suite see one adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    ) -> None:
        self._local: SlidingWindows | None = None
        self._redis: RedisWindows | None = None
        if redis_url is None:
            self._local = SlidingWindows()
        else:
            self._redis = RedisWindows(redis_url, cluster=cluster, prefix=prefix, timeout=timeout)

    async def open(self) -> None:
        if self._redis is not None:
            await self._redis.open()

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def hit(self, rate: Rate, key: str, cost: int = 1) -> float | None:
        return await self.hit_all(((rate, key, cost),))

    async def hit_all(self, spends: Sequence[Spend]) -> float | None:
        if self._local is not None:
            return self._local.hit_all(spends)
        assert self._redis is not None
        return await self._redis.hit(spends)


_check: type[RateLimiter] = WindowRateLimiter
