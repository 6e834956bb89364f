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
commit in any order. A key's calls wait in a queue of their own, and the key takes one place in
the queue of what is ready, and only while none of its calls is in flight: when it comes up, a
batch takes its calls (as many as fit), and it goes back to the end once that batch is done.
So keys take turns, and forming a batch costs what it takes, never a scan of what waits (that
scan took ~1 ms per batch with 20k sends queued). (Before the keys, a device's send waited for
its previous one to be answered: with 10 sends in flight per device, each batch held one send
per device, and a node's throughput was its senders over a batch's round trip.)

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


class _Turn:
    """A key's place in the queue: its calls (in `GroupCommit._keyed`) go when it comes up."""

    __slots__ = ("key",)

    def __init__(self, key: Hashable) -> None:
        self.key = key


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
        #: What is ready, in turn: calls without a key, and keys whose calls wait in `_keyed`
        #: (a key is here at most once, and never while a call of it is in flight).
        self._queue: deque[_Call[Req, Res] | _Turn] = deque()
        #: Per key, its calls not yet in a batch, in the order they were made.
        self._keyed: dict[Hashable, deque[_Call[Req, Res]]] = {}
        #: Keys with a call in a batch in flight.
        self._busy: set[Hashable] = set()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batches run and calls in them, for tests and metrics.
        self.batches = 0
        self.calls = 0

    async def call(self, req: Req) -> Res:
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        key = None if self._key is None else self._key(req)
        if key is None:
            self._queue.append((req, fut, None))
        else:
            calls = self._keyed.get(key)
            if calls is None:
                calls = self._keyed[key] = deque()
                if key not in self._busy:  # its turn (else it takes one when its batch is done)
                    self._queue.append(_Turn(key))
            calls.append((req, fut, key))
        self._start()
        return await fut

    def _start(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            batch: list[_Call[Req, Res]] = []
            keys: set[Hashable] = set()
            while self._queue and len(batch) < self._max_batch:
                item = self._queue.popleft()
                if not isinstance(item, _Turn):
                    batch.append(item)
                    continue
                calls = self._keyed[item.key]
                while calls and len(batch) < self._max_batch:
                    batch.append(calls.popleft())
                if not calls:
                    del self._keyed[item.key]
                keys.add(item.key)
            self._busy |= keys
            self._inflight += 1
            task = asyncio.create_task(self._flush(batch, keys))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: list[_Call[Req, Res]], keys: set[Hashable]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._inflight -= 1
            self._busy -= keys
            for key in keys:
                if key in self._keyed:  # calls made since, or left out of a full batch
                    self._queue.append(_Turn(key))
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
