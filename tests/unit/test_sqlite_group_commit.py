"""The SQLite adapter's writer batches concurrent writes into shared transactions."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from pigeon.adapters.store.sqlite.db import SqliteDb
from pigeon.domain.errors import Conflict, NotFound


def _schema(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")


async def test_concurrent_writes_share_commits_and_failures_stay_isolated(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "g.db", synchronous="FULL")
    await db.open(_schema)

    def insert(k: int):  # type: ignore[no-untyped-def]
        def job(conn: sqlite3.Connection) -> int:
            if k % 10 == 0:
                raise NotFound("every tenth fails")
            conn.execute("INSERT INTO t VALUES (?)", (k,))
            return k

        return job

    results = await asyncio.gather(
        *(db.write(insert(k)) for k in range(1, 501)), return_exceptions=True
    )
    assert sum(isinstance(r, NotFound) for r in results) == 50
    assert db.jobs_committed == 500 and db.commits < 100  # batched, not one fsync each
    count = await db.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0])
    assert count == 450
    with pytest.raises(Conflict):  # a constraint violation maps to Conflict
        await db.write(lambda c: c.execute("INSERT INTO t VALUES (1)"))
    await db.aclose()
