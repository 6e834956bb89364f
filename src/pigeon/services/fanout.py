"""Pushes just-committed inbox entries to the devices' connections over the bus (fast path).

Losing a push is harmless: the entry is already in the device's durable inbox, and the device
heals the gap (by `iseq`) with a resync, or gets it on its next connect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pigeon.domain.errors import PigeonError
from pigeon.domain.events import Delivery, inbox_frame
from pigeon.ports import Bus
from pigeon.services import channels

log = logging.getLogger(__name__)
T = TypeVar("T")


class Fanout:
    """Turns deliveries into device frames and publishes them."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def commit(
        self, change: Coroutine[Any, Any, T], deliveries: Callable[[T], list[Delivery]]
    ) -> T:
        """Run a store change, then push what it committed. Shielded: once started, the push
        happens even if the caller is cancelled (its connection closed mid-command), so nothing
        committed waits for the recipients' next reconnect. Changes started in one order reach
        the store in that order (the shielding tasks start FIFO)."""

        async def run() -> T:
            result = await change
            await self.push(deliveries(result))
            return result

        return await asyncio.shield(run())

    async def push(self, deliveries: list[Delivery]) -> None:
        """Best effort: a bus failure is logged, never raised to the committed caller."""
        if not deliveries:
            return
        frames = [(channels.device(d.device), inbox_frame(d.iseq, d.raw)) for d in deliveries]
        try:
            await self._bus.publish_many(frames)
        except PigeonError as exc:
            log.warning("push of %d frames failed (inbox keeps them): %s", len(frames), exc)
