"""The retention sweeper: a cold-path worker that deletes what outlived the retention window."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from pigeon.domain.errors import PigeonError
from pigeon.ports import Clock, MessageStore, SweepStats


class MediaSweep(Protocol):
    """The media part of a sweep (`MediaService.sweep`): attachments and their blobs."""

    async def sweep(self, now: int) -> int: ...


log = logging.getLogger(__name__)


class RetentionSweeper:
    """Every `interval` seconds, delete messages and inbox entries older than `retention`, and
    attachments past the retention or never sent (with their blobs)."""

    def __init__(
        self,
        store: MessageStore,
        clock: Clock,
        retention_seconds: float,
        interval: float,
        media: MediaSweep | None = None,
    ) -> None:
        self._store = store
        self._media = media
        self._clock = clock
        self._retention_ms = int(retention_seconds * 1000)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[SweepStats]] = []

    async def next_sweep(self) -> SweepStats:
        """Wait for the background loop to complete its next sweep (for tests and tooling)."""
        fut: asyncio.Future[SweepStats] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    async def sweep_once(self) -> SweepStats:
        """One full sweep, in bounded chunks."""
        now = self._clock.now_ms()
        stats = await self._store.sweep(now - self._retention_ms)
        attachments = await self._media.sweep(now) if self._media is not None else 0
        if stats.messages or stats.inbox_entries or attachments:
            log.info(
                "retention sweep removed %d messages, %d inbox entries, %d attachments",
                stats.messages,
                stats.inbox_entries,
                attachments,
            )
        return stats

    def start(self) -> None:
        """Run forever in the background until `aclose`."""
        self._task = asyncio.create_task(self._run(), name="retention-sweeper")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                stats = await self.sweep_once()
            except PigeonError as exc:
                log.warning("retention sweep failed, will retry: %s", exc)
            except Exception:  # e.g. a blob directory not writable: keep the sweeper alive
                log.exception("retention sweep failed, will retry")
            else:
                waiters, self._waiters = self._waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(stats)
            await asyncio.sleep(self._interval)
