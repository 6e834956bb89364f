"""`RateLimiter`: sliding-window counters in this process, or in Redis for a cluster.

In Redis they are the `limits` library's sliding-window counter: two keys per (rule, key) and
one atomic Lua call per hit, so every node counts against the same numbers. In process they are
`local.SlidingWindows`, the same arithmetic without `limits`' memory storage (whose expiry scans
cost the send path 40-70 µs a message). Redis trouble never blocks the message path: a hit that
fails or takes longer than `timeout` is let through, and the outage is logged once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from pigeon.adapters.ratelimit.local import SlidingWindows
from pigeon.domain.limits import Rate
from pigeon.ports import RateLimiter

log = logging.getLogger(__name__)
_WARN_EVERY = 60.0


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
        self._redis_url = redis_url
        self._cluster = cluster
        self._prefix = prefix
        self._timeout = timeout
        self._storage: Storage | None = None
        self._local: SlidingWindows | None = None
        self._limiter: SlidingWindowCounterRateLimiter | None = None
        self._items: dict[Rate, RateLimitItem] = {}
        self._warned_at = -_WARN_EVERY

    async def open(self) -> None:
        if self._redis_url is None:
            self._local = SlidingWindows()
            return
        scheme = "async+redis+cluster" if self._cluster else "async+redis"
        uri = scheme + self._redis_url[self._redis_url.index(":") :]
        cls: Any = RedisClusterStorage if self._cluster else RedisStorage
        self._storage = cls(uri, implementation="redispy", key_prefix=self._prefix)
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)

    async def aclose(self) -> None:
        self._local = None
        storage, self._storage, self._limiter = self._storage, None, None
        client = getattr(getattr(storage, "bridge", None), "storage", None)  # redis-py's client
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def hit(self, rate: Rate, key: str, cost: int = 1) -> float | None:
        if self._local is not None:
            return self._local.hit(rate, key, cost)
        limiter = self._limiter
        if limiter is None:
            return None
        item = self._item(rate)
        try:
            async with asyncio.timeout(self._timeout):
                if await limiter.hit(item, key, cost=cost):
                    return None
                stats = await limiter.get_window_stats(item, key)
        except Exception as exc:  # an unreachable or hung Redis: let the request through
            self._warn(exc)
            return None
        return max(0.001, stats.reset_time - time.time())

    def _item(self, rate: Rate) -> RateLimitItem:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = RateLimitItemPerSecond(rate.amount, rate.seconds)
        return item

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("rate limiter unavailable, letting requests through: %r", exc)


_check: type[RateLimiter] = WindowRateLimiter
