"""Bench users and devices, made through the SDK's REST helpers with bounded concurrency.

Usernames carry a random run tag so a bench can run repeatedly against the same server.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from pigeon.client.http import Account, login, register

PASSWORD = "bench-password-0"
T = TypeVar("T")


async def bounded(limit: int, jobs: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the jobs with at most `limit` at once; results in job order."""
    sem = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def make_devices(
    url: str, users: int, devices_per_user: int, *, total: int | None = None, concurrency: int = 50
) -> tuple[list[Account], float]:
    """Register `users` users and log in `devices_per_user` devices each (stopping at `total`
    devices). Returns the devices, user by user, and the seconds it took."""
    tag = secrets.token_hex(3)
    names = [f"b{tag}-{i}" for i in range(users)]
    start = time.perf_counter()
    await bounded(concurrency, [partial(register, url, n, PASSWORD) for n in names])
    wanted = total if total is not None else users * devices_per_user
    logins = [(name, d) for name in names for d in range(devices_per_user)][:wanted]
    accounts = await bounded(
        concurrency, [partial(login, url, n, PASSWORD, f"bench{d}") for n, d in logins]
    )
    return accounts, time.perf_counter() - start
