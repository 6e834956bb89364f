"""In-process bus: the reference implementation of the `Bus` contract for a single node."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from pigeon.ports import Bus, BusHandler

log = logging.getLogger(__name__)


class _LocalSubscription:
    def __init__(self, bus: LocalBus, channel: str, handler: BusHandler) -> None:
        self._bus = bus
        self.channel = channel
        self.handler = handler

    def cancel(self) -> None:
        self._bus._unsubscribe(self)


class LocalBus:
    """Delivers synchronously to handlers subscribed in this process (last subscriber wins)."""

    def __init__(self) -> None:
        self._subs: dict[str, _LocalSubscription] = {}

    async def publish(self, channel: str, frame: bytes) -> None:
        self._deliver(channel, frame)

    async def publish_many(
        self, items: list[tuple[str, bytes]], *, local_first: bool = False
    ) -> None:
        for channel, frame in items:
            self._deliver(channel, frame)

    async def subscribe(self, channel: str, handler: BusHandler) -> _LocalSubscription:
        sub = _LocalSubscription(self, channel, handler)
        self._subs[channel] = sub
        return sub

    def on_recovered(self, callback: Callable[[Collection[str]], None]) -> None:
        return None  # nothing in between to fail: frames are never lost

    async def ping(self) -> None:
        return None  # nothing in between that could fail to answer

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        self._subs.clear()

    def _deliver(self, channel: str, frame: bytes) -> None:
        sub = self._subs.get(channel)
        if sub is None:
            return
        try:
            sub.handler(frame)
        except Exception:  # a broken handler must not break the publisher
            log.exception("bus handler for %s failed", channel)

    def _unsubscribe(self, sub: _LocalSubscription) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]


_check: type[Bus] = LocalBus
