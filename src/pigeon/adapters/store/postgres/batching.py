"""Group commit for the PostgreSQL message path.

A send or an ack is cheap inside PostgreSQL next to what surrounds it: the network round trip, the
function call, and the commit with its WAL flush. `GroupCommit` lets the calls that arrive while
earlier ones are in flight share those: up to `max_inflight` batches run at once (each on its
own pooled connection), and whatever queued meanwhile leaves together in the next one. A lone
call is never delayed: with a free slot it leaves at once, as a batch of one. Under load the
batches grow by themselves, with no timer to tune.

A batch is one transaction, so one bad element would fail its neighbours: when a batch of several
fails with anything but `Unavailable` (which would fail each of them as well), its elements are
run again one by one, so each caller gets its own answer. The runner answers each element apart
once the batch has committed (an element's answer may be an error of its own), so a committed
batch is never run again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from pigeon.domain.errors import PigeonError, Unavailable

Req = TypeVar("Req")
Res = TypeVar("Res")

#: Runs one batch: one result or exception per request, in order.
BatchRunner = Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]]


class GroupCommit(Generic[Req, Res]):
    """Calls of one kind, run in batches as wide as the load makes them."""

    def __init__(
        self, run: BatchRunner[Req, Res], *, max_batch: int = 64, max_inflight: int = 4
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: deque[tuple[Req, asyncio.Future[Res]]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batches run and calls in them, for tests and metrics.
        self.batches = 0
        self.calls = 0

    async def call(self, req: Req) -> Res:
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._queue.append((req, fut))
        self._start()
        return await fut

    def _start(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            n = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            self._inflight += 1
            task = asyncio.create_task(self._flush(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._inflight -= 1
            self._start()

    async def _settle(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            try:
                results = await self._run([req for req, _ in batch])
            except Exception as exc:
                if len(batch) == 1 or isinstance(exc, Unavailable):
                    for _, fut in batch:
                        _resolve(fut, exc)
                    return
                # One element may be what failed: each on its own, so each gets its own answer
                # (one after another: a fallback must not take the whole pool).
                for item in batch:
                    await self._settle([item])
                return
            for (_, fut), result in zip(batch, results, strict=True):
                _resolve(fut, result)
        except BaseException as exc:  # cancelled (shutdown), or a bug: nobody is left waiting
            for _, fut in batch:
                _resolve(fut, exc if isinstance(exc, Exception) else PigeonError("cancelled"))
            raise


def _resolve(fut: asyncio.Future[Res], result: Res | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
