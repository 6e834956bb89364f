"""The registry of this node's live connections, their bus subscriptions and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from pathlib import Path
from typing import Any

from pigeon.config import GatewaySettings, Settings
from pigeon.domain.errors import PigeonError
from pigeon.gateway.connection import Connection
from pigeon.gateway.errors import Close
from pigeon.ports import Bus, Subscription
from pigeon.services import channels
from pigeon.services.accounts import DISABLED_FRAME, REVOKED_FRAME
from pigeon.turns import Turns

log = logging.getLogger(__name__)

#: Control frame on a device's channel: "a newer connection of this device exists, elsewhere";
#: followed by the new connection's stamp. Never forwarded to a client.
_REPLACED = b'{"t":"_replaced","by":"'
#: A device's connection left a node: whoever holds a newer one catches it up from the inbox,
#: since that node's deliveries went to the old connection only (`Bus.publish_many`,
#: `local_first`) until it left.
_RESYNC = b'{"t":"_resync"}'
#: Connections resynced at once after a bus outage (each reads its inbox).
_RESYNC_CONCURRENCY = 32

#: How a node makes one connection catch up from the durable inbox.
Resync = Callable[[], Awaitable[object]]

#: A node on the in-process bus listens here, in its data dir, for the close frames that
#: `pigeon admin` (another process, with no bus of its own to publish on) hands it: one line
#: `<device channel> <frame>` each, answered `ok` once published on the node's bus, or
#: `refused`. Only connection-closing frames pass; the socket is its owner's alone (0600).
CONTROL_SOCKET = "admin.sock"
CONTROL_FRAMES = frozenset({REVOKED_FRAME, DISABLED_FRAME})
_CONTROL_CHANNEL = re.compile(rb"d:[0-9A-Za-z]{1,64}")


def control_socket(settings: Settings) -> Path | None:
    """Where a node listens for `pigeon admin`: with the in-process bus only (a shared bus
    reaches every node by itself)."""
    return settings.data_dir / CONTROL_SOCKET if settings.bus.type == "local" else None


def control_line(channel: str, frame: bytes) -> bytes:
    """One request to the control socket."""
    return channel.encode() + b" " + frame + b"\n"


def _clear_socket(path: Path) -> None:
    """Make way for the control socket: a node that died may have left its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


def _own_socket(path: Path) -> int:
    """Keep the socket to its owner (connecting needs write permission); returns its inode."""
    path.chmod(0o600)
    return path.stat().st_ino


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """Is the control socket's peer this process's user (or root)? Linux's SO_PEERCRED; where
    it is missing, the socket's 0600 mode is the only guard."""
    sock = writer.get_extra_info("socket")
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return True
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
    except OSError:
        return False
    return uid in (os.getuid(), 0)


