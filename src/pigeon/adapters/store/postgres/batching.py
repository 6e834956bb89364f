"""Group commit for the PostgreSQL message path.

A send or an ack is cheap inside PostgreSQL next to what surrounds it: the network round trip, the
function call, and the commit with its WAL flush. `GroupCommit` lets the calls that arrive while
earlier ones are in flight share those: up to `max_inflight` batches run at once (each on its
own pooled connection), and whatever queued meanwhile leaves together in the next one. A lone
call is never delayed: with a free slot it leaves at once, as a batch of one. Under load the
batches grow by themselves, with no timer to tune.

With a `key` (the sending device, for sends), the calls of one key commit in the order they were
made: several of them may go in one batch (its elements take effect in batch order), but none
goes while a batch holding an earlier one of its key is in flight, since batches in flight
commit in any order. Such calls wait apart, per key, and rejoin the queue once that batch is
done; the rest go on. (Before, a device's send waited for its previous one to be answered: with
10 sends in flight per device, each batch held one send per device, and a node's throughput
was its senders over a batch's round trip.)

A batch is one transaction, so one bad element would fail its neighbours: when a batch of several
fails with anything but `Unavailable` (which would fail each of them as well), its elements are
run again one by one, so each caller gets its own answer. The runner answers each element apart
once the batch has committed (an element's answer may be an error of its own), so a committed
batch is never run again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from pigeon.domain.errors import PigeonError, Unavailable

Req = TypeVar("Req")
Res = TypeVar("Res")

#: A call waiting for its batch: its request, its answer and its key (None: no order to keep).
_Call = tuple[Req, "asyncio.Future[Res]", Hashable | None]

#: Runs one batch: one result or exception per request, in order.
BatchRunner = Callable[[Sequence[Req]], Awaitable[Sequence[Res | BaseException]]]


class GroupCommit(Generic[Req, Res]):
    """Calls of one kind, run in batches as wide as the load makes them."""

    def __init__(
        self,
        run: BatchRunner[Req, Res],
        *,
        max_batch: int = 64,
        max_inflight: int = 4,
        key: Callable[[Req], Hashable] | None = None,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._key = key
        self._queue: deque[_Call[Req, Res]] = deque()
        #: Keys with a call in a batch in flight, and the calls of those keys made since.
        self._busy: set[Hashable] = set()
        self._waiting: dict[Hashable, deque[_Call[Req, Res]]] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batches run and calls in them, for tests and metrics.
        self.batches = 0
        self.calls = 0

    async def call(self, req: Req) -> Res:
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        key = None if self._key is None else self._key(req)
        if key is not None and key in self._busy:
            self._waiting.setdefault(key, deque()).append((req, fut, key))
        else:
            self._queue.append((req, fut, key))
            self._start()
        return await fut

    def _start(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            n = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            keys = {key for _, _, key in batch if key is not None}
            if keys:
                self._hold_back(keys)
            self._inflight += 1
            task = asyncio.create_task(self._flush(batch, keys))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _hold_back(self, keys: set[Hashable]) -> None:
        """`keys` are now in flight: their calls still queued wait apart (in order) until the
        batch is done."""
        self._busy |= keys
        if not any(key in keys for _, _, key in self._queue):
            return
        queue: deque[_Call[Req, Res]] = deque()
        for call in self._queue:
            if call[2] in keys:
                self._waiting.setdefault(call[2], deque()).append(call)
            else:
                queue.append(call)
        self._queue = queue

    async def _flush(self, batch: list[_Call[Req, Res]], keys: set[Hashable]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._inflight -= 1
            self._busy -= keys
            for key in keys:
                self._queue.extend(self._waiting.pop(key, ()))
            self._start()

    async def _settle(self, batch: list[_Call[Req, Res]]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            try:
                results = await self._run([req for req, _, _ in batch])
            except Exception as exc:
                if len(batch) == 1 or isinstance(exc, Unavailable):
                    for _, fut, _ in batch:
                        _resolve(fut, exc)
                    return
                # One element may be what failed: each on its own, so each gets its own answer
                # (one after another: a fallback must not take the whole pool).
                for item in batch:
                    await self._settle([item])
                return
            for (_, fut, _), result in zip(batch, results, strict=True):
                _resolve(fut, result)
        except BaseException as exc:  # cancelled (shutdown), or a bug: nobody is left waiting
            for _, fut, _ in batch:
                _resolve(fut, exc if isinstance(exc, Exception) else PigeonError("cancelled"))
            raise


def _resolve(fut: asyncio.Future[Res], result: Res | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
