"""DynamoDB for tests: moto in *server mode* (a real HTTP DynamoDB endpoint on a free loopback
port, in a child process, shared by the session), and `FaultProxy`, an HTTP front that
answers chosen calls with DynamoDB's own error responses before they reach moto.

Why the proxy: throttling, transient 500s and transaction conflicts are what the adapter's
retries exist for, and moto never produces them. Injecting them at the HTTP level exercises the
whole client stack (botocore's parsing of the error, our classification and backoff) exactly as
DynamoDB's answers would, with no patching of the code under test.

Why moto's requests are serialised (`SerialMotoServer`): moto's DynamoDB has no isolation
between requests that its threaded server runs at once. A TransactWriteItems snapshots (deep
copies) every table it names and, when cancelled, puts the snapshots back whole, discarding
every write other requests made to those tables meanwhile (acknowledged ones included); the
deep copy itself fails with a 500 when another thread writes during it; and its condition
checks are not atomic with the writes that follow them. DynamoDB guarantees all three
(docs/architecture.md, "Where moto differs"). One request at a time makes moto behave as
DynamoDB does for each request, while the adapter's own concurrency (between requests, where
DynamoDB's guarantees end too) stays real. With requests serialised, moto's TransactWriteItems
need not deep-copy the tables it names (its cost grew with them): `_transact_write_items`
checks every condition before writing anything.

Each test gets its own table prefix (`fresh_prefix`), so tests share the server, not tables;
the contract suite (tests/contract/conftest.py) empties one set of tables instead
(`empty_tables`), which is cheaper.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from moto.core.responses import ActionResult
from moto.dynamodb.comparisons import get_filter_expression
from moto.dynamodb.exceptions import (
    ConditionalCheckFailed,
    DynamodbException,
    MultipleTransactionsException,
    TooManyTransactionsException,
    TransactionCanceledException,
    TransactWriteSingleOpException,
)
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.responses import DynamoHandler
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from pigeon.adapters.store.dynamodb import DynamoStore, inbox
from pigeon.adapters.store.dynamodb.codec import PK, SK, Item, opt_int, str_of
from pigeon.adapters.store.dynamodb.db import DynamoDb
from pigeon.adapters.store.dynamodb.push import DynamoPushQueue
from pigeon.adapters.store.dynamodb.tables import MESSAGES, PUSH, TABLES, Table
from pigeon.ports import PushQueue, Store
from tests.support.http_front import HttpFront

ACCESS_KEY = "AKIAPIGEONTESTKEY000"
SECRET_KEY = "pigeon-test-secret-key"
REGION = "us-east-1"
_TYPE = "com.amazonaws.dynamodb.v20120810#"


@dataclass(frozen=True)
class MotoDynamo:
    """Where the session's moto server listens."""

    endpoint: str


class _OneRequestAtATime:
    """WSGI middleware: moto handles one request at a time (its response built inside the
    lock), as if each were atomic and isolated, which is what DynamoDB guarantees."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self._lock:
            return list(self._app(environ, start_response))


#: One write of a transaction, checked: (op type, op, table, key, the item before it or None).
_Planned = tuple[str, dict[str, Any], str, dict[str, Any], dict[str, Any] | None]
#: A cancellation reason as moto reports it: (code, message, item), all None when it held.
_Reason = tuple[str | None, str | None, dict[str, Any] | None]


def _transact_write_items(self: DynamoDBBackend, transact_items: list[dict[str, Any]]) -> None:
    """moto's TransactWriteItems without its deep copy of every table it names (taken to put
    them back if the transaction is cancelled, in time and memory growing with the tables:
    35 ms a call at 1 000 items, 160 ms at 4 000, so that a chat of a few hundred messages
    slowed every send). Requests are handled one at a time here (`_OneRequestAtATime`), so
    the conditions are checked first, all of them, and the writes applied only if every one
    holds: a cancelled transaction writes nothing, as on DynamoDB. Should a write fail while
    applied (a request DynamoDB would have refused up front), the items written so far are
    put back as they were. Errors and cancellation reasons are moto's own."""
    if len(transact_items) > 100:
        raise TooManyTransactionsException()
    seen: set[tuple[str, str]] = set()
    plan: list[_Planned] = []
    reasons: list[_Reason] = []
    for entry in transact_items:
        reason, planned = _check_write(self, entry, seen)
        reasons.append(reason)
        if planned is not None:
            plan.append(planned)
    if any(code is not None for code, _, _ in reasons):
        raise TransactionCanceledException(reasons)
    _apply_writes(self, plan)


