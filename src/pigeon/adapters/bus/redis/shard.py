"""One shard of the Redis bus: a server (a cluster master, or the only server) and its two
connections.

Why it exists: subscribing and publishing are deliberately kept on separate connections (a
subscriber connection can only (un)subscribe and PING), but they share a lifecycle and an
address; `Shard` pairs them so the bus starts, looks up and retires a master as one unit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pigeon.adapters.bus.redis.listener import Listener
from pigeon.adapters.bus.redis.publisher import Publisher

if TYPE_CHECKING:
    from pigeon.adapters.bus.redis.bus import RedisBus


class Shard:
    """One Redis server (a cluster master, or the only server): its listener and publisher."""

    def __init__(self, bus: RedisBus, host: str | None, port: int | None) -> None:
        self.listener = Listener(bus, host, port)
        self.publisher = Publisher(
            lambda: bus._dialer.dial(host, port), bus._verbs.publish, bus._timeout
        )

    def start(self) -> None:
        self.listener.start()
        self.publisher.start(f"bus-publisher {self.listener.name}")

    async def aclose(self) -> None:
        await self.listener.aclose()
        await self.publisher.aclose()
