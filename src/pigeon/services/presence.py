"""Presence: online / last seen, subscriptions with privacy, and flap suppression.

A user is online while one of their devices holds a live connection. Going online is announced
at once; going offline only after `grace` seconds without a new connection, so a phone that
reconnects within the grace period never shows as offline. Announcements travel on the user's
presence channel of the bus, which each node subscribes to while it has local subscribers of
that user; a node then hands the frame to those subscribers' connections.

With a registry shared by several nodes, each node refreshes its own sessions every third of
the session TTL and reaps sessions nobody refreshed: a node that died without saying goodbye
takes its users offline within the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pigeon.domain.errors import BadRequest, PigeonError
from pigeon.domain.events import PresenceFrame, encode_frame
from pigeon.domain.ids import is_id
from pigeon.domain.models import Device, PresenceRecord, Visibility
from pigeon.ports import Bus, Clock, Presence, Store, Subscription
from pigeon.services import channels
from pigeon.services.peers import require_peers
from pigeon.services.throttle import Throttle

log = logging.getLogger(__name__)

#: Attempts to announce a recorded change while the store or the bus is down (about 3.5 min).
_ANNOUNCE_RETRIES = 12

#: Where a node hands presence frames for one subscribing connection.
Sink = Callable[[bytes], None]


class PresenceService:
    """Connect/disconnect hooks, subscriptions and visibility; one per node."""

    def __init__(
        self,
        registry: Presence,
        store: Store,
        bus: Bus,
        clock: Clock,
        *,
        grace: float,
        max_subscriptions: int,
        session_ttl: float,
        throttle: Throttle | None = None,
    ) -> None:
        self._throttle = throttle
        self._registry = registry
        self._store = store
        self._bus = bus
        self._clock = clock
        self._grace = grace
        self._max_subs = max_subscriptions
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, set[Sink]] = {}
        self._bus_subs: dict[str, Subscription] = {}
        self._watching: dict[Sink, set[str]] = {}
        self._ttl = session_ttl
        self._sessions: dict[str, str] = {}  # this node's live sessions -> user
        self._ticker: asyncio.Task[None] | None = None
        self._retries: set[asyncio.Task[None]] = set()

    # -- sessions --------------------------------------------------------------------------

    async def connected(self, device: Device, session: str) -> None:
        """A connection of `device` went live."""
        pending = self._pending.pop(device.user_id, None)
        if pending is not None:
            pending.cancel()
        self._sessions[session] = device.user_id
        if await self._registry.session_up(device.user_id, session):
            await self._announce_surely(device.user_id, PresenceRecord(online=True))

    async def disconnected(self, device: Device, session: str, last_seen: int) -> None:
        """A connection ended; `last_seen` is when it last showed a sign of life."""
        self._sessions.pop(session, None)
        if not await self._registry.session_down(device.user_id, session, last_seen):
            return
        user_id = device.user_id
        old = self._pending.pop(user_id, None)
        if old is not None:
            old.cancel()
        self._pending[user_id] = asyncio.get_running_loop().create_task(
            self._offline_after_grace(user_id)
        )

    async def _offline_after_grace(self, user_id: str) -> None:
        await asyncio.sleep(self._grace)  # the grace period itself, not synchronisation
        self._pending.pop(user_id, None)
        await self._confirm_offline(user_id)

    async def _confirm_offline(self, user_id: str) -> None:
        record = await self._registry.confirm_offline(user_id)
        if record is not None:
            await self._announce_surely(user_id, record)

    async def _announce_surely(self, user_id: str, record: PresenceRecord) -> None:
        """Announce a change the registry already recorded (and persist last seen). The
        registry will not report it again, so a failure (store or bus down) is retried here,
        in the background, with backoff."""
        try:
            await self._publish_change(user_id, record)
        except PigeonError as exc:
            log.warning("presence change of %s not announced yet: %s", user_id, exc)
            task = asyncio.get_running_loop().create_task(self._retry_change(user_id, record))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _publish_change(self, user_id: str, record: PresenceRecord) -> None:
        await self._announce(user_id, record)
        if not record.online and record.last_seen is not None:
            await self._store.accounts.set_last_seen(user_id, record.last_seen)

    async def _retry_change(self, user_id: str, record: PresenceRecord) -> None:
        for attempt in range(_ANNOUNCE_RETRIES):
            await asyncio.sleep(min(30.0, 0.5 * 2**attempt))  # backoff, not synchronisation
            try:
                await self._publish_change(user_id, record)
                return
            except PigeonError as exc:
                log.warning("presence change of %s still not announced: %s", user_id, exc)

    def start(self) -> None:
        """Begin refreshing this node's sessions and reaping other nodes' dead ones."""
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)  # a period, not synchronisation
            try:
                await self.tick()
            except Exception as exc:  # the registry is down: try again next period
                log.warning("presence refresh failed: %s", exc)

    async def tick(self) -> None:
        """One heartbeat: keep this node's sessions alive (registering again those the
        registry lost), then confirm offline the users whose sessions expired elsewhere."""
        lost = await self._registry.refresh([(u, s) for s, u in self._sessions.items()])
        for user_id, session in lost:
            if self._sessions.get(session) == user_id:  # still connected here
                log.info("presence session of %s was lost by the registry; registering", user_id)
                try:
                    if await self._registry.session_up(user_id, session):
                        await self._announce_surely(user_id, PresenceRecord(online=True))
                except PigeonError as exc:  # the next tick finds it lost again
                    log.warning("re-registering %s failed: %s", user_id, exc)
        for user_id in await self._registry.reap(self._clock.now_ms()):
            try:
                await self._confirm_offline(user_id)
            except Exception as exc:  # the registry offers the user again on a later reap
                log.warning("confirming %s offline failed: %s", user_id, exc)

    async def aclose(self) -> None:
        """Shutdown: announce pending departures now (the grace timers would die with us)."""
        for task in [self._ticker, *self._retries]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        pending, self._pending = self._pending, {}
        for user_id, task in pending.items():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._confirm_offline(user_id)
        for sub in self._bus_subs.values():
            sub.cancel()
        self._bus_subs.clear()

    # -- visibility ------------------------------------------------------------------------

    async def set_visibility(self, user_id: str, visibility: Visibility) -> None:
        """Change who sees the user's presence; subscribers see the effect at once."""
        await self._store.accounts.set_visibility(user_id, visibility)
        (frame,) = await self._current([user_id])
        await self._bus.publish(channels.presence(user_id), encode_frame(frame))

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, watcher: Device, users: list[str], sink: Sink) -> list[PresenceFrame]:
        """Watch `users` (each must share a chat with the watcher, or be the watcher); returns
        their current state as frames. Changes go to `sink` until `unsubscribe`/`drop`."""
        users = list(dict.fromkeys(users))
        if not users or not all(is_id(u) for u in users):
            raise BadRequest("users must be a non-empty list of user ids")
        if self._throttle is not None:
            await self._throttle.presence_subscribe(watcher.id)
        mine = self._watching.setdefault(sink, set())
        if len(mine | set(users)) > self._max_subs:
            raise BadRequest(f"at most {self._max_subs} presence subscriptions per connection")
        await require_peers(
            self._store.chats,
            watcher.user_id,
            users,
            "presence is visible only to people who share a chat",
        )
        for user_id in users:
            if user_id in mine:
                continue
            mine.add(user_id)
            watchers = self._watchers.setdefault(user_id, set())
            watchers.add(sink)
            if user_id not in self._bus_subs:
                self._bus_subs[user_id] = await self._bus.subscribe(
                    channels.presence(user_id), self._dispatcher(user_id)
                )
        return await self._current(users)

    def unsubscribe(self, sink: Sink, users: list[str]) -> None:
        """Stop watching `users`."""
        mine = self._watching.get(sink, set())
        for user_id in users:
            if user_id in mine:
                mine.discard(user_id)
                self._forget(user_id, sink)

    def drop(self, sink: Sink) -> None:
        """The subscribing connection is gone: end all its subscriptions."""
        for user_id in self._watching.pop(sink, set()):
            self._forget(user_id, sink)

    def _forget(self, user_id: str, sink: Sink) -> None:
        watchers = self._watchers.get(user_id)
        if watchers is None:
            return
        watchers.discard(sink)
        if not watchers:
            del self._watchers[user_id]
            sub = self._bus_subs.pop(user_id, None)
            if sub is not None:
                sub.cancel()

    def _dispatcher(self, user_id: str) -> Callable[[bytes], None]:
        def dispatch(frame: bytes) -> None:
            for sink in list(self._watchers.get(user_id, ())):
                sink(frame)

        return dispatch

    async def _announce(self, user_id: str, record: PresenceRecord) -> None:
        settings = await self._store.accounts.presence_settings([user_id])
        visibility = settings.get(user_id, ("chats", None))[0]
        if visibility == "nobody":
            return  # subscribers already see "unknown" and keep seeing it
        # The user may have come back (or left) while we awaited: announce only what is still
        # true, so a late "offline" never overwrites a newer "online".
        current = (await self._registry.lookup([user_id])).get(user_id)
        if current is None or current.online != record.online:
            return
        await self._bus.publish(channels.presence(user_id), encode_frame(_frame(user_id, record)))

    async def _current(self, users: list[str]) -> list[PresenceFrame]:
        records = await self._registry.lookup(users)
        settings = await self._store.accounts.presence_settings(users)
        frames = []
        for user_id in users:
            visibility, stored_last_seen = settings.get(user_id, ("nobody", None))
            if visibility == "nobody":
                frames.append(PresenceFrame(user=user_id, status="unknown"))
                continue
            record = records.get(user_id) or PresenceRecord(
                online=False, last_seen=stored_last_seen
            )
            if not record.online and record.last_seen is None:
                record = PresenceRecord(online=False, last_seen=stored_last_seen)
            frames.append(_frame(user_id, record))
        return frames


def _frame(user_id: str, record: PresenceRecord) -> PresenceFrame:
    if record.online:
        return PresenceFrame(user=user_id, status="online")
    return PresenceFrame(user=user_id, status="offline", last_seen=record.last_seen)
