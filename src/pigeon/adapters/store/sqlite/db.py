"""SQLite access from asyncio: group commit on the event loop, durability off it.

Why this shape (measured in docs/architecture.md, "The SQLite write path"): handing every job to
a writer thread cost more CPU in thread hand-offs and GIL contention than the SQL itself, and a
lightly loaded node paid a whole fsync per message. So:

- Write jobs run on the event loop thread, in batches: every job queued during one loop
  iteration runs in the next one, all in one transaction, back to back. If one raises, the batch
  is rolled back and run again with each job in its own SAVEPOINT, so a failing job never takes
  its neighbours down (and the common case pays no savepoint statements).
- COMMIT only hands the pages to the OS (the connection runs `synchronous=NORMAL`): microseconds,
  no fsync on the loop. With `synchronous="FULL"` (the default) a durability thread then
  fdatasyncs the WAL, at most once per `sync_interval`, and callers are answered only once a sync
  that started after their COMMIT has returned. One fsync covers every batch committed before it,
  so a busy node pays one per interval, an idle one answers at once. This is the guarantee of
  SQLite's own `synchronous=FULL` (the WAL is on disk before anyone is told), paid per interval
  instead of per transaction.
- Reads run on reader threads with their own connections (WAL snapshots) and are answered only
  once what they saw is durable, so nobody ever sees a change that a power cut could take back.
- Long jobs (sweeps) run `apart`: alone in their own transaction on a worker thread, so they
  never stall the loop; the queue waits behind them, keeping commit order equal to call order.
- Checkpoints run on a thread of their own (the writer's automatic checkpoint is off), so the
  loop never copies WAL pages into the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pigeon.domain.errors import Conflict, PigeonError, Unavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class _Job:
    __slots__ = ("apart", "fn", "fut")

    def __init__(
        self, fn: Callable[[sqlite3.Connection], Any], fut: asyncio.Future[Any], apart: bool
    ) -> None:
        self.fn = fn
        self.fut = fut
        self.apart = apart


#: Commits after which the checkpointer is woken (besides its periodic run, in seconds).
_CHECKPOINT_COMMITS = 2000
_CHECKPOINT_PERIOD = 1.0


def connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN ourselves) with WAL and sane pragmas."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


class SqliteDb:
    """Owns the write connection (used on the loop), the durability and checkpoint threads and
    the reader pool of one database file."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        readers: int = 2,
        max_batch: int = 512,
        commit_interval: float = 0.002,
    ) -> None:
        self._path = path
        self._durable_commits = synchronous == "FULL"
        self._readers = readers
        self._max_batch = max_batch
        self._commit_interval = commit_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._queue: deque[_Job] = deque()
        self._flush_scheduled = False
        self._apart_running = False
        self._closing = False
        self._drained: asyncio.Future[None] | None = None
        # Durability: batches committed (by generation) and the callers waiting for a sync.
        self._gen = 0
        self._durable_gen = 0
        self._waiting: deque[tuple[int, list[Outcome]]] = deque()
        self._wal_fd: int | None = None
        self._syncing = False
        self._sync_pool: ThreadPoolExecutor | None = None
        self._last_flush = 0.0
        self._commits_since_checkpoint = 0
        self._checkpoint_wanted = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._stop_threads = False
        self._apart_pool: ThreadPoolExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        #: Transactions committed, jobs in them and WAL syncs, for metrics and tests of batching.
        self.commits = 0
        self.jobs_committed = 0
        self.syncs = 0

    async def open(self, migrate: Callable[[sqlite3.Connection], None]) -> None:
        """Open the write connection, run `migrate` on it, start the helper threads."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(connect, self._path)
        await asyncio.to_thread(migrate, conn)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it
        conn.execute("PRAGMA journal_size_limit=67108864")  # WAL shrinks back after a burst
        self._conn = conn
        self._apart_pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-apart")
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="sqlite-reader")
        if self._durable_commits:
            self._wal_fd = os.open(f"{self._path}-wal", os.O_RDONLY | os.O_CREAT, 0o600)
            self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-sync")
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def aclose(self) -> None:
        """Let queued writes finish and become durable, then close every connection."""
        if self._conn is None or self._loop is None:
            return
        self._closing = True
        while self._queue or self._apart_running or self._flush_scheduled:
            self._drained = self._loop.create_future()
            if not self._flush_scheduled and not self._apart_running:
                self._schedule_flush()
            await self._drained
        await self.durable(self._gen)
        self._stop_threads = True
        self._checkpoint_wanted.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        for pool in (self._pool, self._apart_pool, self._sync_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._apart_pool = self._sync_pool = None
        for rc in self._read_conns:
            rc.close()
        self._read_conns.clear()
        self._conn.close()
        self._conn = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def write(
        self, fn: Callable[[sqlite3.Connection], T], *, apart: bool = False
    ) -> asyncio.Future[T]:
        """Run `fn` inside a write transaction; resolves once that transaction is committed and
        durable. `apart`: a long job, run alone on a worker thread (the loop stays free)."""
        if self._conn is None or self._loop is None or self._closing:
            raise Unavailable("store is closed")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.append(_Job(fn, fut, apart))
        if not self._flush_scheduled and not self._apart_running:
            self._schedule_flush()
        return fut

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on a reader connection (a consistent snapshot for its duration); answered
        once every change the snapshot may contain is durable."""
        if self._pool is None or self._loop is None:
            raise Unavailable("store is closed")
        result = await self._loop.run_in_executor(self._pool, self._run_read, fn)
        await self.durable(self._gen)
        return result

    async def durable(self, gen: int) -> None:
        """Wait until the batches up to generation `gen` are on disk."""
        if gen <= self._durable_gen or self._loop is None:
            return
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiting.append((gen, [(fut, None, None)]))
        self._want_sync()
        await fut

    # -- the write path, on the loop -------------------------------------------------------

    def _schedule_flush(self) -> None:
        assert self._loop is not None
        self._flush_scheduled = True
        delay = self._last_flush + self._commit_interval - self._loop.time()
        if delay > 0:  # paces commits: jobs until then join this one
            self._loop.call_later(delay, self._flush)
        else:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        assert self._loop is not None
        self._flush_scheduled = False
        self._last_flush = self._loop.time()
        queue = self._queue
        if self._apart_running:
            return
        if not queue:
            self._signal_drained()
            return
        if queue[0].apart:
            self._start_apart(queue.popleft())
            return
        batch: list[_Job] = []
        while queue and not queue[0].apart and len(batch) < self._max_batch:
            batch.append(queue.popleft())
        assert self._conn is not None
        outcomes = _commit_batch(self._conn, batch)
        if outcomes is None:
            failure = Unavailable("store write failed")
            _resolve([(job.fut, None, failure) for job in batch])
        else:
            self.commits += 1
            self.jobs_committed += len(batch)
            self._committed(outcomes)
        if queue:
            self._schedule_flush()
        else:
            self._signal_drained()

    def _committed(self, outcomes: list[Outcome]) -> None:
        self._gen += 1
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= _CHECKPOINT_COMMITS:
            self._commits_since_checkpoint = 0
            self._checkpoint_wanted.set()
        if not self._durable_commits:
            self._durable_gen = self._gen
            _resolve(outcomes)
            return
        self._waiting.append((self._gen, outcomes))
        self._want_sync()

    def _start_apart(self, job: _Job) -> None:
        assert self._loop is not None and self._apart_pool is not None and self._conn is not None
        self._apart_running = True
        conn = self._conn
        done = self._loop.run_in_executor(self._apart_pool, _commit_batch, conn, [job])
        done.add_done_callback(self._apart_done)

    def _apart_done(self, done: asyncio.Future[list[Outcome] | None]) -> None:
        self._apart_running = False
        outcomes = None if done.cancelled() or done.exception() else done.result()
        if outcomes is None:
            log.error("sqlite apart job failed to commit")
        else:
            self.commits += 1
            self.jobs_committed += 1
            self._committed(outcomes)
        if self._queue:
            self._schedule_flush()
        else:
            self._signal_drained()

    def _signal_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- durability and checkpoints, on their threads --------------------------------------

    def _want_sync(self) -> None:
        """Start an fsync of the WAL on the sync thread, unless one is in flight (then the
        commits made meanwhile get the next one, started as soon as it returns)."""
        if self._syncing or self._gen <= self._durable_gen or self._sync_pool is None:
            return
        assert self._loop is not None and self._wal_fd is not None
        self._syncing = True
        gen = self._gen  # every batch up to here has returned from COMMIT
        done = self._loop.run_in_executor(self._sync_pool, _fdatasync, self._wal_fd)
        done.add_done_callback(lambda f: self._sync_done(gen, f))

    def _sync_done(self, gen: int, done: asyncio.Future[None]) -> None:
        self._syncing = False
        self.syncs += 1
        error = None if done.cancelled() else done.exception()
        self._synced(gen, error if isinstance(error, OSError) or error is None else OSError(error))
        self._want_sync()

    def _synced(self, gen: int, error: OSError | None) -> None:
        if error is not None:
            log.critical("fsync of the SQLite WAL failed: %s", error)
        waiting = self._waiting
        done: list[Outcome] = []
        while waiting and waiting[0][0] <= gen:
            done += waiting.popleft()[1]
        if error is None:
            self._durable_gen = max(self._durable_gen, gen)
            _resolve(done)
        else:  # committed but maybe not on disk: callers retry (sends are idempotent by cmid)
            failure = Unavailable("store write failed: fsync error")
            _resolve([(fut, None, failure) for fut, _, _ in done])

    def _checkpoint_loop(self) -> None:
        conn = connect(self._path)
        try:
            while not self._stop_threads:
                self._checkpoint_wanted.wait(_CHECKPOINT_PERIOD)
                self._checkpoint_wanted.clear()
                if self._stop_threads:
                    break
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("sqlite checkpoint failed: %s", exc)
        finally:
            conn.close()

    # -- reads, on reader threads ----------------------------------------------------------

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path)
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


