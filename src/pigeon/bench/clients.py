"""Connecting and closing many SDK clients at once, with bounds.

`close_all` bounds each `PigeonClient.close()` in time: on Python 3.11 a close can wait forever
for its cancelled ack task (see the bench report: `asyncio.wait_for` may swallow a cancellation
that races with an ack reply), and a benchmark must end and say so rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial

from pigeon.bench.accounts import bounded
from pigeon.client.client import PigeonClient

CLOSE_TIMEOUT = 10.0


async def connect_all(url: str, tokens: list[str], concurrency: int = 100) -> list[PigeonClient]:
    """One connected client per token (in order)."""

    async def connect(token: str) -> PigeonClient:
        client = PigeonClient(url, token)
        await client.connect(timeout=60)
        return client

    return await bounded(concurrency, [partial(connect, t) for t in tokens])


async def close_all(clients: list[PigeonClient], concurrency: int = 200) -> int:
    """Close every client; returns how many closes did not finish in CLOSE_TIMEOUT."""

    async def close(client: PigeonClient) -> bool:
        # A close cut short by the timeout still finishes (it swallows the cancellation), so
        # tell a timed-out close by the time it took.
        start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.close(), CLOSE_TIMEOUT)
        return time.monotonic() - start < CLOSE_TIMEOUT

    done = await bounded(concurrency, [partial(close, c) for c in clients])
    return done.count(False)
