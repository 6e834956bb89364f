"""The SQLite adapter's writer batches concurrent writes into shared transactions."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter
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


async def test_a_job_refused_before_writing_costs_its_batch_no_rerun(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "s.db", synchronous="NORMAL")
    await db.open(_schema)
    runs: Counter[int] = Counter()

    def insert(k: int, refuse_after_write: bool = False):  # type: ignore[no-untyped-def]
        def job(conn: sqlite3.Connection) -> int:
            runs[k] += 1
            if k == 300:
                raise NotFound("refused before writing")
            conn.execute("INSERT INTO t VALUES (?)", (k,))
            if refuse_after_write:
                raise Conflict("refused after writing: undone")
            return k

        return job

    async def batch(jobs: list) -> list:  # type: ignore[type-arg]
        """The jobs as one batch: the writer waits inside a first job while they queue up."""
        hold = threading.Event()
        blocker = db.write(lambda conn: hold.wait(5))
        queued = [db.write(job) for job in jobs]
        hold.set()
        await blocker
        return await asyncio.gather(*queued, return_exceptions=True)

    results = await batch([insert(k) for k in range(1000)])
    assert isinstance(results[300], NotFound) and results[299] == 299 and results[301] == 301
    assert db.commits <= 2  # large batches (with the blocker or after it)
    assert sum(runs.values()) == 1000  # nothing to undo, so nothing ran twice

    runs.clear()
    results = await batch([insert(k, refuse_after_write=k == 1005) for k in range(1000, 1010)])
    assert isinstance(results[5], Conflict) and results[9] == 1009
    assert runs[1000] == 2  # a job that had written: its batch ran again, in savepoints
    count = await db.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0])
    assert count == 999 + 9
    await db.aclose()


def _rows_in_database_file(db_path: Path, copy: Path) -> int:
    """Rows of `t` in the main database file alone, as if its WAL were lost: what was
    checkpointed."""
    copy.write_bytes(db_path.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


async def test_an_idle_writer_checkpoints_the_wal_into_the_database_file(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "c.db", synchronous="FULL")
    await db.open(_schema)
    for k in range(8):  # one commit each, nothing queued behind any
        await db.write(lambda conn, k=k: conn.execute("INSERT INTO t VALUES (?)", (k,)))
    # the writer checkpoints after answering; a write queued now runs after that
    await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (8)"))
    assert db.idle_checkpoints == 1
    # far below SQLite's own mark (1,000 pages): only the idle checkpoint put them there
    assert _rows_in_database_file(tmp_path / "c.db", tmp_path / "copy.db") == 8
    await db.aclose()


async def test_a_busy_writer_leaves_its_checkpoint_for_when_nothing_waits(tmp_path: Path) -> None:
    db = SqliteDb(tmp_path / "b.db", synchronous="NORMAL", max_batch=1)
    await db.open(_schema)
    hold = threading.Event()
    blocker = db.write(lambda conn: hold.wait(5))
    queued = [  # 20 commits of one job each, every one with jobs queued behind it but the last
        db.write(lambda conn, k=k: conn.execute("INSERT INTO t VALUES (?)", (k,)))
        for k in range(20)
    ]
    hold.set()
    await blocker
    await asyncio.gather(*queued)
    await db.write(lambda conn: None)  # runs after whatever the writer did after the last
    assert db.commits == 22
    assert db.idle_checkpoints == 1  # once the queue ran dry, not every 8 commits
    await db.aclose()
