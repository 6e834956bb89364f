"""The Store contract suite runs against every adapter listed here.

PostgreSQL: one database per test session (`postgres_dsn`, tests/support/postgres.py), migrated
by the first store opened on it and emptied before each test (`empty_database`), so every test
starts from an empty store without paying for a new database or schema.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigeon.adapters.store.postgres import PostgresStore
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.ports import Store
from tests.support.postgres import empty_database

ADAPTERS = ["sqlite", "postgres"]


@pytest.fixture(params=ADAPTERS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, open, empty store of each adapter."""
    if request.param == "sqlite":
        s: Store = SqliteStore(tmp_path / "contract.db", synchronous="NORMAL")
        await s.open()
    elif request.param == "postgres":
        dsn: str = request.getfixturevalue("postgres_dsn")
        s = PostgresStore(dsn, min_connections=1, max_connections=8)
        await s.open()  # migrates on first use
        await empty_database(dsn)
    else:  # pragma: no cover - extended by later adapters
        raise AssertionError(request.param)
    yield s
    await s.aclose()


@pytest.fixture
async def pg_dsn(postgres_dsn: str) -> str:
    """The session's PostgreSQL database, migrated and empty, for tests that open stores of
    their own (several nodes)."""
    s = PostgresStore(postgres_dsn, min_connections=1, max_connections=1)
    await s.open()
    await s.aclose()
    await empty_database(postgres_dsn)
    return postgres_dsn


@pytest.fixture
async def pg_store(pg_dsn: str) -> AsyncIterator[PostgresStore]:
    """An open, empty PostgreSQL store (for PostgreSQL-only tests)."""
    s = PostgresStore(pg_dsn, min_connections=1, max_connections=8)
    await s.open()
    yield s
    await s.aclose()
