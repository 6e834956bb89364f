"""The publishing side of one shard: coalesces concurrent publishes into pipelined round trips.

Why it exists: a frame published on a node must reach Redis fast and in order, even under many
concurrent publishers. Publishes queued while a round trip is in flight go out together in the
next one, in queue order, on one connection (so per-channel order is kept), and every wait is
bounded so a dead shard turns into `Unavailable` rather than a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from redis.exceptions import RedisError, ResponseError

from pigeon.adapters.bus.redis.wire import Wire, hang_up, log
from pigeon.domain.errors import Unavailable

_Outcome = list[ResponseError | None] | BaseException


class Publisher:
    """One shard's publishing connection. Publishes queued while a round trip is in flight are
    sent together in the next one (one write, then one reply per frame), in queue order."""

    def __init__(self, dial: Callable[[], Wire], verb: bytes, timeout: float) -> None:
        self._dial = dial
        self._verb = verb
        self._timeout = timeout
        self._conn: Wire | None = None
        self._queue: list[tuple[str, bytes]] = []
        self._batch: asyncio.Future[_Outcome] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def send(self, items: list[tuple[str, bytes]]) -> list[ResponseError | None]:
        """Publish `items`; per item None or the error Redis answered (e.g. MOVED)."""
        start = len(self._queue)
        self._queue.extend(items)
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        self._wake.set()
        try:
            # The batch ahead of ours and ours each take at most `timeout`.
            async with asyncio.timeout(2 * self._timeout + 1):
                outcome = await asyncio.shield(batch)
        except TimeoutError:
            raise Unavailable("publish timed out") from None
        if isinstance(outcome, BaseException):
            raise Unavailable(f"publish failed: {outcome}") from outcome
        return outcome[start : start + len(items)]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._batch is not None and not self._batch.done():
            self._batch.set_result(Unavailable("bus closed"))
        await hang_up(self._conn)
        self._conn = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            items, batch = self._queue, self._batch
            self._queue, self._batch = [], None
            outcome: _Outcome
            try:
                async with asyncio.timeout(self._timeout):
                    outcome = await self._round_trip(items)
            except (RedisError, OSError, TimeoutError) as exc:
                outcome = exc
                await hang_up(self._conn)
                self._conn = None
            except Exception as exc:  # a bug must not leave publishers waiting
                log.exception("redis publisher failed")
                outcome = exc
            if batch is not None and not batch.done():
                batch.set_result(outcome)

    async def _round_trip(self, items: list[tuple[str, bytes]]) -> list[ResponseError | None]:
        conn = self._conn
        if conn is not None and not await _still_open(conn):
            await hang_up(conn)  # closed by the server (restart) while idle: start afresh
            conn = None
        if conn is None:
            conn = self._conn = self._dial()
            await conn.connect()
        verb = self._verb
        commands = [(verb, channel, frame) for channel, frame in items]
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        out: list[ResponseError | None] = []
        for _ in items:
            try:
                await conn.read_response()
                out.append(None)
            except ResponseError as exc:
                out.append(exc)
        return out


async def _still_open(conn: Wire) -> bool:
    """False if the server closed an idle connection: readable data on an idle publishing
    connection means EOF (redis-py reports it as True or, since 8.2, as ConnectionError)."""
    if not conn.is_connected:
        return False
    try:
        return not await conn.can_read()
    except (RedisError, OSError):
        return False
