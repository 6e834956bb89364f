"""Redis bus: routes frames between nodes over Redis Pub/Sub, on one server or a Redis Cluster.

On one server it uses PUBLISH / SUBSCRIBE. On a Redis Cluster it uses sharded Pub/Sub
(SPUBLISH / SSUBSCRIBE): a channel lives on the master that owns its key slot, so a frame
crosses exactly one shard instead of being broadcast to every node of the cluster.

Why not redis-py's own pub/sub: its asyncio `ClusterPubSub` (8.1) reads sharded messages by
polling one node at a time (`get_sharded_message(timeout)`), sends one SSUBSCRIBE write per
channel, and reconnects silently inside `get_message` with no hook to learn that frames may have
been lost. So this adapter keeps, per shard (the server, or each cluster master), one dedicated
subscriber connection read by one task, and one publishing connection, on top of redis-py's
low-level `Connection` (RESP2: parsing, AUTH, TLS):

- Subscribing only marks the channel; one writer task sends every pending change in one write
  (one SSUBSCRIBE per slot, or SUBSCRIBE with up to 1000 channels), then a `PING <token>` whose
  answer proves that everything before it was applied. `subscribe` waits for that answer, so a
  thousand concurrent subscribes cost one round trip.
- Publishes queued while a round trip is in flight go out together in the next one (in queue
  order, on one connection: per-channel order is kept, also for concurrent publishers).
- The subscriber connection doubles as the shard's health probe (periodic PING). While a shard
  is down, publishes to it fail at once with `Unavailable`; every network wait is bounded.
- A lost connection is re-established with exponential backoff, every live channel is
  subscribed again, and then the `on_recovered` callbacks run. On a cluster, the slot map is
  re-read (CLUSTER SLOTS) on MOVED, on slot-migration notices and on every reconnect; channels
  whose slot changed owner move to the new master.

Invariant for the node: when `subscribe` returns, the channel is live, or `on_recovered` runs
once it is (the subscription was made during an outage or its confirmation was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisError, ResponseError

from pigeon.domain.errors import Unavailable
from pigeon.ports import Bus, BusHandler

log = logging.getLogger(__name__)

SLOTS = 16384
#: Channels per SUBSCRIBE command on a single server (a cluster needs one per slot anyway).
SUBSCRIBE_CHUNK = 1000
#: At most this often the cluster slot map is re-read when asked repeatedly.
REFRESH_MIN_INTERVAL = 0.2

_Item = tuple[str, bytes]  # (channel, frame)
_Failed = tuple[_Item, Exception]
_Outcome = list[ResponseError | None] | BaseException


class _Wire(Protocol):
    """The part of redis-py's asyncio `Connection` used here (typed for mypy --strict)."""

    @property
    def is_connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def disconnect(self, nowait: bool = False) -> None: ...

    async def can_read(self) -> bool: ...

    def pack_commands(self, commands: Iterable[Sequence[bytes | str | int]]) -> list[bytes]: ...

    async def send_packed_command(
        self, command: list[bytes], check_health: bool = True
    ) -> None: ...

    async def read_response(
        self, disable_decoding: bool = False, timeout: float | None = None
    ) -> Any: ...


class _Verbs:
    """Command and message names: classic pub/sub, or sharded pub/sub on a cluster."""

    def __init__(self, sharded: bool) -> None:
        prefix = b"S" if sharded else b""
        self.publish = prefix + b"PUBLISH"
        self.subscribe = prefix + b"SUBSCRIBE"
        self.unsubscribe = prefix + b"UNSUBSCRIBE"
        self.message = prefix.lower() + b"message"
        self.unsubscribed = prefix.lower() + b"unsubscribe"


class _Dialer:
    """Makes connections from the configured URL (credentials, TLS, db), to any node."""

    def __init__(self, url: str, timeout: float, client_name: str) -> None:
        kwargs: dict[str, Any] = dict(parse_url(url))
        self._cls: Callable[..., Any] = kwargs.pop("connection_class", Connection)
        kwargs.update(
            protocol=2,  # pub/sub messages as plain arrays, no RESP3 push handling
            decode_responses=False,
            # No socket_timeout: redis-py would then write through asyncio.wait_for, which on
            # Python 3.11 can swallow a cancellation. Every wait here is bounded by the caller
            # (asyncio.timeout) or by the listener's PING heartbeat instead.
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # we retry (with backoff) ourselves
            client_name=client_name,
        )
        self._kwargs = kwargs
        self.host: str = kwargs.get("host", "localhost")
        self.port: int = kwargs.get("port", 6379)

    def dial(self, host: str | None = None, port: int | None = None) -> _Wire:
        kwargs = dict(self._kwargs)
        if host is not None:
            kwargs.update(host=host, port=port)
        return cast(_Wire, self._cls(**kwargs))


