"""`pinned_postgres` (`pigeon bench ... --postgres-cpu`): the local PostgreSQL's processes on
one core for a run, as they were after; refused clearly for a server on another machine."""

from __future__ import annotations

import asyncpg
import psutil
import pytest

from pigeon.bench.store import PinError, pinned_postgres
from tests.support.postgres import ADMIN_DSN


async def backend_affinity() -> set[int]:
    """The cores of a backend started now (a new connection's process)."""
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return set(psutil.Process(pid).cpu_affinity())
    finally:
        await conn.close()


async def test_postgres_runs_on_the_core_while_pinned_and_as_before_after() -> None:
    before = await backend_affinity()
    cpu = max(before)
    async with pinned_postgres(ADMIN_DSN, cpu):
        assert await backend_affinity() == {cpu}  # the backends it forks inherit the core
    assert await backend_affinity() == before


async def test_a_postgres_on_another_machine_cannot_be_pinned() -> None:
    with pytest.raises(PinError, match="not on this machine"):
        async with pinned_postgres("postgresql://postgres@db.example:5432/postgres", 0):
            pass
