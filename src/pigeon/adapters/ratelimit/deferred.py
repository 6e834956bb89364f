"""Shared counters settled behind the request: the message path's limits without a round trip.

Why it exists: with the counters in Redis, every message waited for two round trips to it (the
sender's counters, then the chat's fan-out reservation) before it could be committed. On a
PostgreSQL + Redis node that was about a quarter of the server's instructions per message at
low rates (0.92M of 3.5M under callgrind at 10 msgs/s), where no batching shares the cost.

Here each node decides from its own view of a counter: the counts Redis last reported for it,
plus what this node admitted since. An admitted spend is counted locally at once and sent to
Redis within `interval` (one pipeline for every counter spent meanwhile, whatever the load),
and the reply, which includes what the other nodes spent, becomes the node's new view. A refusal
costs nothing anywhere.

What that gives up, and why it is acceptable for these rules: another node's spends are seen up
to `interval` late, plus the time until this node spends that counter again; a counter this
node never saw starts from zero. So a cluster of N nodes can let through up to about N times a
counter's amount in its first window on each node, and a little more than its amount in a
later one. The message path's rules are per device (one connection, one node: exact), per user
and per chat; an abuser still meets the limit within a window. Rules that guard against
guessing (logins, registrations) keep the exact path (`redis.RedisWindows.hit`), where the
cluster counts as one node does.

Redis trouble: a sync that fails keeps its spends for the next one, and decisions go on from
the local view, so a node limits on its own counts during an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

from pigeon.adapters.ratelimit.local import refusal
from pigeon.adapters.ratelimit.redis import RedisWindows
from pigeon.domain.limits import Rate, Spend

#: Counters kept before dead ones (two windows old, nothing to send) are swept.
_SWEEP_AT = 100_000


def _index(rate: Rate, key: str) -> tuple[int, int, str]:
    return (rate.seconds, rate.amount, key)


class _View:
    """This node's view of one shared counter, in the counter's windows of `rate.seconds`:
    `current` includes `pending`, what this node admitted and has not sent yet."""

    __slots__ = ("current", "index", "key", "learning", "pending", "previous", "rate", "window")

    def __init__(self, rate: Rate, key: str, window: int) -> None:
        self.rate = rate
        self.key = key
        self.index = _index(rate, key)
        self.window = window
        self.previous = 0
        self.current = 0
        self.pending = 0
        #: Until Redis first told this node the counter's counts: the read on its way.
        self.learning: asyncio.Future[None] | None = None

    def learn(self, window: int, previous: int, current: int) -> None:
        """Take Redis' counts (which include what this node sent) as the view."""
        if window >= self.window:
            self.window, self.previous = window, previous
            self.current = current + self.pending
        elif window == self.window - 1:
            self.previous = max(self.previous, current)

    def roll(self, window: int) -> None:
        """Move to `window`: the current window becomes the previous one (if adjacent). What
        is still pending will be charged to the window Redis is in when it arrives."""
        if window != self.window:
            self.previous = self.current if window == self.window + 1 else 0
            self.current = self.pending
            self.window = window


