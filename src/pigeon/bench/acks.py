"""Acks as the Python SDK sends them, for the benches' raw WebSocket generators.

One copy of the SDK's policy (`PigeonClient._ack_loop`, docs/protocol.md "What the Python SDK
does"), so the benches cause the ack traffic a real client causes and follow it when it
changes: acks are cumulative; a message among the unacked events is acked within `ACK_DELAY`;
when only receipts and notices are unacked, the device waits up to `LAZY_ACK_DELAY` for its next
`send` to carry the ack (`ride`), else sends the `ack` alone.
"""

from __future__ import annotations

import asyncio

from pigeon.bench.wire import WireSocket

ACK_DELAY = 0.005  # the SDK's ack_interval
LAZY_ACK_DELAY = 2.0  # the SDK's lazy_ack_interval: receipts wait for a send to carry the ack


class Acker:
    """One device's acks on its socket `sock` (set once connected).

    `rid` numbers the device's string request ids: acks use `a<n>`, so a subclass that sends
    requests of its own (`c<n>`) shares the counter and the replies never collide.
    """

    __slots__ = ("ack_at", "ack_soon", "acked", "last_iseq", "loop", "rid", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock: WireSocket | None = None
        self.last_iseq = 0
        self.acked = 0
        self.ack_at: asyncio.TimerHandle | None = None
        #: Whether the pending ack is the short one (a message is among what it acks).
        self.ack_soon = False
        self.rid = 0

    def on_event(self, iseq: int, message: bool) -> None:
        """An event arrived: a message is acked within `ACK_DELAY`, anything else within
        `LAZY_ACK_DELAY` unless a send carries the ack first or a message comes meanwhile."""
        self.last_iseq = iseq
        if message and not self.ack_soon:
            if self.ack_at is not None:
                self.ack_at.cancel()
            self.ack_at = self.loop.call_later(ACK_DELAY, self.ack)
            self.ack_soon = True
        elif self.ack_at is None:
            self.ack_at = self.loop.call_later(LAZY_ACK_DELAY, self.ack)

    def ack(self) -> None:
        """Send the cumulative ack now, if anything is unacked."""
        self.ack_at, self.ack_soon = None, False
        if self.last_iseq > self.acked and self.sock is not None:
            self.acked = self.last_iseq
            self.rid += 1
            self.sock.send(b'{"t":"ack","rid":"a%d","upto":%d}' % (self.rid, self.acked))

    def ride(self) -> bytes:
        """The `ack` field for the device's next `send` (the SDK's riding ack), or nothing. A
        timer still pending then finds nothing left to ack, or what came since."""
        if self.last_iseq <= self.acked:
            return b""
        self.acked = self.last_iseq
        return b',"ack":%d' % self.acked

    @property
    def ack_pending(self) -> bool:
        """Whether an ack is still to go (a drain waits for it)."""
        return self.ack_at is not None and self.last_iseq > self.acked

    def cancel(self) -> None:
        """Drop the pending ack (the socket is closing)."""
        if self.ack_at is not None:
            self.ack_at.cancel()
            self.ack_at, self.ack_soon = None, False