async def _hang_up(conn: _Wire | None) -> None:
    if conn is not None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await conn.disconnect(nowait=True)


async def _settle(fut: asyncio.Future[bool], timeout: float) -> bool:
    """Wait for a barrier without cancelling it; False if it failed or timed out."""
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)
    except TimeoutError:
        return False


def _resolve(fut: asyncio.Future[bool] | None, ok: bool) -> None:
    if fut is not None and not fut.done():
        fut.set_result(ok)


class _Lost(Exception):
    """The subscriber connection stopped answering or reported an error: start over."""


class _RedisSubscription:
    """A live subscription; `cancel()` stops delivery at once (the UNSUBSCRIBE follows)."""

    __slots__ = ("_bus", "channel", "handler")

    def __init__(self, bus: RedisBus, channel: str, handler: BusHandler) -> None:
        self._bus = bus
        self.channel = channel
        self.handler = handler

    def cancel(self) -> None:
        self._bus._cancel(self)


class _Publisher:
    """One shard's publishing connection. Publishes queued while a round trip is in flight are
    sent together in the next one (one write, then one reply per frame), in queue order."""

    def __init__(self, dial: Callable[[], _Wire], verb: bytes, timeout: float) -> None:
        self._dial = dial
        self._verb = verb
        self._timeout = timeout
        self._conn: _Wire | None = None
        self._queue: list[tuple[str, bytes]] = []
        self._batch: asyncio.Future[_Outcome] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def send(self, items: list[tuple[str, bytes]]) -> list[ResponseError | None]:
        """Publish `items`; per item None or the error Redis answered (e.g. MOVED)."""
        start = len(self._queue)
        self._queue.extend(items)
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        batch = self._batch
        self._wake.set()
        try:
            # The batch ahead of ours and ours each take at most `timeout`.
            async with asyncio.timeout(2 * self._timeout + 1):
                outcome = await asyncio.shield(batch)
        except TimeoutError:
            raise Unavailable("publish timed out") from None
        if isinstance(outcome, BaseException):
            raise Unavailable(f"publish failed: {outcome}") from outcome
        return outcome[start : start + len(items)]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._batch is not None and not self._batch.done():
            self._batch.set_result(Unavailable("bus closed"))
        await _hang_up(self._conn)
        self._conn = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            items, batch = self._queue, self._batch
            self._queue, self._batch = [], None
            outcome: _Outcome
            try:
                async with asyncio.timeout(self._timeout):
                    outcome = await self._round_trip(items)
            except (RedisError, OSError, TimeoutError) as exc:
                outcome = exc
                await _hang_up(self._conn)
                self._conn = None
            except Exception as exc:  # a bug must not leave publishers waiting
                log.exception("redis publisher failed")
                outcome = exc
            if batch is not None and not batch.done():
                batch.set_result(outcome)

    async def _round_trip(self, items: list[tuple[str, bytes]]) -> list[ResponseError | None]:
        conn = self._conn
        if conn is not None and (not conn.is_connected or await conn.can_read()):
            await _hang_up(conn)  # closed by the server (restart) while idle: start afresh
            conn = None
        if conn is None:
            conn = self._conn = self._dial()
            await conn.connect()
        verb = self._verb
        commands = [(verb, channel, frame) for channel, frame in items]
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        out: list[ResponseError | None] = []
        for _ in items:
            try:
                await conn.read_response()
                out.append(None)
            except ResponseError as exc:
                out.append(exc)
        return out


