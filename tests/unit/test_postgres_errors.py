"""The PostgreSQL adapter's error boundary: driver failures become domain errors."""

from __future__ import annotations

import pytest
from asyncpg import exceptions as pgerr

from pigeon.adapters.store.postgres.db import translate
from pigeon.domain.errors import BadRequest, Conflict, PigeonError, Unavailable


@pytest.mark.parametrize(
    "exc",
    [
        pgerr.AdminShutdownError("terminating connection due to administrator command"),
        pgerr.CannotConnectNowError("the database system is starting up"),
        pgerr.CrashShutdownError("crash"),
        pgerr.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        pgerr.TooManyConnectionsError("too many clients"),
        pgerr.QueryCanceledError("canceling statement due to statement timeout"),
        pgerr.ReadOnlySQLTransactionError("read-only transaction"),
        pgerr.DeadlockDetectedError("deadlock detected"),
        pgerr.SerializationError("could not serialize access"),
        pgerr.InterfaceError("pool is closed"),
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError(),
    ],
)
def test_failures_of_the_database_are_unavailable(exc: Exception) -> None:
    err = translate(exc)
    assert isinstance(err, Unavailable) and err.temporary


def test_other_errors_map_to_domain_errors() -> None:
    assert isinstance(translate(pgerr.UniqueViolationError("duplicate key")), Conflict)
    assert isinstance(translate(pgerr.ForeignKeyViolationError("no such user")), Conflict)
    assert isinstance(translate(pgerr.CharacterNotInRepertoireError("NUL")), BadRequest)
    bug = translate(pgerr.UndefinedColumnError("column x does not exist"))
    assert type(bug) is PigeonError and not bug.temporary  # internal, never an asyncpg error
    domain = Conflict("kept")
    assert translate(domain) is domain