def _check_write(
    self: DynamoDBBackend, entry: dict[str, Any], seen: set[tuple[str, str]]
) -> tuple[_Reason, _Planned | None]:
    """One item of a transaction: its cancellation reason, and its write if it holds."""
    if len(entry) > 1:
        raise TransactWriteSingleOpException
    op_type, op = next(iter(entry.items()))
    if op_type not in {"ConditionCheck", "Put", "Delete", "Update"}:
        return ("ValueError", "Unsupported transaction operation", None), None
    table_name = op["TableName"]
    if op_type == "Put":
        table = self.get_table(table_name)
        names = [table.hash_key_attr] + [a for a in [table.range_key_attr] if a]
        item_key = {a: op["Item"][a] for a in names}
    else:
        item_key = op["Key"]
    ident = (str(table_name), str(dict(sorted(item_key.items()))))
    if ident in seen:
        raise MultipleTransactionsException()
    seen.add(ident)
    current = self.get_item(table_name, item_key)
    condition = op.get("ConditionExpression")
    if condition is not None:
        names, values = op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
        if not get_filter_expression(condition, names, values).expr(current):
            old = None
            if op.get("ReturnValuesOnConditionCheckFailure") == "ALL_OLD" and current:
                old = current.to_json()["Attributes"]
            failed = ConditionalCheckFailed(item=old)
            return ("ConditionalCheckFailed", str(failed.message), old), None
    before = copy.deepcopy(current.to_json()["Attributes"]) if current else None
    return (None, None, None), (op_type, op, table_name, item_key, before)


def _apply_writes(self: DynamoDBBackend, plan: list[_Planned]) -> None:
    """The checked writes of a transaction; on a failure, what was written goes back."""
    applied: list[_Planned] = []
    try:
        for planned in plan:
            op_type, op, table_name, item_key, _ = planned
            applied.append(planned)
            if op_type == "Put":
                self.put_item(table_name, op["Item"])
            elif op_type == "Delete":
                self.delete_item(table_name, item_key)
            elif op_type == "Update":
                self.update_item(
                    table_name,
                    item_key,
                    update_expression=op["UpdateExpression"],
                    expression_attribute_names=op.get("ExpressionAttributeNames"),
                    expression_attribute_values=op.get("ExpressionAttributeValues"),
                )
    except Exception:
        for _, _, table_name, item_key, before in reversed(applied):
            if before is None:
                self.delete_item(table_name, item_key)
            else:
                self.put_item(table_name, before)
        raise


#: How long a transaction's `ClientRequestToken` is remembered (DynamoDB: 10 minutes).
_TOKEN_TTL_S = 600.0


class _Tokens:
    """The `ClientRequestToken`s of committed transactions, as DynamoDB keeps them: a repeat
    with the same token and items within 10 minutes succeeds without writing again (moto
    ignores the token, so an adapter's retry after a timed-out attempt that did commit found
    its own writes and was cancelled by them, where DynamoDB answers success)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, str]] = {}
        self._prune_at = 10_000

    def repeat(self, token: str, items: list[Any]) -> bool:
        """Whether `items` under `token` committed already (raises on other items)."""
        now = time.monotonic()
        if len(self._seen) > self._prune_at:
            self._seen = {t: v for t, v in self._seen.items() if now - v[0] < _TOKEN_TTL_S}
            self._prune_at = max(10_000, 2 * len(self._seen))
        seen = self._seen.get(token)
        if seen is None or now - seen[0] >= _TOKEN_TTL_S:
            return False
        if seen[1] != _digest(items):
            raise DynamodbException(
                _TYPE + "IdempotentParameterMismatchException",
                "the token was used for another request",
            )
        return True

    def committed(self, token: str, items: list[Any]) -> None:
        self._seen[token] = (time.monotonic(), _digest(items))


def _digest(items: list[Any]) -> str:
    """What identifies a transaction's items (a digest: they may hold megabytes)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=repr).encode()).hexdigest()


