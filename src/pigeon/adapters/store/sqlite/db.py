"""SQLite access from asyncio, with group commit.

All writes run on one writer thread that owns the only write connection. Jobs queued while a
transaction is running are committed together in the next one (group commit), and every caller is
answered only after the shared COMMIT returned. Jobs run back to back; if one raises, the batch is
rolled back and run again with each job in its own SAVEPOINT, so a failing job never takes its
neighbours down (and the common case pays no savepoint statements). With `synchronous=FULL` that is
one fsync per batch instead of one per message. Reads run on a small pool of reader threads with
their own connections (WAL lets them proceed while the writer writes).

The writer also checkpoints the WAL into the database file when it has nothing queued (every
`IDLE_CHECKPOINT_COMMITS` commits at most), after answering the batch it just committed.
SQLite's own checkpoint (at 1,000 WAL pages, kept as the backstop of a writer that is never
idle) runs inside the COMMIT that crossed the mark: its batch, and every job queued behind it,
waited for a checkpoint of the whole WAL, which made the slowest percent of messages at
moderate load (docs/architecture.md, "Seventh round").
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pigeon.bookkeeping import BOOKKEEPING
from pigeon.domain.errors import Conflict, PigeonError, Unavailable

T = TypeVar("T")
Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
log = logging.getLogger(__name__)
#: Below this much free space on the file system that holds the database, the store reports
#: itself not ready (`ping`): the next group commit may fail with "database or disk is full".
MIN_FREE_BYTES = 16 * 1024 * 1024
#: Commits after which the writer checkpoints the WAL as soon as it finds its queue empty.
IDLE_CHECKPOINT_COMMITS = 8


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN ourselves) with WAL and sane pragmas."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute("PRAGMA secure_delete=ON")  # erased bodies are overwritten, not just unlinked
    return conn


class SqliteDb:
    """Owns the writer thread and the reader pool of one database file."""

    def __init__(
        self, path: Path, *, synchronous: str = "FULL", readers: int = 2, max_batch: int = 4096
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._readers = readers
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closing = False
        #: The probes `ping` has in flight: callers that come meanwhile share them, so a stuck
        #: writer or reader collects one probe, not one per caller.
        self._write_probe: asyncio.Future[None] | None = None
        self._read_probe: asyncio.Future[None] | None = None
        #: Transactions committed and jobs in them, for metrics and tests of batching.
        self.commits = 0
        self.jobs_committed = 0
        #: Checkpoints the writer ran while idle, and the commits since its last one.
        self.idle_checkpoints = 0
        self._uncheckpointed = 0

    async def open(self, migrate: Callable[[sqlite3.Connection], None]) -> None:
        """Open the write connection, run `migrate` on it, start the writer and readers."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._write_conn = await asyncio.to_thread(connect, self._path, self._synchronous)
        await asyncio.to_thread(migrate, self._write_conn)
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer", daemon=True)
        self._writer.start()
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-reader")

    async def aclose(self) -> None:
        """Let queued writes finish, then close every connection."""
        self._closing = True
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        while True:  # a job queued behind the stop marker is answered, not forgotten
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job[1].done():
                job[1].set_exception(Unavailable("store is closed"))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for conn in self._read_conns:
            conn.close()
        self._read_conns.clear()
        if self._write_conn is not None:
            self._write_conn.close()
            self._write_conn = None

    async def truncate_wal(self) -> None:
        """Checkpoint the whole WAL into the database and truncate it to zero bytes, so that
        bodies erased since the last checkpoint linger in no file (run after sweeps)."""

        def run() -> None:
            conn = connect(self._path, self._synchronous)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.close()

        try:
            await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise Unavailable(f"store checkpoint failed: {exc}") from exc

    async def ping(self) -> None:
        """Whether the store can work now, in the two ways an embedded database stops working:

        - the writer is stuck or dead: a marker queued behind the pending writes must come
          back through the writer thread (it is answered once the jobs queued before it are
          committed; no transaction of its own). A batch it rode with that failed to commit
          (`database or disk is full`, an I/O error) fails the probe too;
        - the disk is full or the file unreadable: a reader thread reads the schema table and
          checks that the file system keeps at least `MIN_FREE_BYTES` free.

        Both run concurrently; the caller bounds them with its timeout."""
        loop = self._loop
        if self._writer is None or loop is None or self._pool is None or self._closing:
            raise Unavailable("store is closed")
        if not self._writer.is_alive():
            raise Unavailable("store writer thread has stopped")
        if self._write_probe is None or self._write_probe.done():
            self._write_probe = _probe(loop.create_future())
            self._jobs.put((_ping_marker, self._write_probe))
        if self._read_probe is None or self._read_probe.done():
            self._read_probe = _probe(loop.run_in_executor(self._pool, self._run_read, self._check))
        await asyncio.gather(asyncio.shield(self._write_probe), asyncio.shield(self._read_probe))

    def _check(self, conn: sqlite3.Connection) -> None:
        """The reader side of `ping` (on a reader thread)."""
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()
        try:
            fs = os.statvfs(self._path.parent)
        except OSError as exc:
            raise Unavailable(f"store directory unreachable: {exc}") from exc
        free = fs.f_bavail * fs.f_frsize
        if free < MIN_FREE_BYTES:
            raise Unavailable(f"store disk is full: {free // 1024} KiB free")

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run `fn` inside a write transaction; resolves after the transaction committed."""
        if self._writer is None or self._loop is None or self._closing:
            raise Unavailable("store is closed")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, fut))
        return fut

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on a reader connection (a consistent snapshot for its duration)."""
        if self._pool is None or self._loop is None:
            raise Unavailable("store is closed")
        return await self._loop.run_in_executor(self._pool, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, self._synchronous)
            self._local.conn = conn
            with self._lock:
                self._read_conns.append(conn)
        try:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise Unavailable(f"store read failed: {exc}") from exc

    def _write_loop(self) -> None:
        assert self._write_conn is not None
        conn = self._write_conn
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            jobs = [job for job in batch if job[0] is not _ping_marker]
            failure = self._commit_batch(conn, jobs) if jobs else None
            if jobs:
                self._uncheckpointed += 1
                if self._uncheckpointed >= IDLE_CHECKPOINT_COMMITS and self._jobs.empty():
                    self._checkpoint_idle(conn)
            if len(jobs) < len(batch):  # `ping` markers: answered once the batch is done
                answers: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = [
                    (fut, None, failure) for fn, fut in batch if fn is _ping_marker
                ]
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_resolve, answers)

    def _checkpoint_idle(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database file while nobody waits (PASSIVE: pages a reader's
        snapshot still needs stay, for a later checkpoint). A failure costs nothing but the
        checkpoint: SQLite's own runs at the next COMMIT past its mark."""
        self._uncheckpointed = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("sqlite checkpoint failed: %s", exc)
            return
        self.idle_checkpoints += 1

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[Job]) -> Unavailable | None:
        """Commit one batch and answer its jobs; the engine failure that failed it, if any."""
        failure: Unavailable | None = None
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = _run_optimistically(conn, batch)
            if not outcomes:  # a job failed: redo the batch with one savepoint per job
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                outcomes = [(fut, *_run_in_savepoint(conn, fn)) for fn, fut in batch]
            conn.execute("COMMIT")
            self.commits += 1
            self.jobs_committed += len(batch)
        except sqlite3.Error as exc:
            log.exception("sqlite group commit failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = Unavailable(f"store write failed: {exc}")
            outcomes = [(fut, None, failure) for _, fut in batch]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, outcomes, context=BOOKKEEPING)
        return failure


