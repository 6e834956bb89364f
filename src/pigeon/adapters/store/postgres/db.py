"""PostgreSQL access from asyncio: one asyncpg pool per node, and the adapter's error boundary.

Every store call runs through `PgDb.run`, which borrows a pooled connection, retries transactions
that PostgreSQL aborted to resolve a conflict (deadlock, serialization failure, a duplicate key
raced in by a concurrent idempotent retry), and turns whatever the driver raises into a domain
error: a database that is down, restarting, unreachable, too slow or out of connections becomes
`Unavailable` (temporary: the SDK retries), so no asyncpg exception ever leaves the adapter.

The pool heals by itself: a connection that broke is dropped and the next borrower opens a new
one, so once the server is back calls succeed again on the same store object. Connections keep no
session state but what they are opened with (no LISTEN, no session advisory locks, no SET
later), so returning one to the pool skips asyncpg's reset query, which would be one more round
trip per call.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
from asyncpg import exceptions as pgerr

from pigeon.domain.errors import BadRequest, Conflict, PigeonError, Unavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Attempts of a transaction PostgreSQL rolled back to break a deadlock or a serialization
#: conflict (with a short random backoff), before answering `Unavailable`.
ATTEMPTS = 5
#: Seconds to open a connection, and (by default) to wait for a free pooled one and then for a
#: call's statements: a hung database answers `unavailable` (temporary) quickly rather than
#: holding every command. Migrations, which may build indexes, get longer.
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 5.0
MIGRATION_TIMEOUT = 600.0

#: Per connection. Generic plans: the message path's statements (in its functions, planned once
#: per connection) would otherwise be planned again on most calls, custom plans looking cheaper.
SERVER_SETTINGS = {
    "application_name": "pigeon",
    "jit": "off",
    "plan_cache_mode": "force_generic_plan",
}

# Errors that mean "the database, or the way to it, is not working right now".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    pgerr.PostgresConnectionError,  # 08xxx, incl. connection does not exist / failure
    pgerr.OperatorInterventionError,  # 57xxx: admin/crash shutdown, cannot connect now, cancel
    pgerr.InsufficientResourcesError,  # 53xxx: too many connections, disk full, out of memory
    pgerr.ReadOnlySQLTransactionError,  # 25006: a standby (mid failover)
    pgerr.PostgresSystemError,  # 58xxx: I/O error
    pgerr.InterfaceError,  # connection closed, pool closed/closing
    pgerr.InternalClientError,  # protocol errors on a broken connection
    OSError,  # refused, reset, unreachable
    TimeoutError,  # connect, acquire or command timeout
)


def translate(exc: Exception) -> PigeonError:
    """The domain error for a driver exception (the adapter's only exit for them)."""
    if isinstance(exc, PigeonError):
        return exc
    if isinstance(exc, pgerr.IntegrityConstraintViolationError):
        return Conflict(f"constraint violated: {exc}")
    if isinstance(exc, pgerr.DataError) or (
        isinstance(exc, pgerr.InterfaceError) and isinstance(exc, ValueError)
    ):
        # e.g. a NUL character in a name (PostgreSQL's text cannot hold it), or an argument
        # the driver could not encode
        return BadRequest(f"invalid value: {exc}")
    if isinstance(exc, pgerr.TransactionRollbackError):
        return Unavailable("store is busy (transaction conflict); retry")
    if isinstance(exc, _UNAVAILABLE):
        return Unavailable(f"store unavailable: {type(exc).__name__}: {exc}")
    log.error("unexpected store error", exc_info=exc)
    return PigeonError(f"store error: {type(exc).__name__}")


def _opening_error(exc: Exception, dsn: str) -> PigeonError:
    """Why the store could not be opened, naming the database (never its password): the one
    line an operator sees when `pigeon serve` cannot start."""
    parts = urlsplit(dsn)
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    if isinstance(exc, pgerr.InvalidCatalogNameError):
        return Unavailable(
            f"PostgreSQL database {parts.path.lstrip('/')!r} does not exist on "
            f"{where.split('/')[0]}: create it (createdb), then start again"
        )
    if isinstance(exc, pgerr.InvalidAuthorizationSpecificationError | pgerr.InvalidPasswordError):
        return Unavailable(f"PostgreSQL at {where} refused the login: {exc}")
    error = translate(exc)
    cls = Unavailable if isinstance(error, Unavailable) else PigeonError
    return cls(f"cannot open the store at {where}: {error}")


def _retriable(exc: Exception, retry_unique: bool) -> bool:
    if isinstance(exc, pgerr.TransactionRollbackError):
        return True  # deadlock_detected, serialization_failure: nothing was committed
    return retry_unique and isinstance(exc, pgerr.UniqueViolationError)


async def _init_connection(conn: asyncpg.Connection) -> None:
    """Have the server check, while it runs a statement, that the client is still there: a call
    that timed out closes its connection, and its statement must not commit afterwards."""
    if conn.get_server_version() >= (14, 0):  # the setting is new in PostgreSQL 14
        await conn.execute("SET client_connection_check_interval = 100")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo (see the module docstring)."""


class PgDb:
    """Owns the connection pool of one node."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int,
        max_connections: int,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self._dsn = dsn
        self._timeout = command_timeout
        self._min = min_connections
        self._max = max_connections
        self._pool: asyncpg.Pool | None = None
        #: Transactions run again after a conflict, for metrics and tests of the lock order.
        self.retries = 0

    async def open(self, migrate: Callable[[asyncpg.Connection], Awaitable[Any]]) -> None:
        """Create the pool and run `migrate` on one of its connections."""
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min,
                max_size=self._max,
                timeout=CONNECT_TIMEOUT,
                command_timeout=self._timeout,
                reset=_no_reset,
                init=_init_connection,
                server_settings=SERVER_SETTINGS,
            )
            await self.run(migrate, timeout=MIGRATION_TIMEOUT)
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, Exception):
                raise _opening_error(exc, self._dsn) from exc
            raise

    async def aclose(self) -> None:
        """Wait for borrowed connections to come back, then close them all."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), COMMAND_TIMEOUT)
            except Exception:  # a broken server: nothing left to finish
                pool.terminate()

    async def run(
        self,
        fn: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        retry_unique: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run `fn` with a pooled connection. `fn` makes its own transaction when it runs more
        than one statement; it is run again if PostgreSQL rolled it back to resolve a conflict
        (and on a unique violation if `retry_unique`: an idempotent write that lost a race).
        Each attempt has `timeout` seconds (the command timeout by default) for all of `fn`."""
        for attempt in range(1, ATTEMPTS + 1):
            pool = self._pool
            if pool is None:
                raise Unavailable("store is closed")
            try:
                async with pool.acquire(timeout=self._timeout) as conn:
                    # The deadline closes the connection: whatever `fn` awaits (a statement,
                    # the ROLLBACK of its transaction) fails at once. A cancel request would
                    # have to reach the server that does not answer (it held hung calls for
                    # twice the timeout); the server drops the statement when it finds the
                    # connection gone (`client_connection_check_interval`).
                    deadline = asyncio.get_running_loop().call_later(
                        timeout or self._timeout, conn.terminate
                    )
                    try:
                        return await fn(conn)
                    finally:
                        deadline.cancel()
            except Exception as exc:
                if attempt < ATTEMPTS and _retriable(exc, retry_unique):
                    self.retries += 1
                    log.debug("store transaction retried after %s", type(exc).__name__)
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                    continue
                raise translate(exc) from exc
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        """`SELECT 1` on a pooled connection (readiness): a database that is down, hung,
        unreachable or out of connections raises `Unavailable`, within the command timeout at
        most. A caller that gives up sooner (cancels) has the connection closed, rather than a
        cancel request sent to a server that may not answer."""
        pool = self._pool
        if pool is None:
            raise Unavailable("store is closed")
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                loop = asyncio.get_running_loop()
                deadline = loop.call_later(self._timeout, conn.terminate)
                try:
                    await conn.fetchval("SELECT 1")
                except BaseException:
                    conn.terminate()
                    raise
                finally:
                    deadline.cancel()
        except Exception as exc:
            raise translate(exc) from exc

    async def fetch(self, sql: str, *args: Any, retry_unique: bool = False) -> list[asyncpg.Record]:
        """One statement, all rows (autocommit)."""
        return await self.run(lambda conn: conn.fetch(sql, *args), retry_unique=retry_unique)

    async def fetchrow(self, sql: str, *args: Any, retry_unique: bool = False) -> Any:
        """One statement, its first row or None (autocommit)."""
        return await self.run(lambda conn: conn.fetchrow(sql, *args), retry_unique=retry_unique)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One statement, the first column of its first row (autocommit)."""
        return await self.run(lambda conn: conn.fetchval(sql, *args))

    async def execute(self, sql: str, *args: Any) -> None:
        """One statement, no result (autocommit)."""
        await self.run(lambda conn: conn.execute(sql, *args))