def _fdatasync(fd: int) -> None:
    os.fdatasync(fd)
    if os.fstat(fd).st_nlink == 0:  # never while we hold the database
        raise OSError("the WAL file was unlinked under the store")


def _commit_batch(conn: sqlite3.Connection, batch: list[_Job]) -> list[Outcome] | None:
    """Run a batch in one transaction and COMMIT it; None if the transaction itself failed."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes = _run_optimistically(conn, batch)
        if outcomes is None:  # a job failed: redo the batch with one savepoint per job
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [(job.fut, *_run_in_savepoint(conn, job.fn)) for job in batch]
        conn.execute("COMMIT")
        return outcomes
    except sqlite3.Error:
        log.exception("sqlite group commit failed")
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return None


def _run_optimistically(conn: sqlite3.Connection, batch: list[_Job]) -> list[Outcome] | None:
    """Run every job without savepoints (2 statements less per job); None if any job raised.
    Jobs are pure functions of the database, so running them again is safe."""
    outcomes: list[Outcome] = []
    for job in batch:
        try:
            outcomes.append((job.fut, job.fn(conn), None))
        except sqlite3.OperationalError:
            raise
        except Exception:
            return None
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


def _resolve(outcomes: list[Outcome]) -> None:
    for fut, result, exc in outcomes:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
