"""PostgreSQL for tests: fresh databases on the shared server, and test-owned clusters.

The shared server is reached through an admin DSN (env `PIGEON_TEST_POSTGRES_DSN`, default the
local server's `postgres` database with trust auth). Tests never use an existing database: the
session gets its own `pigeon_test_<random>` (fixture `postgres_dsn`), and a test that needs a
database to itself (several processes, several nodes) gets one from `fresh_database()`. Fault
tests that stop and start the server own a throw-away cluster (`PgCluster`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import pytest

from pigeon.bench.server import free_port

ADMIN_DSN = os.environ.get(
    "PIGEON_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_BIN = Path("/usr/lib/postgresql/15/bin")
T = TypeVar("T")


def dsn_for(database: str, admin_dsn: str = ADMIN_DSN) -> str:
    """The admin DSN with its database replaced."""
    return urlsplit(admin_dsn)._replace(path=f"/{database}").geturl()


async def create_database(admin_dsn: str = ADMIN_DSN) -> str:
    """Create an empty database `pigeon_test_<random>`; returns its name."""
    name = f"pigeon_test_{secrets.token_hex(6)}"
    try:
        conn = await asyncpg.connect(admin_dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {admin_dsn} ({exc}); start it or point"
            " PIGEON_TEST_POSTGRES_DSN at a server where this user may create databases"
        )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    """Drop a test database, ending whatever connections were left on it."""
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_database(admin_dsn: str = ADMIN_DSN) -> AsyncIterator[str]:
    """A new empty database for the duration of the block; yields its DSN."""
    name = await create_database(admin_dsn)
    try:
        yield dsn_for(name, admin_dsn)
    finally:
        await drop_database(name, admin_dsn)


async def empty_database(dsn: str) -> None:
    """Empty every table of the database but the migration record.

    DELETE rather than TRUNCATE: on these few rows it takes about a millisecond, where TRUNCATE
    gives each table and index a new file (~150 ms per call with fsync on). Tables are emptied
    referencing ones first, so foreign keys never object."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        tables = {
            r[0]
            for r in await conn.fetch(
                "SELECT quote_ident(tablename) FROM pg_tables"
                " WHERE schemaname = 'public' AND tablename <> 'schema_version'"
            )
        }
        order: TopologicalSorter[str] = TopologicalSorter({t: set() for t in tables})
        for referencing, referenced in await conn.fetch(
            "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint"
            " WHERE contype = 'f' AND connamespace = 'public'::regnamespace"
            " AND conrelid <> confrelid"
        ):
            order.add(referenced, referencing)  # delete the referencing table first
        async with conn.transaction():
            for table in order.static_order():
                await conn.execute(f"DELETE FROM {table}")
    finally:
        await conn.close()


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a loop of its own, in a thread of its own, so that it
    works whether or not the caller (a fixture, maybe requested from a running loop) has one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A database of the test session on the shared server, dropped at the end.

    Synchronous, so that tests and fixtures on any event loop scope may use it."""
    name = _run_sync(create_database())
    try:
        yield dsn_for(name)
    finally:
        _run_sync(drop_database(name))


class PgCluster:
    """A throw-away PostgreSQL cluster on a spare port, for tests that stop and start the
    server: `await start()`, `await stop(mode)`, `dsn`, and `await close()` to stop it and remove
    its files. The cluster is created (`initdb`) by the first `start()`.

    `initdb` and `pg_ctl` refuse to run as root, so as root they run as the `postgres` OS user
    (`runuser`), in a directory that user owns. It must also be able to reach it, which pytest's
    `tmp_path` (private to root) does not allow: the cluster then lives in a new directory of
    the system's temporary directory and `directory`, if given, becomes a link to it (its `log`
    is the server log)."""

    def __init__(self, directory: Path | None = None, *, bin_dir: Path = PG_BIN) -> None:
        self._bin = bin_dir
        self._as_postgres = os.geteuid() == 0
        self._link: Path | None = None
        if directory is None or self._as_postgres:
            self.dir = Path(tempfile.mkdtemp(prefix="pigeon-pg-"))
            if self._as_postgres:
                shutil.chown(self.dir, "postgres", "postgres")
            if directory is not None:
                directory.parent.mkdir(parents=True, exist_ok=True)
                directory.symlink_to(self.dir, target_is_directory=True)
                self._link = directory
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.dir = directory
        self._data = self.dir / "data"
        self.port = free_port()

    @property
    def dsn(self) -> str:
        """The cluster's `postgres` database as the `postgres` superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def start(self) -> None:
        """Start the server (creating the cluster the first time) and wait until it accepts
        connections."""
        if not self._data.exists():
            await self._run(
                "initdb", "-D", str(self._data), "-U", "postgres", "-A", "trust", "-N",
                "-E", "UTF8",
            )  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
            " -c fsync=off -c full_page_writes=off"
        )
        await self._run(
            "pg_ctl", "-D", str(self._data), "-l", str(self.dir / "log"), "-o", options, "-w",
            "start",
        )  # fmt: skip

    async def stop(self, mode: str = "fast") -> None:
        """Stop the server (`smart`, `fast` or `immediate`) and wait until it is down."""
        await self._run("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop")

    def pause(self) -> None:
        """SIGSTOP every process of the server: a database that hangs (connections stay open,
        nothing answers). `resume` undoes it."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        postmaster = int((self._data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def running(self) -> bool:
        """True while the server process is up."""
        if not self._data.exists():
            return False
        proc = await asyncio.create_subprocess_exec(
            *self._argv("pg_ctl", "-D", str(self._data), "status"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait() == 0

    async def close(self) -> None:
        """Stop the server if it runs and remove the cluster."""
        try:
            if await self.running():
                await self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._link is not None:
                self._link.unlink(missing_ok=True)

    async def __aenter__(self) -> PgCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _argv(self, tool: str, *args: str) -> list[str]:
        argv = [str(self._bin / tool), *args]
        return ["runuser", "-u", "postgres", "--", *argv] if self._as_postgres else argv

    async def _run(self, tool: str, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._argv(tool, *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            log = self.dir / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({proc.returncode}): {output.decode(errors='replace')}\n{tail}"
            )