_tokens = _Tokens()
_moto_transact_write_items = DynamoHandler.transact_write_items


def _idempotent_transact_write_items(self: DynamoHandler) -> Any:
    """moto's TransactWriteItems response, honouring `ClientRequestToken` (`_Tokens`)."""
    token, items = self.body.get("ClientRequestToken"), self.body["TransactItems"]
    if token and _tokens.repeat(token, items):
        return ActionResult({"ConsumedCapacity": [], "ItemCollectionMetrics": {}})
    result = _moto_transact_write_items(self)
    if token:
        _tokens.committed(token, items)
    return result


class _QuietHandler(MotoRequestHandler):
    """moto's request handler without werkzeug's line per request (thousands per test run,
    each formatted, written and captured by pytest for nothing)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class SerialMotoServer:
    """moto's server mode (moto's own WSGI app and request handler, as `ThreadedMotoServer`
    runs them) in a thread, with a thread per connection (keep-alive connections of the
    client's pool never block each other) but one request handled at a time."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # safe only with one request at a time, which this server guarantees
        DynamoDBBackend.transact_write_items = _transact_write_items  # type: ignore[method-assign]
        DynamoHandler.transact_write_items = _idempotent_transact_write_items  # type: ignore[method-assign]
        app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
        self._server: BaseWSGIServer = make_server(
            host, port, app, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


def serve() -> None:
    """`python -m tests.support.dynamodb`: a `SerialMotoServer` until stdin closes (its
    endpoint printed on the first line of stdout)."""
    server = SerialMotoServer()
    server.start()
    print(server.endpoint, flush=True)
    try:
        sys.stdin.read()  # until the parent closes it, or dies
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_dynamodb() -> Iterator[MotoDynamo]:
    """One moto server (server mode, port chosen by the OS, requests serialised: see the
    module's docstring) for the whole session, in a process of its own: in the test
    process it shared one GIL with the servers and clients under test (the end-to-end suite
    on DynamoDB ran on one of the two cores), and its tables stayed in the test process's
    memory."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.dynamodb"],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().strip()
        if not endpoint.startswith("http://"):
            raise RuntimeError(f"the moto server did not start (exit {process.wait()})")
        yield MotoDynamo(endpoint=endpoint)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def delete_tables(endpoint: str, prefix: str) -> None:
    """Delete the tables of `prefix` (a test's, at its end): moto keeps every table in
    memory, and a run of the end-to-end suite made thousands."""
    import boto3

    client = boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    try:
        for table in TABLES:
            with contextlib.suppress(client.exceptions.ResourceNotFoundException):
                client.delete_table(TableName=prefix + table.name)
    finally:
        client.close()


def fresh_prefix() -> str:
    """A table prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}_"


def make_db(endpoint: str, prefix: str, **options: Any) -> DynamoDb:
    """A `DynamoDb` on `endpoint` with the tests' credentials and quick backoff."""
    defaults: dict[str, Any] = {
        "create_tables": True,
        "backoff_base": 0.001,
        "backoff_cap": 0.005,
        "read_timeout": 5.0,
    }
    return DynamoDb(
        table_prefix=prefix,
        endpoint_url=endpoint,
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        **(defaults | options),
    )


@pytest.fixture
async def dynamo(moto_dynamodb: MotoDynamo) -> AsyncIterator[DynamoDb]:
    """An open `DynamoDb` with its own freshly created tables."""
    db = make_db(moto_dynamodb.endpoint, fresh_prefix())
    await db.open()
    yield db
    await db.aclose()


@pytest.fixture
async def store(dynamo: DynamoDb) -> AsyncIterator[DynamoStore]:
    """The DynamoDB store, all its sub-stores, on the fresh tables of `dynamo`."""
    yield DynamoStore(dynamo)


@dataclass
class Fault:
    """Answer the next `times` calls of `op` (None: every call) with this error."""

    op: str
    code: str
    status: int
    times: int | None
    extra: dict[str, object] = field(default_factory=dict)


class FaultProxy(HttpFront):
    """An HTTP proxy in front of moto that fails chosen DynamoDB operations (named as in the
    `X-Amz-Target` header: `PutItem`, `TransactWriteItems`...) with DynamoDB's error bodies,
    and counts the calls it saw per operation (failed ones included)."""

    methods = "POST"

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: Counter[str] = Counter()
        self._faults: list[Fault] = []

    def fail(
        self,
        op: str,
        code: str = "ProvisionedThroughputExceededException",
        *,
        times: int | None = 1,
        status: int = 400,
        **extra: object,
    ) -> None:
        self._faults.append(Fault(op, code, status, times, dict(extra)))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        self.seen[op] += 1
        body = await request.read()
        for fault in self._faults:
            if fault.op == op and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                payload = {"__type": _TYPE + fault.code, "message": "injected"} | fault.extra
                return web.Response(
                    status=fault.status,
                    body=json.dumps(payload).encode(),
                    content_type="application/x-amz-json-1.0",
                )
        return await self._forward(request, body)


@pytest.fixture
async def fault_proxy(moto_dynamodb: MotoDynamo) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(moto_dynamodb.endpoint)
    await proxy.start()
    yield proxy
    await proxy.aclose()


async def empty_tables(db: DynamoDb, tables: Sequence[Table] = TABLES) -> None:
    """Delete every item of the tables (a Scan of their keys, then batches of deletes), and
    forget the hours the message path noted for them (`inbox.note_hour`): the tables are as
    new, for a fraction of what creating new ones costs on moto."""
    for table in tables:
        kwargs: dict[str, Any] = {"TableName": db.name(table), "ProjectionExpression": "pk, sk"}
        keys: list[Item] = []
        while True:
            page = await db.call("scan", idempotent=True, **kwargs)
            keys += page.get("Items", [])
            if not page.get("LastEvaluatedKey"):
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        await db.batch_write(table, deletes=keys)
        for k in keys:
            if table == MESSAGES and str_of(k, PK) == inbox.HOURS:
                inbox.forget_hour(db, str_of(k, SK))


# -- the push contract's helpers, taught the DynamoDB store ----------------------------------

_JOB_FIELDS = ("pending", "last_iseq", "invite_iseq", "due_at", "attempts", "leased_until")


async def job_rows(store: Store) -> list[tuple[Any, ...]]:
    """The push jobs of a DynamoDB store as test_push_store.py's `job_rows` gives them from
    SQL (`push_jobs` rows: device, chat, pending, last_iseq, invite_iseq, due_at, attempts,
    leased_until, pushed_at), read with a Scan of the push table."""
    assert isinstance(store, DynamoStore)
    rows = []
    kwargs: dict[str, Any] = {"TableName": store.db.name(PUSH), "ConsistentRead": True}
    while True:
        page = await store.db.call("scan", idempotent=True, **kwargs)
        for item in page.get("Items", []):
            pk, sk = str_of(item, PK), str_of(item, SK)
            if pk.startswith("P#") and sk.startswith("J#"):
                values = [opt_int(item, f) or 0 for f in (*_JOB_FIELDS, "pushed_at")]
                rows.append((pk[2:], sk[2:], *values))
        if not page.get("LastEvaluatedKey"):
            return sorted(rows)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def teach_push_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    """For one test on a DynamoDB store: the push contract modules' `queue_of` also builds a
    `DynamoPushQueue` (as `pigeon.app.build_push_queue` does), `job_rows` reads the job
    items, and `select` (SQL columns) skips the test."""
    from tests.contract import test_push_queue_depth, test_push_store, test_rabbit_push_queue

    sql_queue_of = test_push_store.queue_of

    def queue_of(store: Store) -> PushQueue:
        return DynamoPushQueue(store.db) if isinstance(store, DynamoStore) else sql_queue_of(store)

    async def select(store: Store, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        columns = sql.split(" FROM ")[0]
        pytest.skip(f"reads SQL columns ({columns}); test_dynamodb_*.py checks DynamoDB's items")

    for module in (test_push_store, test_push_queue_depth, test_rabbit_push_queue):
        monkeypatch.setattr(module, "queue_of", queue_of)
    for module in (test_push_store, test_rabbit_push_queue):
        monkeypatch.setattr(module, "job_rows", job_rows)
    monkeypatch.setattr(test_push_store, "select", select)


if __name__ == "__main__":
    serve()
