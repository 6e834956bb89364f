"""Keyed turns: calls made with the same key run one at a time, in the order they were made.

Used wherever per-key order matters and the work awaits: a device's attaches on a node (the last
connection to start wins). (A device's sends to PostgreSQL keep their order in the keyed group
commit instead, which lets them share a batch.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Turns:
    """One FIFO lock per key (`asyncio.Lock` wakes its waiters first come, first served); the
    lock is dropped with its last user, so idle keys cost nothing."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """Wait for the earlier calls of `key` to finish, then run."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]