def _run_optimistically(
    conn: sqlite3.Connection, batch: list[Job]
) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
    """Run every job without savepoints (2 statements less per job); [] if a job raised after
    it changed something. Jobs are pure functions of the database, so running them again is
    safe. A job refused before it changed anything (a send to a chat its sender is not in: the
    rules are checked before the writes) leaves nothing to undo, so the batch goes on: one such
    job per commit would otherwise make a saturated writer run every job about twice."""
    outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
    for fn, fut in batch:
        changes = conn.total_changes
        try:
            outcomes.append((fut, fn(conn), None))
        except sqlite3.OperationalError:
            raise
        except PigeonError as exc:
            if conn.total_changes != changes:
                return []
            outcomes.append((fut, None, exc))
        except Exception:
            return []
    return outcomes


def _run_in_savepoint(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]
) -> tuple[Any, BaseException | None]:
    conn.execute("SAVEPOINT job")
    try:
        result = fn(conn)
    except (PigeonError, sqlite3.IntegrityError) as exc:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        if isinstance(exc, sqlite3.IntegrityError):
            return None, Conflict(f"constraint violated: {exc}")
        return None, exc
    except sqlite3.Error:
        raise
    except Exception as exc:  # a bug in one job must not take its batch down
        log.exception("store job failed")
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return None, exc
    conn.execute("RELEASE job")
    return result, None


def _ping_marker(conn: sqlite3.Connection) -> None:
    """The job `ping` queues: the writer answers it without running it (see `_write_loop`)."""


def _probe(fut: asyncio.Future[None]) -> asyncio.Future[None]:
    """A probe future whose failure is read even if every caller gave up on it."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def _resolve(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, exc in outcomes:
        if fut.cancelled():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
