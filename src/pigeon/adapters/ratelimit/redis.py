"""Sliding-window counters in Redis, shared by every node, at one round trip per batch of hits.

Why not the `limits` library's Redis storage, used before: it runs one Lua call per counter and
one more to say how long to wait, each a full redis-py command (a pooled connection taken and
given back, a retry wrapper, a timeout). A send spends three or four counters, so on a
PostgreSQL + Redis node the limiter took about half of the server's CPU and cut throughput by a
third (`pigeon bench compare --store postgres`, docs/operations.md). Here the hits made while a
batch is on its way to Redis queue up and leave together as one pipeline (per Redis node, on a
cluster) on one connection: a lone hit leaves at once, and under load the batches widen by
themselves, with no timer.

The arithmetic is `local.SlidingWindows`' (the current window's count plus the previous one's,
weighted by how much of it still overlaps the sliding window), run atomically by a Lua script on
one hash per counter, on Redis' clock, so nodes whose clocks drift still agree. A request that
spends several counters (a message: per device, per user, its bytes) is all or nothing: each
counter is checked and charged by the script, and if one refuses, what the others were charged
is given back in the same way (a second round trip, only on refusal).

Redis trouble never blocks the message path: a batch that fails or takes longer than `timeout`
lets its hits through, and the outage is logged once a minute. Hits queued behind a batch that
hangs wait for it, then for their own: at most twice `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from pigeon.adapters.ratelimit.local import wait_for_fit
from pigeon.adapters.redis_client import RedisClient
from pigeon.domain.limits import Rate, Spend

log = logging.getLogger(__name__)
_WARN_EVERY = 60.0

# KEYS[1]: the counter, a hash {w: window index, p: previous window's count, c: current count}.
# ARGV: amount, period (ms), cost. A negative cost gives back a charge made a moment ago (into
# the current window, if it is still current; never below zero).
# Returns {0} when charged, else {1, previous, current, ms into the window} (nothing charged).
_HIT = """
local amount, period, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = math.floor(now / period)
local into = now - window * period
local v = redis.call('HMGET', KEYS[1], 'w', 'p', 'c')
local w, p, c = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
if cost < 0 then
  if w == window then redis.call('HSET', KEYS[1], 'c', math.max(0, c + cost)) end
  return {0}
end
if w ~= window then
  if w == window - 1 then p = c else p = 0 end
  c = 0
end
if p * (1 - into / period) + c + cost <= amount then
  redis.call('HSET', KEYS[1], 'w', window, 'p', p, 'c', c + cost)
  redis.call('PEXPIRE', KEYS[1], 2 * period)
  return {0}
end
return {1, p, c, into}
"""
_HIT_SHA = hashlib.sha1(_HIT.encode()).hexdigest()

# The same counters, charged without a check (spends a node admitted on its own view,
# `deferred.py`). KEYS: the counters; ARGV: period (ms) and cost of each, in turn. Returns the
# window index, previous and current count of each after it, flat.
_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local period, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local window = math.floor(now / period)
  local v = redis.call('HMGET', key, 'w', 'p', 'c')
  local w, p, c = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if w ~= window then
    if w == window - 1 then p = c else p = 0 end
    c = 0
  end
  c = c + cost
  redis.call('HSET', key, 'w', window, 'p', p, 'c', c)
  redis.call('PEXPIRE', key, 2 * period)
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = window, p, c
end
return out
"""
_ADD_SHA = hashlib.sha1(_ADD.encode()).hexdigest()
_SCRIPTS = {_HIT_SHA: _HIT, _ADD_SHA: _ADD}


class _Request:
    """One caller's spends and the future its answer goes to."""

    __slots__ = ("future", "spends")

    def __init__(self, spends: Sequence[Spend], future: asyncio.Future[float | None]) -> None:
        self.spends = spends
        self.future = future


