"""The subscribing side of one shard: one connection, its subscriptions, and message dispatch.

Why it exists: redis-py's asyncio pub/sub polls sharded messages one node at a time, sends one
SSUBSCRIBE write per channel and reconnects silently, so lost frames go unnoticed. A `Listener`
owns one subscriber connection per shard, read by one task; it batches (un)subscribes behind a
`PING <token>` barrier, doubles as the shard's health probe, and on reconnect subscribes every
channel again and tells the bus so the node can resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
from typing import TYPE_CHECKING

from redis.crc import key_slot
from redis.exceptions import AskError, RedisError

from pigeon.adapters.bus.redis.slots import channel_commands
from pigeon.adapters.bus.redis.wire import Wire, hang_up, log, resolve, settle

if TYPE_CHECKING:
    from pigeon.adapters.bus.redis.bus import RedisBus


class _Lost(Exception):
    """The subscriber connection stopped answering or reported an error: start over."""


class Listener:
    """One shard's subscriber connection, kept alive by a task: connect, subscribe every
    channel of the shard, then read messages and dispatch them to the bus's handlers.

    `channels` is what should be subscribed; `_sent` what the current connection was told to
    subscribe. A writer task turns the difference (`_dirty` channels) into commands, followed by
    a `PING <token>` barrier when someone waits for the changes to be applied.
    """

    def __init__(self, bus: RedisBus, host: str | None, port: int | None) -> None:
        self._bus = bus
        self.host = host
        self.port = port
        self.channels: set[str] = set()
        self.up = False
        self._up_event = asyncio.Event()
        self._sent: set[str] = set()
        self._dirty: set[str] = set()
        self._unsubscribing: dict[str, int] = {}  # UNSUBSCRIBEs sent, reply not yet read
        #: Slots whose (un)subscribes were refused since the last `_drop_moved`.
        self._moved_slots: set[int] = set()
        self._next: asyncio.Future[bool] | None = None
        self._barriers: dict[bytes, asyncio.Future[bool]] = {}
        self._tokens = itertools.count()
        self._wake = asyncio.Event()
        self._recover_on_up = False
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}" if self.host else "redis"

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"bus-listener {self.name}")

    async def wait_up(self) -> None:
        await self._up_event.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- what should be subscribed ---------------------------------------------------------

    def add(self, channel: str) -> None:
        self.channels.add(channel)
        self._dirty.add(channel)
        self._wake.set()
        if not self.up:
            self._recover_on_up = True  # frames sent meanwhile are lost: tell the node later

    def remove(self, channel: str) -> None:
        self.channels.discard(channel)
        self._dirty.add(channel)
        self._wake.set()

    def barrier(self) -> asyncio.Future[bool] | None:
        """A future that turns True once every change made so far is applied by Redis
        (False if the connection is lost first); None while the shard is down."""
        return self._new_barrier() if self.up else None

    def resync(self) -> set[str]:
        """Subscribe again whatever the server dropped (slot moves); returns those channels. A
        shard that is down subscribes everything when it comes back anyway."""
        if not self.up:
            return set()
        missing = self.channels - self._sent - self._dirty
        self._dirty |= missing
        if missing:
            self._wake.set()
        return missing

    def _new_barrier(self) -> asyncio.Future[bool]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self._wake.set()
        return self._next

    # -- the connection's life -------------------------------------------------------------

    async def _run(self) -> None:
        bus = self._bus
        while True:
            conn = bus._dialer.dial(self.host, self.port)
            try:
                async with asyncio.timeout(bus._timeout):
                    await conn.connect()
                await self._session(conn)
            except (RedisError, OSError, TimeoutError, _Lost) as exc:
                level = logging.WARNING if self.up or self._failures == 0 else logging.DEBUG
                log.log(level, "redis bus connection to %s lost: %s", self.name, exc)
            except Exception:  # a bug: log it, but never leave the shard without a listener
                log.exception("redis bus listener for %s failed", self.name)
            finally:
                self._down()
                await hang_up(conn)
            bus._request_refresh()
            self._failures += 1
            delay = min(bus._max_backoff, 0.025 * 2**self._failures)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # backoff, with jitter

    async def _session(self, conn: Wire) -> None:
        self._sent = set()
        self._dirty = set(self.channels)
        self._wake.set()
        tasks = [
            asyncio.create_task(self._read(conn)),
            asyncio.create_task(self._write(conn)),
            asyncio.create_task(self._keep_alive()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise _Lost("session ended")  # pragma: no cover - every task loops forever
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_alive(self) -> None:
        bus = self._bus
        # Up once every channel known now is subscribed (and those added meanwhile, too).
        setup_timeout = bus._timeout * (1 + len(self.channels) // 10_000)
        while True:
            if not await settle(self._new_barrier(), setup_timeout):
                raise _Lost("subscriptions not confirmed in time")
            if not self._dirty:
                break
        self.up = True
        self._up_event.set()
        self._failures = 0
        if self._recover_on_up:
            bus._request_refresh()  # the outage may have been a failover: re-read the slots
            bus._recovered(self.channels)  # any of them may have lost frames meanwhile
        self._recover_on_up = True  # from now on, a new session follows an outage
        while True:
            await asyncio.sleep(bus._ping_interval)  # a heartbeat period, not synchronisation
            if not await settle(self._new_barrier(), bus._timeout):
                raise _Lost("no answer to PING")

    def _down(self) -> None:
        self.up = False
        self._up_event.clear()
        self._sent = set()
        self._unsubscribing = {}
        resolve(self._next, False)
        self._next = None
        for fut in self._barriers.values():
            resolve(fut, False)
        self._barriers.clear()

    async def _write(self, conn: Wire) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            commands = self._take_changes()
            if self._next is not None:
                token = str(next(self._tokens)).encode()
                self._barriers[token] = self._next
                self._next = None
                commands.append((b"PING", token))
            if commands:
                if not conn.is_connected:  # never let redis-py reconnect behind our back
                    raise _Lost("connection closed")
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)

    def _take_changes(self) -> list[tuple[bytes | str, ...]]:
        subscribe: list[str] = []
        unsubscribe: list[str] = []
        for channel in self._dirty:
            if channel in self.channels:
                if channel not in self._sent:
                    subscribe.append(channel)
                    self._sent.add(channel)
            elif channel in self._sent:
                unsubscribe.append(channel)
                self._sent.discard(channel)
                self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
        self._dirty = set()
        verbs, cluster = self._bus._verbs, self._bus._cluster
        return [
            *channel_commands(verbs.subscribe, subscribe, cluster=cluster),
            *channel_commands(verbs.unsubscribe, unsubscribe, cluster=cluster),
        ]

    async def _read(self, conn: Wire) -> None:
        subs = self._bus._subs
        message = self._bus._verbs.message
        while True:
            try:
                reply = await conn.read_response(timeout=math.inf)
            except AskError as exc:  # MOVED, or ASK (migrating): a (un)subscribe was refused
                self._moved(exc)
                continue
            if type(reply) is list:
                kind = reply[0]
                if kind == message:
                    channel = reply[1].decode()
                    sub = subs.get(channel)
                    if sub is not None:
                        try:
                            sub.handler(reply[2])
                        except Exception:  # a broken handler must not stop the reader
                            log.exception("bus handler for %s failed", channel)
                elif kind == b"pong":
                    resolve(self._barriers.pop(reply[1], None), True)
                elif kind == self._bus._verbs.unsubscribed:
                    self._unsubscribed(reply[1].decode())
            elif type(reply) is bytes:  # PING before any subscription: a plain reply
                resolve(self._barriers.pop(reply, None), True)

    def _unsubscribed(self, channel: str) -> None:
        pending = self._unsubscribing.pop(channel, 0)
        if pending > 1:
            self._unsubscribing[channel] = pending - 1
        if not pending and channel in self._sent:
            # Not asked for: the server dropped it (its slot moved to another master).
            self._sent.discard(channel)
            self._bus._request_refresh()

    def _moved(self, exc: AskError) -> None:
        """A (un)subscribe was refused: its slot belongs (or moves) to another master. Its
        channels count as not subscribed; the slot map refresh puts them where they belong.
        The refusals of one read burst are applied together (each is a pass over every
        channel sent: with many slots moving, one pass per refusal was slots x channels)."""
        log.info("redis bus: slot %s moved to %s:%s", exc.slot_id, exc.host, exc.port)
        if not self._moved_slots:
            asyncio.get_running_loop().call_soon(self._drop_moved)
        self._moved_slots.add(exc.slot_id)

    def _drop_moved(self) -> None:
        moved, self._moved_slots = self._moved_slots, set()

        def elsewhere(channel: str) -> bool:
            return key_slot(channel.encode()) in moved

        self._sent = {c for c in self._sent if not elsewhere(c)}
        for channel in [c for c in self._unsubscribing if elsewhere(c)]:
            del self._unsubscribing[channel]
        self._bus._request_refresh()
