"""In-process sliding-window counters: one node's limits, with the arithmetic `redis.py` runs in
Redis for a cluster.

Why not the `limits` library's MemoryStorage: it schedules an expiry task after almost every
hit that scans every key, and that cost 40-70 µs per message on the send path at saturation
(measured with `pigeon bench compare`). Here a hit is a dict lookup and a little arithmetic,
and dead counters are dropped in one sweep when there are many.

The algorithm (the sliding-window counter, also what `redis.py`'s script computes, so one node
and a cluster limit alike): time is cut in fixed windows of `seconds`; the count that matters is the
current window's plus the previous window's weighted by the part of it still inside the
sliding window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pigeon.domain.limits import Rate, Spend

#: Counters kept before dead ones (two windows old) are swept; after a sweep, the next one
#: waits until the live counters double (long windows, such as an hour's per pair of user
#: and device for key claims, keep many alive: a sweep per new counter would scan them all).
_SWEEP_AT = 100_000


class SlidingWindows:
    """Counters per (rate, key); `hit` answers None or the seconds to wait."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        #: (seconds, amount, key) -> [window index, previous window's count, current count]
        self._counts: dict[tuple[int, int, str], list[int]] = {}
        self._sweep_at = _SWEEP_AT

    def hit(self, rate: Rate, key: str, cost: int = 1) -> float | None:
        """Spend `cost` if it fits (None), else the seconds until it would (nothing spent)."""
        return self.hit_all(((rate, key, cost),))

    def hit_all(self, spends: Sequence[Spend]) -> float | None:
        """Spend every one if all fit (None), else the longest wait among those that do not
        (nothing spent)."""
        now = self._now()
        longest: float | None = None
        counters = []
        for rate, key, cost in spends:
            counter, into = self._counter(rate, key, now)
            wait = refusal(rate, counter[1], counter[2], cost, into)
            if wait is not None:
                longest = wait if longest is None else max(longest, wait)
            counters.append(counter)
        if longest is not None:
            return longest
        for counter, (_, _, cost) in zip(counters, spends, strict=True):
            counter[2] += cost
        return None

    def _counter(self, rate: Rate, key: str, now: float) -> tuple[list[int], float]:
        """The counter of (rate, key), rolled over to the window `now` is in, and how far into
        that window `now` is."""
        period = rate.seconds
        window, into = divmod(now, period)
        counter = self._counts.get((period, rate.amount, key))
        if counter is None:
            counter = [int(window), 0, 0]
            if len(self._counts) >= self._sweep_at:
                self._sweep(now)
            self._counts[(period, rate.amount, key)] = counter
        elif counter[0] != window:  # roll over: the current window becomes the previous one
            counter[1] = counter[2] if counter[0] == window - 1 else 0
            counter[2] = 0
            counter[0] = int(window)
        return counter, into

    def _sweep(self, now: float) -> None:
        dead = [k for k, c in self._counts.items() if now // k[0] - c[0] >= 2]
        for k in dead:
            del self._counts[k]
        self._sweep_at = max(_SWEEP_AT, 2 * len(self._counts))


def refusal(rate: Rate, previous: int, current: int, cost: int, into: float) -> float | None:
    """None if `cost` fits a counter at (`previous`, `current`), `into` seconds into its
    window; else the seconds until it would (`wait_for_fit`)."""
    if previous * (1 - into / rate.seconds) + current + cost <= rate.amount:
        return None
    return wait_for_fit(rate.amount, previous, current, cost, into, rate.seconds)


def wait_for_fit(
    amount: int, previous: int, current: int, cost: int, into: float, period: int
) -> float:
    """Seconds until `cost` fits: while the previous window slides out, or else in the next
    window, once enough of this one has slid out."""
    if current + cost <= amount:  # the previous window's weight must fall enough
        weight = (amount - current - cost) / previous
        return max(0.001, period * (1 - weight) - into)
    if cost > amount:
        return float(period)
    rest = period - into
    weight = (amount - cost) / current  # in the next window, this one becomes the previous
    return max(0.001, rest + period * (1 - weight))
