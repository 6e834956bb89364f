"""`ping`, the readiness probe of every Store, Bus and Presence adapter (ports.py): it answers
while the backend works, raises `Unavailable` (or is cut short by its caller's timeout) while the
backend cannot answer, leaves nothing behind when cancelled, and answers again once the backend
is back. The backends here are real: a SQLite file whose write lock another connection holds, a
PostgreSQL cluster and a Redis server frozen with SIGSTOP."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pigeon.adapters.bus.local import LocalBus
from pigeon.adapters.bus.redis import RedisBus
from pigeon.adapters.presence.local import LocalPresence
from pigeon.adapters.presence.redis import RedisPresence
from pigeon.adapters.store.postgres import PostgresStore
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.adapters.store.sqlite import db as sqlite_db
from pigeon.domain.errors import Unavailable
from pigeon.ports import Store
from tests.support.postgres import PgCluster
from tests.support.redis import RedisCluster, RedisServer

#: What a readiness check would give a probe; a frozen backend must not hold it longer.
PROBE_TIMEOUT = 0.5


class Still:
    """A clock that stands still."""

    def now_ms(self) -> int:
        return 1_000_000


async def fails(ping: Callable[[], Awaitable[None]]) -> None:
    """The probe does not answer: it raises `Unavailable` or runs out of time."""
    with pytest.raises((Unavailable, TimeoutError)):
        async with asyncio.timeout(PROBE_TIMEOUT):
            await ping()


async def answers_again(ping: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
    """Ask until the probe answers (a client reconnects with backoff: there is no event)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await ping()
                return
            except (Unavailable, TimeoutError):
                await asyncio.sleep(0.05)


async def test_a_store_answers_while_open_and_not_once_closed(store: Store) -> None:
    await store.ping()
    await store.aclose()
    with pytest.raises(Unavailable):
        await store.ping()


async def test_in_process_bus_and_presence_always_answer() -> None:
    await LocalBus().ping()
    await LocalPresence().ping()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "ping.db", synchronous="NORMAL")
    await s.open()
    yield s
    await s.aclose()


async def test_sqlite_fails_while_its_writer_is_stuck(sqlite_store: SqliteStore) -> None:
    """A write waits for the database lock another process holds: the probe, queued behind it,
    does not come back until the write is through."""
    blocker = sqlite3.connect(sqlite_store.db._path, isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, as a stuck writer would hold it
        await sqlite_store.ping()  # nothing queued: the writer is idle, not stuck
        write = sqlite_store.db.write(lambda conn: conn.execute("CREATE TABLE t (x)"))
        await fails(sqlite_store.ping)
        await fails(sqlite_store.ping)  # the second caller shares the first probe
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await write
    await sqlite_store.ping()


async def test_sqlite_fails_when_its_disk_is_full(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_db, "MIN_FREE_BYTES", 2**62)  # more than any disk has free
    with pytest.raises(Unavailable, match="disk is full"):
        await sqlite_store.ping()
    monkeypatch.undo()
    await sqlite_store.ping()


async def test_sqlite_fails_when_a_commit_it_waited_for_fails(sqlite_store: SqliteStore) -> None:
    """The probe rides with the batch ahead of it: an engine failure of that commit is its
    answer too (here a read-only database stands in for a full or failing disk)."""
    sqlite_store.db._write_conn.execute("PRAGMA query_only = ON")  # type: ignore[union-attr]
    write = sqlite_store.db.write(lambda conn: conn.execute("CREATE TABLE t (x)"))
    with pytest.raises(Unavailable, match="store write failed"):
        await sqlite_store.ping()
    with pytest.raises(Unavailable):
        await write
    sqlite_store.db._write_conn.execute("PRAGMA query_only = OFF")  # type: ignore[union-attr]
    await sqlite_store.ping()


async def test_postgres_fails_while_frozen_and_answers_once_thawed(tmp_path: Path) -> None:
    pg = PgCluster(tmp_path / "pg")
    await pg.start()
    store = PostgresStore(pg.dsn, min_connections=2, max_connections=4, command_timeout=5.0)
    try:
        await store.open()
        await store.ping()
        pg.pause()
        try:
            await fails(store.ping)  # cut short by the caller: its connection is closed
            await fails(store.ping)
        finally:
            pg.resume()
        await answers_again(store.ping)
        assert await store.db.fetchval("SELECT 41 + 1") == 42  # the pool is healthy
    finally:
        await store.aclose()
        await pg.close()


@pytest.fixture
async def frozen_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await server.start()
    yield server
    await server.close()


async def test_redis_bus_and_presence_fail_while_redis_is_frozen(
    frozen_redis: RedisServer,
) -> None:
    bus = RedisBus(
        frozen_redis.url, cluster=False, timeout=PROBE_TIMEOUT / 2, ping_interval=0.3,
        max_backoff=0.2,
    )  # fmt: skip
    presence = RedisPresence(
        frozen_redis.url, cluster=False, session_ttl=30, clock=Still(), timeout=PROBE_TIMEOUT / 2
    )
    await bus.open()
    await presence.open()
    try:
        await bus.ping()
        await presence.ping()
        frozen_redis.pause()
        try:
            await fails(bus.ping)
            await fails(presence.ping)
        finally:
            frozen_redis.resume()
        await answers_again(bus.ping)
        await answers_again(presence.ping)
    finally:
        await bus.aclose()
        await presence.aclose()
    with pytest.raises(Unavailable):
        await bus.ping()


async def test_redis_adapters_answer_on_one_server_and_on_a_cluster(
    redis_url: str, redis_cluster: RedisCluster
) -> None:
    for url, cluster in ((redis_url, False), (redis_cluster.url, True)):
        bus = RedisBus(url, cluster=cluster)
        presence = RedisPresence(url, cluster=cluster, session_ttl=30, clock=Still())
        await bus.open()
        await presence.open()
        try:
            await bus.ping()
            await presence.ping()
        finally:
            await bus.aclose()
            await presence.aclose()
