"""The registry of this node's live connections, their bus subscriptions and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pigeon.config import GatewaySettings
from pigeon.gateway.connection import Connection
from pigeon.gateway.errors import Close
from pigeon.ports import Bus, Subscription
from pigeon.services import channels
from pigeon.services.accounts import REVOKED_FRAME

log = logging.getLogger(__name__)


class Hub:
    """Maps device id -> its one live connection on this node.

    A second connection of the same device replaces the first (`REPLACED`). One ticker task
    serves every connection's heartbeat: it pings each `ping_interval` and closes any connection
    that sent nothing (not even a pong) for `idle_timeout`.
    """

    def __init__(self, bus: Bus, settings: GatewaySettings) -> None:
        self._bus = bus
        self._settings = settings
        self._conns: dict[str, tuple[Connection, Subscription]] = {}
        self._ticker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._conns)

    def get(self, device_id: str) -> Connection | None:
        entry = self._conns.get(device_id)
        return None if entry is None else entry[0]

    async def attach(self, conn: Connection) -> None:
        """Register a connection and route its device's frames to it."""
        device_id = conn.device.id

        def on_frame(frame: bytes) -> None:
            if frame == REVOKED_FRAME:
                conn.close(Close.REVOKED, "device revoked")
            else:
                conn.push(frame)

        old = self._conns.pop(device_id, None)
        if old is not None:
            old[1].cancel()
            old[0].close(Close.REPLACED, "replaced by a newer connection")
        sub = await self._bus.subscribe(channels.device(device_id), on_frame)
        self._conns[device_id] = (conn, sub)
        conn.on_close(self.detach)

    def detach(self, conn: Connection) -> None:
        """Forget a connection (if it is still the registered one)."""
        entry = self._conns.get(conn.device.id)
        if entry is not None and entry[0] is conn:
            del self._conns[conn.device.id]
            entry[1].cancel()

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_forever(), name="heartbeat")

    async def aclose(self) -> None:
        """Close every connection with GOING_AWAY so clients reconnect (elsewhere)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for conn, sub in list(self._conns.values()):
            sub.cancel()
            conn.close(Close.GOING_AWAY, "server shutting down")
        self._conns.clear()

    async def _tick_forever(self) -> None:
        s = self._settings
        period = min(s.ping_interval, s.idle_timeout) / 3
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
                elif ping:
                    conn.ping()