class _Listener:
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

    def resync(self) -> int:
        """Subscribe again whatever the server dropped (slot moves); returns how many. A shard
        that is down subscribes everything when it comes back anyway."""
        if not self.up:
            return 0
        missing = self.channels - self._sent - self._dirty
        self._dirty |= missing
        if missing:
            self._wake.set()
        return len(missing)

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
                await _hang_up(conn)
            bus._request_refresh()
            self._failures += 1
            delay = min(bus._max_backoff, 0.025 * 2**self._failures)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # backoff, with jitter

    async def _session(self, conn: _Wire) -> None:
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
            if not await _settle(self._new_barrier(), setup_timeout):
                raise _Lost("subscriptions not confirmed in time")
            if not self._dirty:
                break
        self.up = True
        self._up_event.set()
        self._failures = 0
        if self._recover_on_up:
            bus._request_refresh()  # the outage may have been a failover: re-read the slots
            bus._recovered()
        self._recover_on_up = True  # from now on, a new session follows an outage
        while True:
            await asyncio.sleep(bus._ping_interval)  # a heartbeat period, not synchronisation
            if not await _settle(self._new_barrier(), bus._timeout):
                raise _Lost("no answer to PING")

    def _down(self) -> None:
        self.up = False
        self._up_event.clear()
        self._sent = set()
        self._unsubscribing = {}
        _resolve(self._next, False)
        self._next = None
        for fut in self._barriers.values():
            _resolve(fut, False)
        self._barriers.clear()

    async def _write(self, conn: _Wire) -> None:
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
        verbs = self._bus._verbs
        return [
            *self._bus._commands(verbs.subscribe, subscribe),
            *self._bus._commands(verbs.unsubscribe, unsubscribe),
        ]

    async def _read(self, conn: _Wire) -> None:
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
                    _resolve(self._barriers.pop(reply[1], None), True)
                elif kind == self._bus._verbs.unsubscribed:
                    self._unsubscribed(reply[1].decode())
            elif type(reply) is bytes:  # PING before any subscription: a plain reply
                _resolve(self._barriers.pop(reply, None), True)

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
        channels count as not subscribed; the slot map refresh puts them where they belong."""
        log.info("redis bus: slot %s moved to %s:%s", exc.slot_id, exc.host, exc.port)

        def elsewhere(channel: str) -> bool:
            return key_slot(channel.encode()) == exc.slot_id

        self._sent = {c for c in self._sent if not elsewhere(c)}
        for channel in [c for c in self._unsubscribing if elsewhere(c)]:
            del self._unsubscribing[channel]
        self._bus._request_refresh()


class _Shard:
    """One Redis server (a cluster master, or the only server): its listener and publisher."""

    def __init__(self, bus: RedisBus, host: str | None, port: int | None) -> None:
        self.listener = _Listener(bus, host, port)
        self.publisher = _Publisher(
            lambda: bus._dialer.dial(host, port), bus._verbs.publish, bus._timeout
        )

    def start(self) -> None:
        self.listener.start()
        self.publisher.start(f"bus-publisher {self.listener.name}")

    async def aclose(self) -> None:
        await self.listener.aclose()
        await self.publisher.aclose()


class RedisBus:
    """The `Bus` over Redis Pub/Sub; `cluster=True` for sharded Pub/Sub on a Redis Cluster
    (`url` names any node). `timeout` bounds every network wait (seconds); a lost connection
    is retried with backoff up to `max_backoff`; connections are probed every
    `ping_interval`."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool,
        timeout: float = 2.0,
        ping_interval: float = 5.0,
        max_backoff: float = 2.0,
    ) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._max_backoff = max_backoff
        self._dialer = _Dialer(url, timeout, "pigeon-bus")
        self._verbs = _Verbs(sharded=cluster)
        self._subs: dict[str, _RedisSubscription] = {}
        self._homes: dict[str, _Shard] = {}  # subscribed channel -> the shard it lives on
        self._shards: dict[str, _Shard] = {}  # "host:port" (or "" for one server) -> shard
        self._slots: list[str] = []  # cluster: owner of each slot, as a `_shards` key
        self._callbacks: list[Callable[[], None]] = []
        self._recover_scheduled = False
        self._refresh_lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_again = False
        self._retiring: set[asyncio.Task[None]] = set()  # shards being closed
        self._opened = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            if self._cluster:
                await self._refresh_topology()
            else:
                self._add_shard("", None, None)
            async with asyncio.timeout(self._timeout * 2):
                await asyncio.gather(*(s.listener.wait_up() for s in self._shards.values()))
        except (TimeoutError, Unavailable) as exc:
            await self.aclose()
            raise Unavailable(f"redis bus: cannot connect: {str(exc) or 'timed out'}") from None
        self._opened = True

    async def aclose(self) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        shards = list(self._shards.values())
        self._shards.clear()
        for shard in shards:
            await shard.aclose()
        await asyncio.gather(*self._retiring)
        self._subs.clear()
        self._homes.clear()

    def on_recovered(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    # -- publish ---------------------------------------------------------------------------

    async def publish(self, channel: str, frame: bytes) -> None:
        await self.publish_many([(channel, frame)])

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        if self._closed:
            raise Unavailable("redis bus is closed")
        failed, moved = await self._publish_grouped(items)
        if moved:  # the slot map is stale: re-read it and try those frames once more
            log.info(
                "redis bus: %d frames met MOVED (%s); re-reading slots", len(moved), moved[0][1]
            )
            await self._refresh_topology()
            failed2, moved2 = await self._publish_grouped([item for item, _ in moved])
            failed += failed2 + moved2
        if failed:
            _, first = failed[0]
            raise Unavailable(f"redis bus: {len(failed)} of {len(items)} frames not sent: {first}")

    async def _publish_grouped(self, items: list[_Item]) -> tuple[list[_Failed], list[_Failed]]:
        """Publish on each shard (concurrently; in order within a shard). Returns the frames
        that failed and those answered with MOVED, each with its error."""
        groups: dict[_Shard | None, list[_Item]] = {}
        for item in items:
            groups.setdefault(self._shard_for(item[0]), []).append(item)
        batches = list(groups.items())
        results: list[list[ResponseError | None] | BaseException]
        if len(batches) == 1:  # the common case: no task to spawn
            try:
                results = [await self._publish_on(*batches[0])]
            except Unavailable as exc:
                results = [exc]
        else:
            calls = (self._publish_on(shard, batch) for shard, batch in batches)
            results = await asyncio.gather(*calls, return_exceptions=True)
        failed: list[_Failed] = []
        moved: list[_Failed] = []
        for (_, batch), result in zip(batches, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failed += [(item, result) for item in batch]
                continue
            for item, error in zip(batch, result, strict=True):
                if isinstance(error, MovedError):
                    moved.append((item, error))
                elif error is not None:
                    failed.append((item, error))
        return failed, moved

    async def _publish_on(
        self, shard: _Shard | None, batch: list[_Item]
    ) -> list[ResponseError | None]:
        if shard is None:
            raise Unavailable("no master owns the channel's slot")
        if not shard.listener.up:
            raise Unavailable(f"{shard.listener.name} is unreachable")
        return await shard.publisher.send(batch)

    # -- subscribe -------------------------------------------------------------------------

    async def subscribe(self, channel: str, handler: BusHandler) -> _RedisSubscription:
        if self._closed:
            raise Unavailable("redis bus is closed")
        shard = self._homes.get(channel) or self._shard_for(channel)
        if shard is None:
            raise Unavailable("redis bus: no master owns this channel's slot")
        sub = _RedisSubscription(self, channel, handler)
        self._subs[channel] = sub
        if channel not in self._homes:
            self._homes[channel] = shard
            shard.listener.add(channel)
        barrier = shard.listener.barrier()
        if barrier is not None:
            await _settle(barrier, self._timeout)
        return sub

    def _cancel(self, sub: _RedisSubscription) -> None:
        if self._subs.get(sub.channel) is not sub:
            return  # cancelled already, or replaced by a newer subscription
        del self._subs[sub.channel]
        shard = self._homes.pop(sub.channel, None)
        if shard is not None:
            shard.listener.remove(sub.channel)

    # -- shards and slots ------------------------------------------------------------------

    def _shard_for(self, channel: str) -> _Shard | None:
        if not self._cluster:
            return self._shards.get("")
        if not self._slots:
            return None  # not opened yet
        return self._shards.get(self._slots[key_slot(channel.encode())])

    def _commands(self, verb: bytes, channels: list[str]) -> list[tuple[bytes | str, ...]]:
        """(S)SUBSCRIBE commands for `channels`: one per slot on a cluster (a command may not
        span slots), chunks of SUBSCRIBE_CHUNK channels otherwise."""
        if not channels:
            return []
        if self._cluster:
            by_slot: dict[int, list[str]] = {}
            for channel in channels:
                by_slot.setdefault(key_slot(channel.encode()), []).append(channel)
            return [(verb, *group) for group in by_slot.values()]
        return [
            (verb, *channels[i : i + SUBSCRIBE_CHUNK])
            for i in range(0, len(channels), SUBSCRIBE_CHUNK)
        ]

    def _add_shard(self, key: str, host: str | None, port: int | None) -> _Shard:
        shard = _Shard(self, host, port)
        self._shards[key] = shard
        shard.start()
        return shard

    def _request_refresh(self) -> None:
        """Re-read the cluster's slot map soon (requests coalesce; at most every 0.2 s)."""
        if not self._cluster or self._closed:
            return
        if self._refresher is not None and not self._refresher.done():
            self._refresh_again = True
            return
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            self._refresh_again = False
            try:
                await self._refresh_topology()
            except Unavailable as exc:
                log.debug("redis bus: slot map refresh failed: %s", exc)
            await asyncio.sleep(REFRESH_MIN_INTERVAL)  # a rate limit, not synchronisation
            if not self._refresh_again:
                return

    async def _refresh_topology(self) -> None:
        async with self._refresh_lock:
            slots = await self._fetch_slots()
            same = [owner[0] if owner else "" for owner in slots] == self._slots
            touched = set() if same else self._apply_slots(slots)
            touched |= {s.listener for s in self._shards.values() if s.listener.resync()}
            if self._opened:
                for listener in touched:
                    # Frames for the moved channels may have been lost: once they are live
                    # again, the node resyncs (a shard that is down does it when it is up).
                    barrier = listener.barrier()
                    if barrier is not None:
                        barrier.add_done_callback(lambda _: self._recovered())

    async def _fetch_slots(self) -> list[tuple[str, str, int] | None]:
        """Owner of each slot (key, host, port) per CLUSTER SLOTS, from the first node that
        answers: the known masters, then the URL's node."""
        known = sorted(self._shards.values(), key=lambda s: not s.listener.up)  # live ones first
        candidates = [(s.listener.host, s.listener.port) for s in known if s.listener.host]
        candidates.append((self._dialer.host, self._dialer.port))
        error: Exception | None = None
        for host, port in candidates:
            conn = self._dialer.dial(host, port)
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.connect()
                    command = conn.pack_commands([(b"CLUSTER", b"SLOTS")])
                    await conn.send_packed_command(command, check_health=False)
                    reply = await conn.read_response()
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                continue
            finally:
                await _hang_up(conn)
            return _parse_slots(reply, host or self._dialer.host)
        raise Unavailable(f"redis bus: no cluster node answered CLUSTER SLOTS: {error}")

    def _apply_slots(self, slots: list[tuple[str, str, int] | None]) -> set[_Listener]:
        """Adopt a new slot map: start new masters, move channels whose slot changed owner,
        retire masters that own nothing. Returns the listeners that received channels."""
        for owner in set(slots):
            if owner is not None and owner[0] not in self._shards:
                self._add_shard(*owner)
        self._slots = [owner[0] if owner else "" for owner in slots]
        touched: set[_Listener] = set()
        for channel, home in list(self._homes.items()):
            shard = self._shard_for(channel)
            if shard is None or shard is home:
                continue  # an uncovered slot stays where it was until the map heals
            home.listener.remove(channel)
            self._homes[channel] = shard
            shard.listener.add(channel)
            touched.add(shard.listener)
        masters = set(self._slots)
        for key, shard in list(self._shards.items()):
            if key not in masters and not shard.listener.channels:
                del self._shards[key]
                task = asyncio.get_running_loop().create_task(shard.aclose())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        return touched

    def _recovered(self) -> None:
        """Run the `on_recovered` callbacks soon (once, however many shards recovered)."""
        if self._closed or self._recover_scheduled:
            return
        self._recover_scheduled = True
        asyncio.get_running_loop().call_soon(self._run_recovered)

    def _run_recovered(self) -> None:
        self._recover_scheduled = False
        if self._closed:
            return
        log.info("redis bus recovered: %d channels live again", len(self._subs))
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("bus recovery callback failed")


def _parse_slots(reply: list[Any], asked: str) -> list[tuple[str, str, int] | None]:
    """CLUSTER SLOTS -> the master of each slot as (key, host, port); None if uncovered."""
    slots: list[tuple[str, str, int] | None] = [None] * SLOTS
    for start, end, master, *_ in reply:
        host = master[0].decode() or asked  # empty: the node we asked
        port = int(master[1])
        owner = (f"{host}:{port}", host, port)
        slots[start : end + 1] = [owner] * (end - start + 1)
    return slots


_check: type[Bus] = RedisBus
