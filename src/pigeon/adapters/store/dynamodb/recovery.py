"""The DynamoDB store's cold-path worker: rolls forward sends and events that a crash left
pending.

Why it exists: a send commits in steps (docs/architecture.md, "The message commit"). If the
node dies after the first step, its record stays pending; the sender's retry, the chat's next
sender (an expired chat lock) or a recipient's read (a reservation) finish it, but a chat that
nobody writes to again, whose sender never comes back, would keep its message from its
recipients forever. This worker walks the records written since the last pass (`by_time`)
every `interval` seconds and finishes those still pending after their lease; every node runs
one, and one at a time has the turn. It is started and stopped with the app, beside the
retention sweeper, never on the message path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Protocol

from pigeon.domain.errors import PigeonError
from pigeon.ports import Clock

log = logging.getLogger(__name__)


class Recoverable(Protocol):
    """What the worker drives (`DynamoStore.recover_turn`)."""

    async def recover_turn(self, owner: str, hold_ms: int, overlap_ms: int) -> int | None: ...


class RecoveryWorker:
    """Every `interval` seconds (the first an interval after `start`), a pass of
    `store.recover_turn`: one node's worker at a time
    holds the turn (for two intervals, renewed by each of its passes; another node's worker
    takes it over once it lapses), and reads the records written since the previous pass of
    any node started, minus `overlap_ms` (a record within its lease then, or written while
    that pass read, is looked at again)."""

    def __init__(
        self, store: Recoverable, clock: Clock, interval: float, *, overlap_ms: int = 15_000
    ) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self._overlap_ms = overlap_ms
        self._owner = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[int | None]] = []

    async def recover_once(self) -> int | None:
        """One pass; how many records it finished, None if another node holds the turn."""
        hold_ms = int(2 * self._interval * 1000)
        done = await self._store.recover_turn(self._owner, hold_ms, self._overlap_ms)
        if done:
            log.info("dynamodb recovery finished %d interrupted records", done)
        return done

    async def next_pass(self) -> int | None:
        """Wait for the background loop's next completed pass (for tests)."""
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dynamodb-recovery")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            # an interval first: a node's start (a rolling restart of many) costs no pass
            await asyncio.sleep(self._interval)
            try:
                done = await self.recover_once()
            except PigeonError as exc:
                log.warning("dynamodb recovery failed, will retry: %s", exc)
            except Exception:
                log.exception("dynamodb recovery failed, will retry")
            else:
                waiters, self._waiters = self._waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(done)
