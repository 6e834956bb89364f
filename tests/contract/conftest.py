"""The Store contract suite runs against every adapter listed here.

PostgreSQL: one database per test session (`postgres_dsn`, tests/support/postgres.py), migrated
by the first store opened on it and emptied before each test (`empty_database`), so every test
starts from an empty store without paying for a new database or schema.

DynamoDB: one moto server per session (`moto_dynamodb`, of the tests.support.dynamodb plugin
that tests/conftest.py loads) and one set of tables (`DYNAMODB_PREFIX`), created by the first
test and emptied before each (`empty_tables`: a Scan and batched deletes, cheaper on moto than
creating seven tables); the store's client skips its table checks (`tables=()`). The push
modules' helpers know the SQL stores only (`queue_of`, `job_rows` reading the `push_jobs`
table): for a DynamoDB store the fixture teaches them its queue and a view of its job items
(`teach_push_helpers`); a test that reads SQL columns (`select`) is skipped there, as are the
tests in `DYNAMODB_SKIPS`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.postgres import PostgresStore
from pigeon.adapters.store.sqlite import SqliteStore
from pigeon.ports import Store
from tests.support.dynamodb import empty_tables, fresh_prefix, make_db, teach_push_helpers
from tests.support.postgres import empty_database

ADAPTERS = ["sqlite", "postgres", "dynamodb"]

#: The contract tests' DynamoDB tables, on each moto server they were made on.
DYNAMODB_PREFIX = fresh_prefix()
_dynamo_tables_made: set[str] = set()

#: Contract tests that do not apply to the DynamoDB store, and why.
DYNAMODB_SKIPS = {
    "test_idle_jobs_are_forgotten_once_their_window_passed": "idle push jobs are forgotten "
    "by DynamoDB's TTL (lazily, by real time), not by the claim that passes their window",
    "test_before_configure_there_is_no_grace_and_no_window": "its last step counts idle jobs "
    "that only DynamoDB's TTL forgets (test_dynamodb_push.py checks it with the TTL)",
}


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
    elif request.param == "dynamodb":
        if request.node.originalname in DYNAMODB_SKIPS:
            pytest.skip(DYNAMODB_SKIPS[request.node.originalname])
        teach_push_helpers(request.getfixturevalue("monkeypatch"))
        endpoint: str = request.getfixturevalue("moto_dynamodb").endpoint
        if endpoint not in _dynamo_tables_made:
            setup = make_db(endpoint, DYNAMODB_PREFIX)
            await setup.open()  # creates the tables
            await setup.aclose()
            _dynamo_tables_made.add(endpoint)
        s = DynamoStore(make_db(endpoint, DYNAMODB_PREFIX, tables=()))
        await s.open()
        await empty_tables(s.db)
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
