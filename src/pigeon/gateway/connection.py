"""One device's live WebSocket: a bounded outbound queue, written at the end of each loop turn.

Nothing on the message path ever awaits a peer: publishers call `send`, which only appends to
the queue. A device that falls too far behind is disconnected (`SLOW_CONSUMER`); everything it
missed is in its durable inbox and comes back on reconnect. Only the inbox sync, which produces
frames for this connection alone, waits for queue space (`send_wait`). The queue is bounded in
frames and in bytes (what a connection can pin in memory), and a queue that makes no progress for
`stall_timeout` marks a peer that stopped reading: the hub closes it, pings or not.

The queue is written at the end of the loop turn that filled it, without waiting, while the
peer's socket buffer has room (heartbeat pings too); only a full buffer hands the rest to a
writer task that awaits the drain. So a slow peer still never blocks a publisher, and the
common burst costs a loop callback instead of a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from pigeon.bookkeeping import BOOKKEEPING
from pigeon.domain.models import Device
from pigeon.gateway.errors import Close
from pigeon.gateway.transport import Transport

log = logging.getLogger(__name__)

_PING = object()
#: Frames, and bytes, written with one transport write (one syscall) at most.
_WRITE_BATCH = 256
_WRITE_BYTES = 256 * 1024
_EVENT_PREFIX = b'{"t":"event","iseq":'


def frame_iseq(frame: bytes) -> int:
    """The inbox sequence number of an `event` frame (0 for any other frame)."""
    if not frame.startswith(_EVENT_PREFIX):
        return 0
    start = len(_EVENT_PREFIX)
    return int(frame[start : frame.index(b",", start)])


class Connection:
    """The server side of one authenticated WebSocket."""

    __slots__ = (
        "_closer",
        "_closing",
        "_flush",
        "_held",
        "_held_bytes",
        "_held_overflow",
        "_max",
        "_max_bytes",
        "_on_close",
        "_out",
        "_out_bytes",
        "_progress_at",
        "_space",
        "_writer",
        "device",
        "last_recv",
        "loop",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        device: Device,
        max_frames: int,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.transport = transport
        self.device = device
        #: The loop this connection lives on (looked up once: each lookup is a getpid call).
        self.loop = asyncio.get_running_loop()
        self.last_recv = self.loop.time()
        self._out: deque[bytes | object] = deque()
        self._out_bytes = 0
        self._progress_at = self.last_recv
        self._max = max_frames
        self._max_bytes = max_bytes
        self._held_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._flush: asyncio.Handle | None = None
        self._space: asyncio.Event | None = None
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self._held: list[bytes] | None = None
        self._held_overflow = False
        self._on_close: Callable[[Connection], None] | None = None

    def on_close(self, callback: Callable[[Connection], None]) -> None:
        """Call `callback` once, as soon as this connection starts closing."""
        self._on_close = callback

    @property
    def closing(self) -> bool:
        return self._closing

    def send(self, frame: bytes) -> None:
        """Queue a frame; never blocks. A full queue means a stalled peer: disconnect it."""
        if self._closing:
            return
        if len(self._out) >= self._max or self._out_bytes + len(frame) > self._max_bytes:
            log.info("device %s too slow, disconnecting", self.device.id)
            self.close(Close.SLOW_CONSUMER, "slow consumer")
            return
        self._enqueue(frame)

    async def send_wait(self, frame: bytes) -> None:
        """Queue a frame, waiting while the queue is half full (inbox sync only): the other
        half is headroom for replies and live frames, which never wait."""
        while not self._closing and (
            len(self._out) >= self._max // 2 or self._out_bytes >= self._max_bytes // 2
        ):
            if self._space is None:
                self._space = asyncio.Event()
            await self._space.wait()
        if not self._closing:
            self._enqueue(frame)

    def ping(self) -> None:
        """Queue a WebSocket ping (heartbeat)."""
        if not self._closing:
            self._enqueue(_PING)

    def push(self, frame: bytes) -> None:
        """A frame from the bus. While the inbox sync runs, live inbox events are held back and
        released after it (so the device sees its inbox in order)."""
        if self._held is None or not frame.startswith(_EVENT_PREFIX):
            self.send(frame)  # ephemeral frames (presence, typing) are never held back
        elif len(self._held) < self._max and self._held_bytes + len(frame) <= self._max_bytes:
            self._held.append(frame)
            self._held_bytes += len(frame)
        else:
            # Dropping is safe: these frames are committed to the inbox the sync is reading.
            self._held.clear()
            self._held_bytes = 0
            self._held_overflow = True

    def hold(self) -> None:
        """Start holding live frames back (a sync begins)."""
        if self._held is None:
            self._held = []
        self._held_overflow = False

    def held_overflowed(self) -> bool:
        """True (once) if held frames were dropped since the last check: read the inbox again."""
        overflowed, self._held_overflow = self._held_overflow, False
        return overflowed

    def take_held(self) -> list[bytes]:
        """What was held so far, in arrival order (holding goes on)."""
        held = self._held or []
        if self._held is not None:
            self._held = []
            self._held_bytes = 0
        return held

    def release(self) -> None:
        """Stop holding: live frames go straight to the queue again."""
        self._held = None
        self._held_bytes = 0

    def stalled(self, now: float, timeout: float) -> bool:
        """True if frames wait to be written and none was for `timeout` seconds."""
        return (bool(self._out) or self._writer is not None) and now - self._progress_at > timeout

    def close(self, code: int, reason: str) -> None:
        """Close the socket with `code` (see `Close`); queued frames are dropped."""
        if self._closing:
            return
        self._closing = True
        if self._on_close is not None:
            self._on_close(self)
        self._out.clear()
        self._out_bytes = 0
        if self._space is not None:
            self._space.set()
        if self._writer is not None:
            self._writer.cancel()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._closer = self.loop.create_task(self._close(code, reason))

    async def wait_closed(self) -> None:
        """Finish the close handshake (started by `close`, or a normal one if none was)."""
        if self._closer is None:
            self.close(1000, "bye")
        assert self._closer is not None
        await self._closer

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.transport.close(code, reason)

    def _enqueue(self, item: bytes | object) -> None:
        if isinstance(item, bytes):
            self._out_bytes += len(item)
        self._out.append(item)
        if self._writer is None and self._flush is None:
            loop = self.loop
            self._progress_at = loop.time()  # an idle connection starts the clock afresh
            # At the end of this loop turn, so that the frames queued meanwhile share a write.
            self._flush = loop.call_soon(self._write_now, context=BOOKKEEPING)

    def _write_now(self) -> None:
        """Write what is queued without waiting, as long as the peer's buffer has room; start
        the writer task for the rest (a full buffer). Most bursts never need the task: a task
        per burst cost ~3 task creations per message at moderate load, and a task per ping
        put one per connection in each heartbeat's burst."""
        self._flush = None
        if self._writer is not None or self._closing:
            return
        out = self._out
        try:
            while out:
                if out[0] is _PING:
                    if not self.transport.ping_now():
                        break
                    out.popleft()
                    continue
                batch, size = self._next_batch()
                if not self.transport.write_now(batch):
                    out.extendleft(reversed(batch))
                    break
                self._out_bytes -= size
                self._progress_at = self.loop.time()
                self._wake_waiters()
        except Exception as exc:  # a loop callback: nothing above it would see the failure
            log.debug("write to device %s failed: %r", self.device.id, exc)
            self.close(Close.GOING_AWAY, "write failed")
            return
        if out:
            self._writer = self.loop.create_task(self._drain())

    def _next_batch(self) -> tuple[list[bytes], int]:
        """Take the next frames to write together (the queue's head is a frame, not a ping)."""
        out = self._out
        batch: list[bytes] = [out.popleft()]  # type: ignore[list-item]
        size = len(batch[0])
        while out and out[0] is not _PING and len(batch) < _WRITE_BATCH and size < _WRITE_BYTES:
            frame: bytes = out.popleft()  # type: ignore[assignment]
            batch.append(frame)
            size += len(frame)
        return batch, size

    def _wake_waiters(self) -> None:
        if self._space is not None and (
            len(self._out) < self._max // 2 and self._out_bytes < self._max_bytes // 2
        ):
            self._space.set()
            self._space = None

    async def _drain(self) -> None:
        out = self._out
        try:
            while out:
                if out[0] is _PING:
                    out.popleft()
                    await self.transport.ping()
                    continue
                batch, size = self._next_batch()
                self._out_bytes -= size
                await self.transport.send_texts(batch)
                self._progress_at = self.loop.time()
                self._wake_waiters()
        except (ConnectionError, RuntimeError) as exc:
            log.debug("write to device %s failed: %s", self.device.id, exc)
            self.close(Close.GOING_AWAY, "write failed")
        finally:
            self._writer = None
