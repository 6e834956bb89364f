"""The registry of this node's live connections, their bus subscriptions and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from pigeon.config import GatewaySettings
from pigeon.domain.errors import PigeonError
from pigeon.gateway.connection import Connection
from pigeon.gateway.errors import Close
from pigeon.ports import Bus, Subscription
from pigeon.services import channels
from pigeon.services.accounts import REVOKED_FRAME
from pigeon.turns import Turns

log = logging.getLogger(__name__)

#: Control frame on a device's channel: "a newer connection of this device exists, elsewhere";
#: followed by the new connection's stamp. Never forwarded to a client.
_REPLACED = b'{"t":"_replaced","by":"'
#: Connections resynced at once after a bus outage (each reads its inbox).
_RESYNC_CONCURRENCY = 32

#: How a node makes one connection catch up from the durable inbox.
Resync = Callable[[], Awaitable[object]]


class Hub:
    """Maps device id -> its one live connection on this node.

    A second connection of the same device replaces the first (`REPLACED`), on this node or,
    through a control frame on the device's channel, on any other. One ticker task serves every
    connection's heartbeat: it pings each `ping_interval`, closes any connection that sent
    nothing (not even a pong) for `idle_timeout`, and any whose queued frames made no progress
    for `stall_timeout` (its peer stopped reading; pings from it do not help). When the bus
    recovers from an outage (frames may have been lost), every connection catches up from its
    inbox.
    """

    def __init__(self, bus: Bus, settings: GatewaySettings) -> None:
        self._bus = bus
        self._settings = settings
        self._conns: dict[str, tuple[Connection, Subscription]] = {}
        self._resyncs: dict[Connection, Resync] = {}
        self._attaching = Turns()
        self._ticker: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._per_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def admit(self, address: str) -> bool:
        """Count one more WebSocket from `address`, unless it holds its maximum already."""
        cap = self._settings.max_connections_per_address
        held = self._per_address.get(address, 0)
        if cap and held >= cap:
            return False
        self._per_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        """One WebSocket from `address` ended."""
        held = self._per_address.get(address, 0) - 1
        if held > 0:
            self._per_address[address] = held
        else:
            self._per_address.pop(address, None)

    def get(self, device_id: str) -> Connection | None:
        entry = self._conns.get(device_id)
        return None if entry is None else entry[0]

    async def attach(self, conn: Connection, resync: Resync) -> None:
        """Register a connection and route its device's frames to it; `resync` makes it catch
        up from the inbox after a bus outage. Attaches of one device run one at a time, so the
        last one to start is the one left registered and subscribed."""
        async with self._attaching.turn(conn.device.id):
            await self._attach(conn, resync)

    async def _attach(self, conn: Connection, resync: Resync) -> None:
        device_id = conn.device.id
        channel = channels.device(device_id)
        # Wall-clock nanoseconds (fixed width, then a random tail against ties): newer
        # connections carry greater stamps, so a late control frame of an older connection (a
        # slow publish) never closes a newer one, on any node whose clock is in step.
        stamp = f"{time.time_ns():020d}{random.getrandbits(16):04x}".encode()

        def on_frame(frame: bytes) -> None:
            if frame.startswith(_REPLACED):
                if frame[len(_REPLACED) : len(_REPLACED) + len(stamp)] > stamp:
                    conn.close(Close.REPLACED, "replaced by a newer connection")
            elif frame == REVOKED_FRAME:
                conn.close(Close.REVOKED, "device revoked")
            else:
                conn.push(frame)

        if conn.closing:
            return
        # Subscribe first: if that fails, the older connection is left as it was. On this node
        # the new subscription takes the channel over from the older one's (bus contract).
        sub = await self._bus.subscribe(channel, on_frame)
        if conn.closing:  # the client went away while we subscribed
            sub.cancel()
            return
        old = self._conns.pop(device_id, None)
        self._conns[device_id] = (conn, sub)
        self._resyncs[conn] = resync
        conn.on_close(self.detach)
        if old is not None:
            old[1].cancel()  # a no-op for the bus: the channel is the new subscription's now
            old[0].close(Close.REPLACED, "replaced by a newer connection")
        try:  # an older connection on another node: best effort, like every bus frame
            await self._bus.publish(channel, _REPLACED + stamp + b'"}')
        except PigeonError as exc:
            log.warning("could not announce the new connection of %s: %s", device_id, exc)

    def detach(self, conn: Connection) -> None:
        """Forget a connection (if it is still the registered one)."""
        self._resyncs.pop(conn, None)
        entry = self._conns.get(conn.device.id)
        if entry is not None and entry[0] is conn:
            del self._conns[conn.device.id]
            entry[1].cancel()

    def _bus_recovered(self) -> None:
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
        self._recovery = asyncio.get_running_loop().create_task(self._resync_all())

    async def _resync_all(self) -> None:
        """Catch every connection up, a few at a time: their inboxes hold what the bus lost."""
        log.info("bus recovered: resyncing %d connections", len(self._resyncs))
        gate = asyncio.Semaphore(_RESYNC_CONCURRENCY)

        async def one(conn: Connection, resync: Resync) -> None:
            async with gate:
                if not conn.closing:
                    with contextlib.suppress(Exception):  # a failed sync closes the connection
                        await resync()

        await asyncio.gather(*(one(c, r) for c, r in list(self._resyncs.items())))

    def start(self) -> None:
        self._bus.on_recovered(self._bus_recovered)
        self._ticker = asyncio.create_task(self._tick_forever(), name="heartbeat")

    async def aclose(self) -> None:
        """Close every connection with GOING_AWAY so clients reconnect (elsewhere)."""
        for task in (self._ticker, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for conn, sub in list(self._conns.values()):
            sub.cancel()
            conn.close(Close.GOING_AWAY, "server shutting down")
        self._conns.clear()
        self._resyncs.clear()

    async def _tick_forever(self) -> None:
        s = self._settings
        period = min(s.ping_interval, s.idle_timeout, s.stall_timeout) / 3
        loop = asyncio.get_running_loop()
        last_ping = loop.time()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            ping = now - last_ping >= s.ping_interval
            if ping:
                last_ping = now
            for conn, _ in list(self._conns.values()):
                if now - conn.last_recv > s.idle_timeout:
                    conn.close(Close.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                elif conn.stalled(now, s.stall_timeout):
                    log.info("device %s reads nothing, disconnecting", conn.device.id)
                    conn.close(Close.SLOW_CONSUMER, "stalled: frames not read")
                elif ping:
                    conn.ping()
