"""Pushes just-committed inbox entries to the devices' connections over the bus (fast path).

Losing a push is harmless: the entry is already in the device's durable inbox, and the device
heals the gap (by `iseq`) with a resync, or gets it on its next connect. Still, a push whose
publish failed here (the bus was down) is published again, with backoff, once the bus answers:
the receiving node may never have noticed the outage, and the device may receive nothing else
that would reveal the gap. A frame that arrives twice is dropped by the client (by `iseq`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import Any, TypeVar

from pigeon.bookkeeping import BOOKKEEPING
from pigeon.domain.errors import PigeonError
from pigeon.domain.events import Delivery, inbox_frame
from pigeon.ports import Bus, SendResult
from pigeon.services import channels

log = logging.getLogger(__name__)
T = TypeVar("T")


#: Pauses between attempts to publish again what failed (about 2.5 minutes in all).
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0)
#: Frames kept for another attempt; beyond this the oldest are dropped (their devices still
#: get them from the inbox: by gap healing or on their next connect).
MAX_HELD = 100_000


def _settled(inner: asyncio.Future[Any]) -> None:
    """Take the outcome of every change, so that one whose caller is gone (its connection
    closed) is never reported as "never retrieved": a refusal then concerns nobody, anything
    else is logged."""
    if inner.cancelled():
        return
    exc = inner.exception()
    if exc is not None and not isinstance(exc, PigeonError):
        log.error("store change failed", exc_info=exc)


class Fanout:
    """Turns deliveries into device frames and publishes them.

    `on_delivered(seconds)`, if given, is told how long a message took from its commit to its
    frames being published (the bus answered; an in-process bus has queued them on the
    connections by then): what a metric of delivery latency needs, and only the fan-out
    knows both instants."""

    def __init__(
        self,
        bus: Bus,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        on_delivered: Callable[[float], None] | None = None,
    ) -> None:
        self._bus = bus
        #: The node's loop, looked up at the first change (each lookup is a getpid call).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delays = retry_delays
        self._on_delivered = on_delivered
        #: Frames to publish again, oldest first; appending to a full deque drops the oldest
        #: (a list trimmed per failed push moved all 100k of them each time, during an outage).
        self._held: deque[tuple[str, bytes]] = deque(maxlen=MAX_HELD)
        #: Frames dropped since the last report.
        self._dropped = 0
        self._retrier: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def commit(
        self, change: Coroutine[Any, Any, T], deliveries: Callable[[T], list[Delivery]]
    ) -> T:
        """`start` the change and wait for its outcome."""
        return await self.start(change, deliveries)

    def start(
        self, change: Coroutine[Any, Any, T], deliveries: Callable[[T], list[Delivery]]
    ) -> asyncio.Future[T]:
        """Hand a store change over now, then push what it committed. The future returned
        gives the change's outcome, to one caller: cancelled while awaiting it, that caller
        cancels it, and the change goes on all the same (without `asyncio.shield`, a future
        and two callbacks fewer per await). The change's task is created before this returns
        and tasks start FIFO, so changes started in one order reach the store in that order.
        Once started, the push happens even if the caller is cancelled (its connection closed
        mid-command), so nothing committed waits for the recipients' next reconnect. Nobody
        waits for the push: a hung bus never holds back a reply, the inbox being the truth; the
        same task pushes after answering, so pushes start in commit order (a publish queues
        before its first await)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        outcome.add_done_callback(_settled)  # its own context: a failure it logs names the device
        task = loop.create_task(self._run(change, deliveries, outcome))
        self._running.add(task)
        task.add_done_callback(self._running.discard, context=BOOKKEEPING)
        return outcome

    async def _run(
        self,
        change: Coroutine[Any, Any, T],
        deliveries: Callable[[T], list[Delivery]],
        outcome: asyncio.Future[T],
    ) -> None:
        try:
            result = await change
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except Exception as exc:
            if not outcome.done():
                outcome.set_exception(exc)
            return
        timed = self._on_delivered is not None and isinstance(result, SendResult)
        committed = perf_counter() if timed else 0.0
        if not outcome.done():
            outcome.set_result(result)  # the caller is answered before the push
        try:
            pushed = await self.push(deliveries(result))
            if pushed and timed and self._on_delivered is not None:
                self._on_delivered(perf_counter() - committed)
        except Exception:  # a bug, not a bus failure (push takes those)
            log.exception("push failed")

    async def push(self, deliveries: list[Delivery]) -> bool:
        """Best effort: a bus failure is logged, never raised to the committed caller. True if
        frames were published."""
        if not deliveries:
            return False
        frames = [(channels.device(d.device), inbox_frame(d.iseq, d.raw)) for d in deliveries]
        try:  # a device's connection on this node gets its frames at once (the hub resyncs a
            # device whose connection moved to another node while frames went to the old one)
            await self._bus.publish_many(frames, local_first=True)
        except PigeonError as exc:
            if not self._held:  # an outage's first failure; the retrier reports the rest
                log.warning("push of %d frames failed (inbox keeps them): %s", len(frames), exc)
            self._hold(frames)
            return False
        return True

    def _hold(self, frames: list[tuple[str, bytes]]) -> None:
        self._dropped += max(0, len(self._held) + len(frames) - MAX_HELD)
        self._held.extend(frames)
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._publish_held())

    async def _publish_held(self) -> None:
        for delay in self._delays:
            await asyncio.sleep(delay)  # backoff while the bus is down, not synchronisation
            if self._dropped:  # reported once per round, not per failed push
                log.warning("dropped %d held frames (their inboxes keep them)", self._dropped)
                self._dropped = 0
            batch = list(self._held)
            self._held = deque(maxlen=MAX_HELD)
            try:
                await self._bus.publish_many(batch)
            except PigeonError:
                held: deque[tuple[str, bytes]] = deque(batch, maxlen=MAX_HELD)
                self._dropped += max(0, len(batch) + len(self._held) - MAX_HELD)
                held.extend(self._held)  # keep the order: older frames first
                self._held = held
                continue
            log.info("published %d frames held during a bus outage", len(batch))
            if not self._held:
                return
        log.warning("gave up publishing %d held frames (inboxes keep them)", len(self._held))
        self._held.clear()

    async def aclose(self) -> None:
        """Stop pushing and retrying (shutdown): what is unpublished is in the inboxes anyway."""
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
