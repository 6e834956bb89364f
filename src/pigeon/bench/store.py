"""Shared state for spawned clusters: a fresh PostgreSQL database per run, and the environment
that makes `pigeon serve` use it with Redis for its bus and presence registry.

The database is created on the admin DSN (`PIGEON_BENCH_POSTGRES_DSN`, default the local
`postgres` database) under a random `pigeon_bench_<hex>` name and dropped afterwards, whatever
the run left connected to it. Redis (`PIGEON_BENCH_REDIS_URL`) is shared as is: bench users get
fresh ids every run, so what a run leaves there (sessions expiring on their own) is never read
by the next one.

`service_cpu_seconds` reads the CPU time PostgreSQL and Redis spent, when they run on this
machine: the server's own CPU is only part of a cluster's cost per message. `pinned_postgres`
puts a local PostgreSQL on one core for a run (`--postgres-cpu`), as the cluster's figures are
reported: PostgreSQL on a core of its own, the nodes on another.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import redis.asyncio as aioredis

ADMIN_DSN_ENV = "PIGEON_BENCH_POSTGRES_DSN"
REDIS_URL_ENV = "PIGEON_BENCH_REDIS_URL"
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def admin_dsn() -> str:
    """Where bench databases are created and dropped."""
    return os.environ.get(ADMIN_DSN_ENV, DEFAULT_ADMIN_DSN)


def redis_url() -> str:
    """The Redis spawned clusters use."""
    return os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)


def with_database(dsn: str, name: str) -> str:
    """`dsn` pointing at database `name` (its path replaced, the rest kept)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def fresh_database(admin: str | None = None) -> AsyncIterator[str]:
    """Create an empty database, yield its DSN, drop it (closing its connections) at the end."""
    admin = admin or admin_dsn()
    name = f"pigeon_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(admin, name)
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def shared_state_env(dsn: str, redis: str | None = None) -> dict[str, str]:
    """Environment of a node that shares its state with its peers: PostgreSQL + Redis."""
    return {
        "PIGEON_STORE__TYPE": "postgres",
        "PIGEON_STORE__DSN": dsn,
        "PIGEON_BUS__TYPE": "redis",
        "PIGEON_PRESENCE__TYPE": "redis",
        "PIGEON_REDIS__URL": redis or redis_url(),
    }


class PinError(RuntimeError):
    """PostgreSQL's processes cannot be pinned from here (another machine, or not ours)."""


@contextlib.asynccontextmanager
async def pinned_postgres(dsn: str, cpu: int) -> AsyncIterator[None]:
    """PostgreSQL's processes on core `cpu` while the context lasts: its postmaster and every
    process it runs (the backends it forks meanwhile inherit the core), then each as it was
    (the postmaster's own affinity for those started meanwhile)."""
    if not _local(dsn):
        raise PinError(f"PostgreSQL at {urlsplit(dsn).hostname} is not on this machine")
    conn = await asyncpg.connect(dsn)
    try:  # the backend's parent, read while the backend lives
        postmaster = psutil.Process(int(await conn.fetchval("SELECT pg_backend_pid()"))).parent()
    finally:
        await conn.close()
    if postmaster is None:
        raise PinError("PostgreSQL's postmaster was not found")
    before: dict[int, list[int]] = {}
    try:
        try:
            before[postmaster.pid] = postmaster.cpu_affinity()
            postmaster.cpu_affinity([cpu])  # first: what it forks from now on starts there
            for child in postmaster.children():
                with contextlib.suppress(psutil.NoSuchProcess):  # it may end meanwhile
                    before[child.pid] = child.cpu_affinity()
                    child.cpu_affinity([cpu])
        except psutil.AccessDenied as exc:
            raise PinError(
                f"cannot pin PostgreSQL's processes ({exc}): run as root or as its user"
            ) from None
        yield
    finally:  # also after a refusal half-way: what was pinned goes back
        default = before.get(postmaster.pid)
        if default is not None:
            for p in [postmaster, *postmaster.children()]:
                with contextlib.suppress(psutil.Error):
                    p.cpu_affinity(before.get(p.pid, default))


def _local(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def _cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            out[pid] = float(t.user + t.system)
    return out


CpuSample = dict[str, dict[int, float]]


async def service_cpu(dsn: str, redis: str) -> CpuSample:
    """CPU seconds (user + system) by pid of the PostgreSQL backends connected to `dsn`'s
    database (the nodes' pools; not the shared WAL writer or checkpointer) and of the Redis
    server (whoever else uses it included). Services on another machine are left out."""
    out: CpuSample = {}
    if _local(dsn):
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        out["postgres"] = _cpu([int(r["pid"]) for r in rows])
    if _local(redis):
        client = aioredis.from_url(redis)
        try:
            info = await client.info("server")
        finally:
            await client.aclose()
        out["redis"] = _cpu([int(info["process_id"])])
    return out


def cpu_percent(before: CpuSample, after: CpuSample, seconds: float) -> dict[str, float]:
    """Each service's CPU % (of one core) between two samples; a process that appeared in
    between counts from its start."""
    return {
        name: round(
            100 * sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in pids.items()) / seconds,
            1,
        )
        for name, pids in after.items()
    }