def _remove_socket(path: Path, inode: int) -> None:
    """Remove the control socket, unless a successor's took its place."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


class Hub:
    """Maps device id -> its one live connection on this node.

    A second connection of the same device replaces the first (`REPLACED`), on this node or,
    through a control frame on the device's channel, on any other. One ticker task serves every
    connection's heartbeat: it pings each `ping_interval`, closes any connection that sent
    nothing (not even a pong) for `idle_timeout`, and any whose queued frames made no progress
    for `stall_timeout` (its peer stopped reading; pings from it do not help). When the bus
    recovers from an outage (frames may have been lost), every connection catches up from its
    inbox. With a `control` path (a node on the in-process bus), it relays the close frames
    that `pigeon admin` sends to that socket onto its bus.
    """

    def __init__(self, bus: Bus, settings: GatewaySettings, control: Path | None = None) -> None:
        self._bus = bus
        self._settings = settings
        self._control = control
        self._control_task: asyncio.Task[None] | None = None
        self._conns: dict[str, tuple[Connection, Subscription]] = {}
        self._resyncs: dict[Connection, Resync] = {}
        #: Connections catching up on a `_RESYNC`: whether another one arrived meanwhile.
        self._resyncing: dict[Connection, bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._attaching = Turns()
        self._ticker: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        #: Devices connected here whose frames the bus may have lost, to resync.
        self._lost: set[str] = set()
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
            elif frame == _RESYNC:
                self._resync_one(conn)
            elif frame == REVOKED_FRAME:
                conn.close(Close.REVOKED, "device revoked")
            elif frame == DISABLED_FRAME:
                conn.close(Close.DISABLED, "account disabled")
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
        """Forget a connection (if it is still the registered one). If the device has no other
        connection here, a newer one elsewhere is told to resync (`_RESYNC`)."""
        self._resyncs.pop(conn, None)
        entry = self._conns.get(conn.device.id)
        if entry is not None and entry[0] is conn:
            del self._conns[conn.device.id]
            entry[1].cancel()
            if not self._closing:
                self._spawn(self._announce_left(conn))

    async def _announce_left(self, conn: Connection) -> None:
        try:  # best effort, like every bus frame: a lost one costs latency until a gap shows
            await self._bus.publish(channels.device(conn.device.id), _RESYNC)
        except PigeonError as exc:
            log.warning("could not announce that %s left: %s", conn.device.id, exc)

    def _resync_one(self, conn: Connection) -> None:
        """Catch one connection up from its inbox (again, if asked during a catch-up: a sync
        that read the inbox before the ask may have missed what it is about)."""
        if conn in self._resyncing:
            self._resyncing[conn] = True
            return
        resync = self._resyncs.get(conn)
        if resync is None or conn.closing:
            return
        self._resyncing[conn] = False

        async def run() -> None:
            try:
                while True:
                    with contextlib.suppress(Exception):  # a failed sync closes the connection
                        await resync()
                    if not self._resyncing.get(conn) or conn.closing:
                        return
                    self._resyncing[conn] = False
            finally:
                self._resyncing.pop(conn, None)

        self._spawn(run())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, kept until done (cancelled by `aclose`)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bus_recovered(self, lost: Collection[str]) -> None:
        """The bus may have lost frames of the channels in `lost`: their devices' connections
        on this node catch up (a slot that moved in a Redis Cluster names its own channels
        only; before, every connection of the node resynced for each slot, over and over in
        a rebalance)."""
        for channel in lost:
            device_id = channels.device_of(channel)
            if device_id is not None and device_id in self._conns:
                self._lost.add(device_id)
        if self._lost and (self._recovery is None or self._recovery.done()):
            self._recovery = asyncio.get_running_loop().create_task(self._resync_lost())

    async def _resync_lost(self) -> None:
        """Catch the connections of `_lost` up, a few at a time: their inboxes hold what the
        bus lost. Devices that lose frames again meanwhile go once more, in the next round."""
        gate = asyncio.Semaphore(_RESYNC_CONCURRENCY)

        async def one(conn: Connection, resync: Resync) -> None:
            async with gate:
                if not conn.closing:
                    with contextlib.suppress(Exception):  # a failed sync closes the connection
                        await resync()

        while self._lost:
            devices, self._lost = self._lost, set()
            entries = [self._conns.get(device_id) for device_id in devices]
            targets = [
                (conn, resync)
                for conn, _ in filter(None, entries)
                if (resync := self._resyncs.get(conn)) is not None
            ]
            log.info("bus recovered: resyncing %d connections", len(targets))
            await asyncio.gather(*(one(c, r) for c, r in targets))

    def start(self) -> None:
        self._bus.on_recovered(self._bus_recovered)
        self._ticker = asyncio.create_task(self._tick_forever(), name="heartbeat")
        if self._control is not None:
            self._control_task = asyncio.create_task(
                self._serve_control(self._control), name="admin-socket"
            )

    async def _serve_control(self, path: Path) -> None:
        """Listen on the control socket until cancelled (see `CONTROL_SOCKET`)."""
        try:
            _clear_socket(path)
            server = await asyncio.start_unix_server(self._control_client, path=path)
            inode = _own_socket(path)
        except OSError as exc:  # e.g. a path over the 107 bytes AF_UNIX allows
            log.warning(
                "no admin socket at %s (%s): connections of devices `pigeon admin` revokes"
                " or disables stay open until they reconnect (then they are refused)",
                path,
                exc,
            )
            return
        try:
            async with server:
                await server.serve_forever()
        finally:
            _remove_socket(path, inode)

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not _same_user(writer):  # the 0600 mode comes just after the bind: check the peer
            writer.close()
            return
        try:
            while line := await reader.readline():
                channel, _, frame = line.rstrip(b"\n").partition(b" ")
                ok = frame in CONTROL_FRAMES and _CONTROL_CHANNEL.fullmatch(channel) is not None
                if ok:
                    await self._bus.publish(channel.decode(), frame)
                writer.write(b"ok\n" if ok else b"refused\n")
                await writer.drain()
        except (OSError, ValueError, PigeonError) as exc:  # ValueError: a line over the limit
            log.warning("admin socket request failed: %s", exc)
        finally:
            writer.close()

    async def aclose(self) -> None:
        """Close every connection with GOING_AWAY so clients reconnect (elsewhere)."""
        self._closing = True  # they sync on reconnecting: no `_RESYNC` for each
        for task in (self._ticker, self._recovery, self._control_task, *self._tasks):
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