class DeferredWindows:
    """Sliding-window counters shared through `redis`, decided locally and settled every
    `interval` seconds."""

    def __init__(
        self,
        redis: RedisWindows,
        *,
        interval: float = 0.1,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._interval = interval
        self._now = now
        self._views: dict[tuple[int, int, str], _View] = {}
        self._dirty: dict[tuple[int, int, str], _View] = {}
        self._reads: list[_View] = []
        self._reader: asyncio.Task[None] | None = None
        self._sweep_at = _SWEEP_AT
        self._timer: asyncio.TimerHandle | None = None
        self._syncing: asyncio.Task[None] | None = None
        self._closed = False
        #: Syncs sent, for tests and metrics.
        self.syncs = 0

    async def hit_all(self, spends: Sequence[Spend]) -> float | None:
        """Spend every one if all fit this node's view (None), else the longest wait among
        those that do not (nothing spent). A counter new to this node is read from Redis
        first (one round trip; concurrent hits share it), so a device that moves to another
        node brings its counts along."""
        views = [self._view(rate, key) for rate, key, _ in spends]
        learning = [view.learning for view in views if view.learning is not None]
        if learning:
            await asyncio.gather(*(asyncio.shield(f) for f in learning))
        now = self._now()
        longest: float | None = None
        for view, (rate, _, cost) in zip(views, spends, strict=True):
            window, into = divmod(now, rate.seconds)
            view.roll(int(window))
            wait = refusal(rate, view.previous, view.current, cost, into)
            if wait is not None:
                longest = wait if longest is None else max(longest, wait)
        if longest is not None:
            return longest
        for view, (_, _, cost) in zip(views, spends, strict=True):
            view.current += cost
            view.pending += cost
            self._dirty[view.index] = view
        self._schedule()
        return None

    def _view(self, rate: Rate, key: str) -> _View:
        index = _index(rate, key)
        view = self._views.get(index)
        if view is None:
            if len(self._views) >= self._sweep_at:
                self._sweep()
            view = self._views[index] = _View(rate, key, int(self._now() // rate.seconds))
            view.learning = asyncio.get_running_loop().create_future()
            self._reads.append(view)
            if len(self._reads) == 1:
                self._reader = asyncio.get_running_loop().create_task(self._read())
        return view

    async def _read(self) -> None:
        """Read the counts of the counters new to this node (all those that asked meanwhile,
        in one command); a Redis that does not answer leaves them at this node's own."""
        await asyncio.sleep(0)  # the hits of this loop turn join in
        views, self._reads = self._reads, []
        try:
            counts = await self._redis.add([(v.rate, v.key, 0) for v in views])
            for view, count in zip(views, counts or (), strict=False):
                view.learn(*count)
        finally:
            for view in views:
                if view.learning is not None and not view.learning.done():
                    view.learning.set_result(None)
                view.learning = None

    def _sweep(self) -> None:
        now = self._now()
        dead = [
            index
            for index, view in self._views.items()
            if not view.pending
            and view.learning is None
            and index not in self._dirty
            and now // index[0] - view.window >= 2
        ]
        for index in dead:
            del self._views[index]
        # sweep again only once the live counters doubled: a sweep that frees little must not
        # run for every new counter
        self._sweep_at = max(_SWEEP_AT, 2 * len(self._views))

    def _schedule(self) -> None:
        if self._timer is None and self._syncing is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._interval, self._start_sync)

    def _start_sync(self) -> None:
        self._timer = None
        if self._dirty and self._syncing is None and not self._closed:
            self._syncing = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        """Send what every dirty counter's node admitted; take Redis' counts as the new view."""
        batch = list(self._dirty.values())
        self._dirty.clear()
        sent = [view.pending for view in batch]
        for view in batch:
            view.pending = 0
        self.syncs += 1
        counts = None
        try:
            spends = [(v.rate, v.key, n) for v, n in zip(batch, sent, strict=True)]
            counts = await self._redis.add(spends)
        finally:
            self._syncing = None
            if counts is None:  # kept for the next sync; decisions go on from the local view
                for view, n in zip(batch, sent, strict=True):
                    view.pending += n
                    self._dirty[view.index] = view
            if self._dirty:
                self._schedule()
        for view, count in zip(batch, counts or (), strict=False):
            view.learn(*count)

    async def settle(self) -> None:
        """Send what is pending now and take Redis' counts (shutdown, tests): one sync after
        the one in flight, if any."""
        if self._syncing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._syncing)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dirty and self._syncing is None:
            self._syncing = asyncio.get_running_loop().create_task(self._sync())
            with contextlib.suppress(Exception):
                await asyncio.shield(self._syncing)

    async def aclose(self) -> None:
        """Send what is pending (best effort), then stop."""
        self._closed = True
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._reader)
        await self.settle()
