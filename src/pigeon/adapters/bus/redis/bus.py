"""`RedisBus`: the `Bus` port over Redis Pub/Sub, on one server or a Redis Cluster.

Why it exists: this is the adapter the node sees. It routes each channel to the shard that
owns it (the server, or the master owning the channel's key slot), spreads publishes over the
shards, keeps the cluster slot map current (on MOVED, slot-migration notices and reconnects,
moving channels whose slot changed owner) and runs the `on_recovered` callbacks once frames may
have been lost. The connections themselves live in `shard.py`, `listener.py` and `publisher.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Collection, Iterable

from redis.crc import key_slot
from redis.exceptions import MovedError, ResponseError

from pigeon.adapters.bus.redis.listener import Listener
from pigeon.adapters.bus.redis.shard import Shard
from pigeon.adapters.bus.redis.slots import REFRESH_MIN_INTERVAL, Owner, fetch_slots
from pigeon.adapters.bus.redis.wire import Dialer, Verbs, log, settle
from pigeon.domain.errors import Unavailable
from pigeon.ports import Bus, BusHandler

_Item = tuple[str, bytes]  # (channel, frame)
_Failed = tuple[_Item, Exception]


class _RedisSubscription:
    """A live subscription; `cancel()` stops delivery at once (the UNSUBSCRIBE follows)."""

    __slots__ = ("_bus", "channel", "handler")

    def __init__(self, bus: RedisBus, channel: str, handler: BusHandler) -> None:
        self._bus = bus
        self.channel = channel
        self.handler = handler

    def cancel(self) -> None:
        self._bus._cancel(self)


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
        self._dialer = Dialer(url, timeout, "pigeon-bus")
        self._verbs = Verbs(sharded=cluster)
        self._subs: dict[str, _RedisSubscription] = {}
        self._homes: dict[str, Shard] = {}  # subscribed channel -> the shard it lives on
        self._shards: dict[str, Shard] = {}  # "host:port" (or "" for one server) -> shard
        self._slots: list[str] = []  # cluster: owner of each slot, as a `_shards` key
        self._callbacks: list[Callable[[Collection[str]], None]] = []
        self._recover_scheduled = False
        #: Channels that may have lost frames, for the next `on_recovered` run.
        self._lost: set[str] = set()
        self._refresh_lock = asyncio.Lock()
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_again = False
        #: Slot-map reads begun (publishes that meet MOVED share the first one begun after they
        #: were sent), for tests and metrics.
        self.slot_reads = 0
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

    def on_recovered(self, callback: Callable[[Collection[str]], None]) -> None:
        self._callbacks.append(callback)

    async def ping(self) -> None:
        """A `PING` on every shard's subscriber connection, the one that delivers frames to
        this node (concurrent pings share one), all shards at once: each must answer within
        the timeout. On a cluster, every slot must also have a master."""
        if self._closed or not self._opened:
            raise Unavailable("redis bus is not open")
        shards = list(self._shards.values())
        answered = await asyncio.gather(*(self._ping_shard(shard) for shard in shards))
        silent = [shard.listener.name for shard, ok in zip(shards, answered, strict=True) if not ok]
        if silent:
            raise Unavailable(f"redis bus: no answer from {', '.join(sorted(silent))}")
        if not shards or (self._cluster and "" in self._slots):
            raise Unavailable("redis bus: some channels have no master to live on")

    async def _ping_shard(self, shard: Shard) -> bool:
        barrier = shard.listener.barrier()  # None while the shard is down
        return barrier is not None and await settle(barrier, self._timeout)

    # -- publish ---------------------------------------------------------------------------

    async def publish(self, channel: str, frame: bytes) -> None:
        await self.publish_many([(channel, frame)])

    async def publish_many(
        self, items: list[tuple[str, bytes]], *, local_first: bool = False
    ) -> None:
        if not items:
            return
        if self._closed:
            raise Unavailable("redis bus is closed")
        if local_first:
            items = self._deliver_here(items)
            if not items:
                return
        reads = self.slot_reads  # those begun before these frames left
        failed, moved = await self._publish_grouped(items)
        if moved:  # the slot map is stale: re-read it and try those frames once more
            log.info(
                "redis bus: %d frames met MOVED (%s); re-reading slots", len(moved), moved[0][1]
            )
            await self._refresh_topology(after=reads)
            failed2, moved2 = await self._publish_grouped([item for item, _ in moved])
            failed += failed2 + moved2
        if failed:
            _, first = failed[0]
            raise Unavailable(f"redis bus: {len(failed)} of {len(items)} frames not sent: {first}")

    def _deliver_here(self, items: list[_Item]) -> list[_Item]:
        """Hand the frames of channels subscribed on this node to their handlers (no round
        trip to Redis and back: a sixth of a PostgreSQL + Redis node's instructions per
        message when its devices are local); returns the others, to publish."""
        others: list[_Item] = []
        for item in items:
            sub = self._subs.get(item[0])
            if sub is None:
                others.append(item)
                continue
            try:
                sub.handler(item[1])
            except Exception:  # a broken handler must not break the publisher
                log.exception("bus handler for %s failed", item[0])
        return others

    async def _publish_grouped(self, items: list[_Item]) -> tuple[list[_Failed], list[_Failed]]:
        """Publish on each shard (concurrently; in order within a shard). Returns the frames
        that failed and those answered with MOVED, each with its error."""
        groups: dict[Shard | None, list[_Item]] = {}
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
        self, shard: Shard | None, batch: list[_Item]
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
            await settle(barrier, self._timeout)
        return sub

    def _cancel(self, sub: _RedisSubscription) -> None:
        if self._subs.get(sub.channel) is not sub:
            return  # cancelled already, or replaced by a newer subscription
        del self._subs[sub.channel]
        shard = self._homes.pop(sub.channel, None)
        if shard is not None:
            shard.listener.remove(sub.channel)

    # -- shards and slots ------------------------------------------------------------------

    def _shard_for(self, channel: str) -> Shard | None:
        if not self._cluster:
            return self._shards.get("")
        if not self._slots:
            return None  # not opened yet
        return self._shards.get(self._slots[key_slot(channel.encode())])

    def _add_shard(self, key: str, host: str | None, port: int | None) -> Shard:
        shard = Shard(self, host, port)
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

    async def _refresh_topology(self, after: int | None = None) -> None:
        """Re-read the slot map and follow it. With `after` (the reads begun when the caller
        sent what met MOVED): nothing if a read begun since is done, so the publishes in flight
        when a slot moves share one read (each read opens a connection and walks every
        subscribed channel) instead of queueing one each."""
        async with self._refresh_lock:
            if after is not None and self.slot_reads > after:
                return
            self.slot_reads += 1
            slots = await self._fetch_slots()
            same = [owner[0] if owner else "" for owner in slots] == self._slots
            touched = {} if same else self._apply_slots(slots)
            for shard in self._shards.values():
                dropped = shard.listener.resync()
                if dropped:
                    touched.setdefault(shard.listener, set()).update(dropped)
            if self._opened:
                for listener, moved in touched.items():
                    # Frames for the moved channels may have been lost: once they are live
                    # again, the node resyncs them (a shard that is down resyncs all of its
                    # channels when it is up).
                    barrier = listener.barrier()
                    if barrier is not None:
                        barrier.add_done_callback(functools.partial(self._live_again, moved))

    async def _fetch_slots(self) -> list[Owner | None]:
        """Owner of each slot (key, host, port) per CLUSTER SLOTS, from the first node that
        answers: the known masters, then the URL's node."""
        known = sorted(self._shards.values(), key=lambda s: not s.listener.up)  # live ones first
        candidates = [(s.listener.host, s.listener.port) for s in known if s.listener.host]
        candidates.append((self._dialer.host, self._dialer.port))
        return await fetch_slots(self._dialer, candidates, self._timeout)

    def _apply_slots(self, slots: list[Owner | None]) -> dict[Listener, set[str]]:
        """Adopt a new slot map: start new masters, move channels whose slot changed owner,
        retire masters that own nothing. Returns the listeners that received channels, and
        those channels."""
        for owner in set(slots):
            if owner is not None and owner[0] not in self._shards:
                self._add_shard(*owner)
        self._slots = [owner[0] if owner else "" for owner in slots]
        touched: dict[Listener, set[str]] = {}
        for channel, home in list(self._homes.items()):
            shard = self._shard_for(channel)
            if shard is None or shard is home:
                continue  # an uncovered slot stays where it was until the map heals
            home.listener.remove(channel)
            self._homes[channel] = shard
            shard.listener.add(channel)
            touched.setdefault(shard.listener, set()).add(channel)
        masters = set(self._slots)
        for key, shard in list(self._shards.items()):
            if key not in masters and not shard.listener.channels:
                del self._shards[key]
                task = asyncio.get_running_loop().create_task(shard.aclose())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        return touched

    def _live_again(self, lost: set[str], _: asyncio.Future[bool]) -> None:
        self._recovered(lost)

    def _recovered(self, lost: Iterable[str]) -> None:
        """Run the `on_recovered` callbacks soon with the channels in `lost` (once, however
        many shards recovered meanwhile)."""
        self._lost.update(lost)
        if self._closed or self._recover_scheduled:
            return
        self._recover_scheduled = True
        asyncio.get_running_loop().call_soon(self._run_recovered)

    def _run_recovered(self) -> None:
        self._recover_scheduled = False
        if self._closed:
            return
        lost, self._lost = frozenset(self._lost), set()
        log.info("redis bus recovered: %d channels live again", len(lost))
        for callback in list(self._callbacks):
            try:
                callback(lost)
            except Exception:
                log.exception("bus recovery callback failed")


_check: type[Bus] = RedisBus