class RedisWindows:
    """The counters of every node, in one Redis server or a Redis Cluster."""

    def __init__(
        self, url: str, *, cluster: bool, prefix: str = "pigeon:rl", timeout: float = 0.25
    ) -> None:
        options: dict[str, Any] = {
            "protocol": 2,
            "decode_responses": False,
            "socket_timeout": None,  # every batch is bounded by asyncio.timeout instead
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # a retried script could charge twice
        }
        client: Any = (
            RedisCluster.from_url(url, **options)
            if cluster
            else Redis.from_url(url, max_connections=4, **options)
        )
        self._client = cast(RedisClient, client)
        self._cluster = cluster
        self._prefix = prefix + ":"
        self._timeout = timeout
        self._queue: list[_Request] = []
        self._flusher: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY
        #: Batches sent and requests in them, for tests and metrics.
        self.batches = 0
        self.requests = 0

    async def open(self) -> None:
        """Connect and load the script; an unreachable Redis is logged, not fatal (fail open)."""
        try:
            async with asyncio.timeout(self._timeout * 4):
                await self._client.initialize()
                for script in _SCRIPTS.values():  # a cluster: every master
                    await self._client.execute_command("SCRIPT LOAD", script)
        except Exception as exc:
            self._warn(exc)

    async def aclose(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(BaseException):
                await flusher
        for request in self._queue:
            _answer(request, None)
        self._queue.clear()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def hit(self, spends: Sequence[Spend]) -> float | None:
        """Charge every spend if all fit (None), else the longest wait among those that do not
        (nothing charged)."""
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(spends, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self.batches += 1
                self.requests += len(batch)
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._run(batch)
                except Exception as exc:  # down, hung or confused: let this batch through
                    self._warn(exc)
                finally:  # also when closed (cancelled) mid-batch: nobody is left waiting
                    for request in batch:
                        _answer(request, None)
        finally:
            self._flusher = None

    async def _run(self, batch: list[_Request]) -> None:
        commands = [self._command(*spend) for request in batch for spend in request.spends]
        replies = await self._send(commands)
        refunds: list[list[Any]] = []
        i = 0
        for request in batch:
            mine = replies[i : i + len(request.spends)]
            i += len(request.spends)
            waits = [_wait(reply, spend) for reply, spend in zip(mine, request.spends, strict=True)]
            refused = [w for w in waits if w is not None]
            if not refused:
                _answer(request, None)
                continue
            _answer(request, max(refused))
            refunds += [
                self._command(rate, key, -cost)
                for (rate, key, cost), wait in zip(request.spends, waits, strict=True)
                if wait is None
            ]
        if refunds:
            await self._send(refunds)

    async def add(self, spends: Sequence[Spend]) -> list[tuple[int, int, int]] | None:
        """Charge every spend without a check; the counters' (window index, previous, current)
        after it, or None if Redis did not answer in time (logged). One command for them all
        on one server; one per counter on a cluster, where counters live in different slots
        (still one pipeline per node)."""
        self.batches += 1
        groups = [list(spends)] if not self._cluster else [[spend] for spend in spends]
        commands: list[list[Any]] = []
        for group in groups:
            keys = [self._counter(rate, key) for rate, key, _ in group]
            args = [x for rate, _, cost in group for x in (rate.seconds * 1000, cost)]
            commands.append(["EVALSHA", _ADD_SHA, len(keys), *keys, *args])
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._send(commands)
        except Exception as exc:
            self._warn(exc)
            return None
        flat = [int(x) for reply in replies for x in reply]
        return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]

    def _counter(self, rate: Rate, key: str) -> str:
        return f"{self._prefix}{rate.amount}/{rate.seconds}:{key}"

    def _command(self, rate: Rate, key: str, cost: int) -> list[Any]:
        counter = self._counter(rate, key)
        return ["EVALSHA", _HIT_SHA, 1, counter, rate.amount, rate.seconds * 1000, cost]

    async def _send(self, commands: list[list[Any]]) -> list[Any]:
        replies = await self._pipeline(commands)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:  # a node restarted: load the scripts again and rerun only what it refused
            for script in _SCRIPTS.values():  # (the others were charged)
                await self._client.execute_command("SCRIPT LOAD", script)
            again = await self._pipeline([commands[i] for i in lost])
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _pipeline(self, commands: list[list[Any]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("rate limiter unavailable, letting requests through: %r", exc)


def _wait(reply: list[int], spend: Spend) -> float | None:
    if reply[0] == 0:
        return None
    rate, _, cost = spend
    _, previous, current, into_ms = reply
    return wait_for_fit(rate.amount, previous, current, cost, into_ms / 1000, rate.seconds)


def _answer(request: _Request, wait: float | None) -> None:
    if not request.future.done():
        request.future.set_result(wait)
