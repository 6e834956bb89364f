"""Connecting and closing many SDK clients at once, with bounds.

`close_all` bounds each `PigeonClient.close()` in time: a benchmark must end, and report a close
that hung (the SDK once could, on Python 3.11, when `asyncio.wait_for` swallowed a cancellation
racing with an ack reply) rather than hang itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial

from pigeon.bench.accounts import bounded
from pigeon.client.client import PigeonClient

CLOSE_TIMEOUT = 10.0


async def connect_all(
    url: str | list[str], tokens: list[str], concurrency: int = 100
) -> list[PigeonClient]:
    """One connected client per token (in order), to `url` or to the node `url[i]` of each."""
    urls = [url] * len(tokens) if isinstance(url, str) else url

    async def connect(node: str, token: str) -> PigeonClient:
        client = PigeonClient(node, token)
        await client.connect(timeout=60)
        return client

    jobs: list[Callable[[], Awaitable[PigeonClient]]] = [
        partial(connect, u, t) for u, t in zip(urls, tokens, strict=True)
    ]
    return await bounded(concurrency, jobs)


async def close_all(clients: list[PigeonClient], concurrency: int = 200) -> int:
    """Close every client; returns how many closes did not finish in CLOSE_TIMEOUT."""

    async def close(client: PigeonClient) -> bool:
        start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await client.close()
        return time.monotonic() - start < CLOSE_TIMEOUT

    done = await bounded(concurrency, [partial(close, c) for c in clients])
    return done.count(False)
