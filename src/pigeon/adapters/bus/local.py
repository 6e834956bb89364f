"""In-process bus: the reference implementation of the `Bus` contract for a single node."""

from __future__ import annotations

import logging

from pigeon.ports import Bus, BusHandler

log = logging.getLogger(__name__)


class _LocalSubscription:
    def __init__(self, bus: LocalBus, device_id: str, handler: BusHandler) -> None:
        self._bus = bus
        self.device_id = device_id
        self.handler = handler

    def cancel(self) -> None:
        self._bus._unsubscribe(self)


class LocalBus:
    """Delivers synchronously to handlers subscribed in this process (last subscriber wins)."""

    def __init__(self) -> None:
        self._subs: dict[str, _LocalSubscription] = {}

    async def publish(self, device_id: str, frame: bytes) -> None:
        self._deliver(device_id, frame)

    async def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        for device_id, frame in items:
            self._deliver(device_id, frame)

    async def subscribe(self, device_id: str, handler: BusHandler) -> _LocalSubscription:
        sub = _LocalSubscription(self, device_id, handler)
        self._subs[device_id] = sub
        return sub

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        self._subs.clear()

    def _deliver(self, device_id: str, frame: bytes) -> None:
        sub = self._subs.get(device_id)
        if sub is None:
            return
        try:
            sub.handler(frame)
        except Exception:  # a broken handler must not break the publisher
            log.exception("bus handler for %s failed", device_id)

    def _unsubscribe(self, sub: _LocalSubscription) -> None:
        if self._subs.get(sub.device_id) is sub:
            del self._subs[sub.device_id]


_check: type[Bus] = LocalBus
